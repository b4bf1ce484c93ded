"""The one exception tree of meshllm.

Callers catch :class:`MeshError` for anything meshllm raises on purpose; the
subclasses say what kind of thing went wrong so that a caller can act on it.
Messages name the file, field or value at fault and, where there is one, the
fix.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error meshllm raises deliberately."""


class ModelError(MeshError):
    """A model directory or checkpoint is missing, corrupt or unsupported."""


class UnsupportedModelError(ModelError):
    """The checkpoint is well formed but of an architecture meshllm cannot run."""


class ManifestError(ModelError):
    """A model directory does not match its manifest (missing file, bad hash, version)."""


class TokenizerError(ModelError):
    """A tokenizer file cannot be read or does not fit the model."""


class GenerationError(MeshError):
    """A generation request is invalid (context too long, bad sampling values)."""


class ContextLengthError(GenerationError):
    """A sequence would outgrow the context its cache holds (answered ``context_length_exceeded``)."""


class SecretError(MeshError):
    """The mesh secret is missing, unreadable or too weak, or a mesh is started neither closed nor open."""
