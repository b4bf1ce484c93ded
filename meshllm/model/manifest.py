"""The manifest of a meshllm model directory: what is in it, what it costs, and its hashes.

A model directory is the unit that nodes load from and fetch from each other.
The manifest is its table of contents (format version, architecture, parts,
sha256 of every file) and its price list (per-layer FLOPs, bytes of weights,
KV cache and activations), which the planner's cost model reads. This module
owns reading, writing and verifying it; it never builds or runs graphs.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from meshllm.errors import ManifestError
from meshllm.model.config import ModelConfig

MANIFEST_NAME = "manifest.json"
FORMAT = "meshllm-model"
FORMAT_VERSION = 2  # 2: quantized dtypes, "quantization", per-part "runtime_bytes"
OLDEST_FORMAT_VERSION = 1  # version 1 lacks runtime_bytes: it is the cost's float32 size
#: Weight storage types of a model directory (fp16 is upcast to float32 when loaded).
DTYPES = ("fp32", "fp16", "int4", "int8")
ACTIVATION_DTYPE_BYTES = 4  # activations and KV caches are float32 at run time


TOKENIZER_FILE_KEYS = ("file", "config", "chat_template")


def check_file_name(name: object, where: str = "manifest") -> str:
    """``name`` if it is a safe manifest file name, else a :class:`ManifestError` naming it.

    A safe name is relative, '/'-separated and already normalised (no empty, '.' or '..' part, no
    backslash, no control character), so that ``model_dir / name`` always lies inside the model
    directory: a manifest from a peer must never make a node read or write anywhere else.
    """
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: file name {name!r} is not a non-empty string")
    why = None
    if any(unicodedata.category(c) == "Cc" for c in name):
        why = "it contains a control character"
    elif "\\" in name:
        why = "it contains a backslash"
    elif name.startswith("/"):
        why = "it is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "it has an empty, '.' or '..' part"
    elif PurePosixPath(name).as_posix() != name or unicodedata.normalize("NFC", name) != name:
        why = "it is not in normal form"
    if why is not None:
        raise ManifestError(f"{where}: refusing file name {name!r}: {why}; manifest file names must be "
                            "relative paths inside the model directory")
    return name


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class PartCost:
    """Cost figures of one part (a layer, the embedding or the head), per token."""

    flops_per_token: int  # weight matmuls, 2 FLOPs per multiply-add
    attn_flops_per_token_per_ctx: int  # extra FLOPs per token for each cached position
    weight_bytes: int  # as stored on disk
    runtime_weight_bytes: int  # as held in memory at run time (float32, or the quantized blocks)
    kv_bytes_per_token: int  # K and V cache per token (float32)
    activation_bytes_per_token: int  # hidden state leaving the part


@dataclass(frozen=True)
class Part:
    name: str  # "embed", "layer.<i>", "head"
    files: tuple[str, ...]  # the .onnx graph first, then its external weight data (a tied head: the embed's too)
    cost: PartCost
    #: Bytes of weights the part holds in memory once loaded: quantized blocks as stored, fp16 as float32.
    #: A tied head counts the embedding table it shares, so a segment with both counts it twice.
    runtime_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.runtime_bytes is None:
            object.__setattr__(self, "runtime_bytes", self.cost.runtime_weight_bytes)


@dataclass(frozen=True)
class Manifest:
    name: str
    config: ModelConfig
    dtype: str
    tokenizer: dict[str, Any]
    parts: tuple[Part, ...]
    files: dict[str, FileEntry]
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: for int4/int8: bits, block_size, accuracy_level, symmetric, table_bits (see meshllm.model.quantize)
    quantization: dict[str, Any] | None = None

    # --- parts --------------------------------------------------------

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise ManifestError(f"manifest of {self.name!r} has no part {name!r}")

    def segment_parts(self, start: int, stop: int) -> list[Part]:
        """The parts of layers [start, stop): with the embedding when start == 0, the head when stop == L."""
        n = self.config.n_layers
        if not 0 <= start < stop <= n:
            raise ManifestError(f"layer range [{start}, {stop}) is not within [0, {n}) or is empty")
        parts = [self.part("embed")] if start == 0 else []
        parts += [self.part(f"layer.{i}") for i in range(start, stop)]
        if stop == n:
            parts.append(self.part("head"))
        return parts

    def segment_files(self, start: int, stop: int) -> list[str]:
        files = [f for p in self.segment_parts(start, stop) for f in p.files]
        return files + self.tokenizer_files()

    def tokenizer_files(self) -> list[str]:
        return [self.tokenizer[k] for k in TOKENIZER_FILE_KEYS if self.tokenizer.get(k)]

    def segment_runtime_bytes(self, start: int, stop: int) -> int:
        """Weight bytes a segment holds in memory (the sum of its parts' ``runtime_bytes``)."""
        return sum(int(p.runtime_bytes or 0) for p in self.segment_parts(start, stop))

    @property
    def layer_costs(self) -> list[PartCost]:
        return [self.part(f"layer.{i}").cost for i in range(self.config.n_layers)]

    # --- (de)serialisation -------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "dtype": self.dtype,
            "config": self.config.to_json(),
            "tokenizer": self.tokenizer,
            "quantization": self.quantization,
            "parts": [{"name": p.name, "files": list(p.files), "cost": asdict(p.cost), "runtime_bytes": p.runtime_bytes}
                      for p in self.parts],
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a meshllm model manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ManifestError(
                f"{where}: manifest format version {version} is not supported: it was written by a newer "
                f"meshllm (this one reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); upgrade meshllm"
            )
        if not isinstance(version, int) or isinstance(version, bool) or version < OLDEST_FORMAT_VERSION:
            raise ManifestError(
                f"{where}: manifest format version {version!r} is not supported "
                f"(this meshllm reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); "
                f"re-export the model with this meshllm"
            )
        if d.get("dtype") not in DTYPES:
            raise ManifestError(f"{where}: unknown weight dtype {d.get('dtype')!r} (this meshllm knows "
                                f"{', '.join(DTYPES)})")
        try:
            manifest = cls(
                name=d["name"],
                config=ModelConfig.from_json(d["config"]),
                dtype=d["dtype"],
                tokenizer=d["tokenizer"],
                parts=tuple(
                    Part(p["name"], tuple(p["files"]), PartCost(**p["cost"]), _opt_int(p.get("runtime_bytes")))
                    for p in d["parts"]
                ),
                files={k: FileEntry(**v) for k, v in d["files"].items()},
                source=d.get("source", {}),
                format_version=version,
                quantization=d.get("quantization"),
            )
            if manifest.quantization is not None and not isinstance(manifest.quantization, dict):
                raise TypeError("quantization is not an object")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        manifest.check_names(where)
        return manifest

    def check_names(self, where: str = "manifest") -> None:
        """Every file the manifest names is a safe name (:func:`check_file_name`) and listed in ``files``."""
        if not isinstance(self.tokenizer, dict):
            raise ManifestError(f"{where}: malformed manifest (tokenizer is not an object)")
        for name in self.files:
            check_file_name(name, where)
        for name in [f for p in self.parts for f in p.files] + self.tokenizer_files():
            check_file_name(name, where)
            if name not in self.files:
                raise ManifestError(f"{where}: file {name!r} is used but not listed under 'files'")

    def save(self, model_dir: Path) -> None:
        (model_dir / MANIFEST_NAME).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _opt_int(v: object) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"runtime_bytes {v!r} is not a byte count")
    return v


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


def load_manifest(model_dir: str | Path) -> Manifest:
    """Reads and checks the manifest; does not hash the files (see :func:`verify_files`)."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ManifestError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ManifestError(f"{model_dir} is not a meshllm model directory: {MANIFEST_NAME} is missing "
                            f"(create one with `meshllm export`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object")
    return Manifest.from_json(data, where=str(path))


def verify_files(model_dir: str | Path, manifest: Manifest, files: Iterable[str] | None = None) -> None:
    """Checks presence, size and sha256 of ``files`` (default: all) against the manifest."""
    model_dir = Path(model_dir)
    for name in files if files is not None else manifest.files:
        entry = manifest.files.get(name)
        if entry is None:
            raise ManifestError(f"{model_dir}: file {name!r} is not listed in the manifest")
        path = model_dir / name
        if not path.is_file():
            raise ManifestError(f"{model_dir}: file {name!r} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise ManifestError(f"{model_dir}: file {name!r} has {size} bytes, manifest says {entry.size}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ManifestError(
                f"{model_dir}: file {name!r} does not match its manifest hash "
                f"(sha256 {digest[:12]}…, expected {entry.sha256[:12]}…); the file is corrupt or was changed"
            )
