"""The one exception tree of meshllm.

Callers catch :class:`MeshError` for anything meshllm raises on purpose; the
subclasses say what kind of thing went wrong so that a caller can act on it.
Messages name the file, field or value at fault and, where there is one, the
fix. Every exception class of the package lives here; the modules that raise
them re-export the names they use (``from meshllm.errors import X``)::

    MeshError
    ├── ModelError                 model files: missing, corrupt, unsupported
    │   ├── UnsupportedModelError
    │   ├── ManifestError
    │   ├── TokenizerError
    │   ├── QuantizeError
    │   └── NoModelSource          no peer holds the model files to fetch
    ├── GenerationError            a generation request is invalid
    │   └── ContextLengthError     a sequence outgrows its cache (context_length_exceeded)
    ├── SecretError                the mesh secret / closed-or-open choice
    ├── ConfigError                a node's configuration, found before it joins
    ├── PlanError                  planner input invalid, or no plan fits
    ├── LayoutError                a plan that cannot be served as written
    ├── BrokerError                the MQTT broker: unreachable, bad URL
    ├── NodeIdInUse                another live process has this node id
    ├── PayloadError (ValueError)  a control-plane JSON payload is malformed
    ├── FrameError                 a data-plane frame is malformed
    │   └── AuthError              the peer does not hold the mesh secret
    ├── PeerUnreachable            a data-plane peer cannot be reached
    ├── RequestFailed              a request refused or failed, with its code
    │   ├── RequestTimeout
    │   └── ReplyError
    └── APIError                   an HTTP answer other than 200 (gateway)

The classes a caller of the public API can act on are re-exported from
:mod:`meshllm`. Control-flow signals that never leave one module
(``mesh/node.py``'s broker-session exits) stay private to it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIError", "AuthError", "BrokerError", "ConfigError", "ContextLengthError", "FrameError", "GenerationError",
    "LayoutError",
    "ManifestError", "MeshError", "ModelError", "NoModelSource", "NodeIdInUse", "PayloadError", "PeerUnreachable",
    "PlanError", "QuantizeError", "ReplyError", "RequestFailed", "RequestTimeout", "SecretError", "TokenizerError",
    "UnsupportedModelError",
]

# the client's own error codes (the mesh's codes live in meshllm.serve.api)
TIMEOUT = "timeout"
PROTOCOL_ERROR = "protocol_error"


class MeshError(Exception):
    """Base of every error meshllm raises deliberately."""


# --- model files --------------------------------------------------------------------------------

class ModelError(MeshError):
    """A model directory or checkpoint is missing, corrupt or unsupported."""


class UnsupportedModelError(ModelError):
    """The checkpoint is well formed but of an architecture meshllm cannot run."""


class ManifestError(ModelError):
    """A model directory does not match its manifest (missing file, bad hash, version)."""


class TokenizerError(ModelError):
    """A tokenizer file cannot be read or does not fit the model."""


class QuantizeError(ModelError):
    """A quantization setting or weight cannot be quantized as asked (bits, block size, shape)."""


class NoModelSource(ModelError):
    """No mesh member holds the model files a node needs to fetch."""


# --- configuration and planning ------------------------------------------------------------------

class GenerationError(MeshError):
    """A generation request is invalid (context too long, bad sampling values)."""


class ContextLengthError(GenerationError):
    """A sequence would outgrow the context its cache holds (answered ``context_length_exceeded``)."""


class SecretError(MeshError):
    """The mesh secret is missing, unreadable or too weak, or a mesh is started neither closed nor open."""


class ConfigError(MeshError):
    """A node's configuration is invalid; raised before the node joins the mesh so it never half-starts."""


class PlanError(MeshError):
    """Planner input is invalid (device file, workload spec, model costs) or no plan can serve the model."""


class LayoutError(MeshError):
    """A plan that cannot be served as written."""


# --- the mesh: control plane and data plane -----------------------------------------------------

class BrokerError(MeshError):
    """The broker cannot be reached, or its URL is malformed."""


class NodeIdInUse(MeshError):
    """Another live process already uses this node id on this mesh."""


class PayloadError(MeshError, ValueError):
    """A control-plane JSON payload is too large, not JSON, or not an object (a ValueError too)."""


class FrameError(MeshError):
    """A data-plane frame cannot be encoded or is malformed; it costs only its own connection."""


class AuthError(FrameError):
    """The peer does not hold the mesh secret (or broke the handshake)."""


class PeerUnreachable(MeshError):
    """A data-plane peer cannot be connected to (after the retries)."""


# --- requests -----------------------------------------------------------------------------------

class RequestFailed(MeshError):
    """A request refused or failed, with the v1 error ``code`` and ``message``.

    The one type for both sides: the mesh raises it to refuse a request (and
    answers with :meth:`reply` on ``reply_to``), and :class:`~meshllm.serve.client.Client`
    raises it for the mesh's ``error`` object, for the same refusal found before
    sending, or for one of its own codes (``timeout``, ``protocol_error``, ``overflow``).
    """

    def __init__(self, code: str, message: str, request_id: str | None = None, reply_to: str | None = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code, self.message, self.request_id, self.reply_to = code, message, request_id, reply_to

    def reply(self) -> dict[str, Any]:
        """The v1 error reply that answers this request."""
        return {"id": self.request_id, "error": {"code": self.code, "message": self.message}}


class RequestTimeout(RequestFailed):
    """The mesh did not answer in time (``first_token_timeout`` or ``idle_timeout``)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(TIMEOUT, message, request_id)


class ReplyError(RequestFailed):
    """The reply stream broke the v1 contract (a gap, a malformed message), or fell too far behind."""

    def __init__(self, message: str, request_id: str | None = None, code: str = PROTOCOL_ERROR) -> None:
        super().__init__(code, message, request_id)


class APIError(MeshError):
    """An HTTP answer other than 200, as OpenAI words one: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 code: str | None = None, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)} if self.retry_after is not None else {}
