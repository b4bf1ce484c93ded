"""meshllm: serve a large language model on a LAN of small, heterogeneous devices.

The public API is small; everything else lives in internal modules.
"""

from meshllm.errors import (
    BrokerError,
    GenerationError,
    ManifestError,
    MeshError,
    ModelError,
    PlanError,
    ReplyError,
    RequestFailed,
    RequestTimeout,
    SecretError,
    TokenizerError,
    UnsupportedModelError,
)
from meshllm.model.config import ModelConfig
from meshllm.model.export import export
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.runtime.generate import Completion, LocalModel
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from meshllm.serve.client import Chunk, Client, Result

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "Chunk",
    "Client",
    "Completion",
    "GenerationError",
    "LocalModel",
    "Manifest",
    "ManifestError",
    "MeshError",
    "ModelConfig",
    "ModelError",
    "PlanError",
    "ReplyError",
    "RequestFailed",
    "RequestTimeout",
    "Result",
    "SamplingParams",
    "SecretError",
    "Segment",
    "TokenizerError",
    "UnsupportedModelError",
    "export",
    "load_manifest",
]
