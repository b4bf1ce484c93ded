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
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.runtime.sampling import SamplingParams

#: Public names whose modules pull in onnx/onnxruntime (seconds of import on a Pi): loaded on first use, so
#: `meshllm --help`, the client and the gateway start without them.
_LAZY = {
    "export": "meshllm.model.export",
    "Completion": "meshllm.runtime.generate",
    "LocalModel": "meshllm.runtime.generate",
    "Segment": "meshllm.runtime.segment",
    "Chunk": "meshllm.serve.client",
    "Client": "meshllm.serve.client",
    "Result": "meshllm.serve.client",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
