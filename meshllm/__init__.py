"""meshllm: serve a large language model on a LAN of small, heterogeneous devices.

The public API is small; everything else lives in internal modules.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from meshllm.model.config import ModelConfig
    from meshllm.model.export import export
    from meshllm.model.manifest import Manifest, load_manifest
    from meshllm.runtime.generate import Completion, LocalModel
    from meshllm.runtime.sampling import SamplingParams
    from meshllm.runtime.segment import Segment
    from meshllm.serve.client import Chunk, Client, Result

# The rest of the public API is imported on first use: a process that only runs a segment (a node's
# compute, the benchmarks) would otherwise hold the client, the mesh and the export code it never
# uses (~16 MB of a quantized 110M model's ~250 MB peak).
_LAZY = {
    "ModelConfig": "meshllm.model.config",
    "export": "meshllm.model.export",
    "Manifest": "meshllm.model.manifest",
    "load_manifest": "meshllm.model.manifest",
    "Completion": "meshllm.runtime.generate",
    "LocalModel": "meshllm.runtime.generate",
    "SamplingParams": "meshllm.runtime.sampling",
    "Segment": "meshllm.runtime.segment",
    "Chunk": "meshllm.serve.client",
    "Client": "meshllm.serve.client",
    "Result": "meshllm.serve.client",
}


def __getattr__(name: str) -> Any:
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
