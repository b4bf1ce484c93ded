"""The embedding lookup done by the runtime: the rows of a step's tokens read from the model file, never the table.

Why: inside an onnxruntime session the table ends up resident. A quantized table tied to the head is
read whole when the head's ``MatMulNBits`` prepacks its copy, and stays mapped for the embedding's
``GatherBlockQuantized`` (13 MB more for the 110M shape at int4, on top of the head's copy); a float16
table is widened to a float32 copy at load; a float32 table is mapped and every page a token touches
(with the kernel's fault-around, 64 KB around it) stays in the process. Here a step reads its rows with
``pread`` (a few hundred bytes to a few KB each) and widens them in numpy, so the table lives only in the
page cache (shared, and given back under memory pressure like any clean file page) and the process holds
nothing of it. A decode step reads one row per sequence; a 128-token prefill chunk 128.

Recognized embedding graphs (what meshllm exports): ``Gather`` of a float32 table, ``Gather`` of the
``Cast`` of a float16 table, and ``GatherBlockQuantized`` of 4- or 8-bit blocks along the rows without
zero points (quantize axis 2, scales through an ``Unsqueeze``) followed by a ``Reshape``. For anything
else (a table stored inside the graph file, another form) :func:`runtime_embedding` returns None and
the segment keeps the embedding in its session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshllm.errors import GenerationError, ModelError
from meshllm.model import interface
from meshllm.runtime import onnx_wire

FLOAT, UINT8, FLOAT16 = 1, 2, 10  # TensorProto.DataType
ITEMSIZE = {FLOAT: 4, UINT8: 1, FLOAT16: 2}


@dataclass(frozen=True)
class TableLayout:
    """Where the rows of an embedding table are in its file and how to widen them to float32."""

    file: str  # relative to the model directory
    rows: int
    dim: int
    offset: int  # of row 0
    row_bytes: int
    dtype: str  # "fp32", "fp16", or "blocks"
    bits: int = 0  # blocks: 4 or 8 bits a value, ``block_size`` values a block, one float32 scale a block
    block_size: int = 0
    scales_file: str = ""
    scales_offset: int = 0


def _external(t: onnx_wire.Tensor | None, data_type: int, ndim: int) -> onnx_wire.Tensor | None:
    if t is None or t.location is None or t.data_type != data_type or len(t.dims) != ndim:
        return None
    size = int(np.prod(t.dims)) * ITEMSIZE[data_type]
    return t if t.length in (-1, size) else None


def table_layout(graph: bytes, dim: int) -> TableLayout | None:
    """The layout of the table an embedding graph gathers from, if it is one of the recognized forms."""
    nodes, tensors, inputs, outputs = onnx_wire.graph_contents(graph)
    if inputs != [interface.INPUT_IDS] or outputs != [interface.HIDDEN]:
        return None
    by_output = {o: n for n in nodes for o in n.outputs}
    ops = sorted(n.op_type for n in nodes)
    if ops in (["Gather"], ["Cast", "Gather"]):
        gather = by_output[interface.HIDDEN]
        src = gather.inputs[0]
        cast = by_output.get(src)
        if gather.inputs[1:] != [interface.INPUT_IDS] or gather.ints.get("axis", 0) != 0:
            return None
        if cast is not None and (cast.op_type != "Cast" or cast.ints.get("to") != FLOAT):
            return None
        t = _external(tensors.get(cast.inputs[0] if cast is not None else src),
                      FLOAT16 if cast is not None else FLOAT, 2)
        if t is None or t.dims[1] != dim:
            return None
        item = ITEMSIZE[t.data_type]
        return TableLayout(t.location or "", t.dims[0], dim, t.offset, dim * item,
                           "fp16" if t.data_type == FLOAT16 else "fp32")
    if ops == ["GatherBlockQuantized", "Reshape", "Unsqueeze"]:
        gbq = next(n for n in nodes if n.op_type == "GatherBlockQuantized")
        unsq = by_output.get(gbq.inputs[2]) if len(gbq.inputs) == 3 else None
        bits, block = gbq.ints.get("bits", 4), gbq.ints.get("block_size", 128)
        if (unsq is None or unsq.op_type != "Unsqueeze" or gbq.inputs[1] != interface.INPUT_IDS
                or gbq.ints.get("gather_axis", 0) != 0 or gbq.ints.get("quantize_axis") != 2
                or bits not in (4, 8) or by_output[interface.HIDDEN].op_type != "Reshape"):
            return None
        data, scales = _external(tensors.get(gbq.inputs[0]), UINT8, 3), _external(tensors.get(unsq.inputs[0]), FLOAT, 2)
        if data is None or scales is None:
            return None
        rows, nb, nbytes = data.dims
        if scales.dims != (rows, nb) or nbytes * 8 != block * bits or nb * block != dim:
            return None
        return TableLayout(data.location or "", rows, dim, data.offset, nb * nbytes, "blocks", bits, block,
                           scales.location or "", scales.offset)
    return None


class EmbeddingRows:
    """``ids (B, S) -> float32 (B, S, dim)``, reading only the rows of ``ids`` from the table's file."""

    def __init__(self, model_dir: Path, layout: TableLayout) -> None:
        self.layout = layout
        self._fds: dict[str, int] = {}
        # a byte's values minus the midpoint (no zero points: the kernel's default), low nibble first, as one
        # 8- or 4-byte item per byte: a 1-D lookup (numpy's fast path) widens a row
        b = np.arange(256)
        mid = 1 << (layout.bits - 1) if layout.bits else 0
        levels = (np.stack([b & 0x0F, b >> 4], axis=1) if layout.bits == 4 else b[:, None]).astype(np.float32) - mid
        self._levels = np.ascontiguousarray(levels).view(np.uint64 if layout.bits == 4 else np.uint32).reshape(256)
        try:
            for f in {layout.file, layout.scales_file} - {""}:
                self._fds[f] = os.open(model_dir / f, os.O_RDONLY)
            need = {layout.file: layout.offset + layout.rows * layout.row_bytes}
            if layout.dtype == "blocks":
                nb = layout.dim // layout.block_size
                need[layout.scales_file] = max(need.get(layout.scales_file, 0),
                                               layout.scales_offset + layout.rows * nb * 4)
            for f, n in need.items():
                if os.fstat(self._fds[f]).st_size < n:
                    raise ModelError(f"{model_dir / f}: shorter than the embedding table it holds ({n} bytes)")
        except OSError as e:
            self.close()
            raise ModelError(f"{model_dir}: cannot read the embedding table ({e})") from None
        except ModelError:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        self.close()

    def _read(self, file: str, offset: int, stride: int, ids: np.ndarray) -> bytes:
        fd = self._fds[file]
        raw = b"".join([os.pread(fd, stride, offset + i * stride) for i in ids.tolist()])
        if len(raw) != stride * ids.size:
            raise GenerationError(f"{file}: the embedding table's file was truncated while in use")
        return raw

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        lay = self.layout
        flat = ids.reshape(-1)
        raw = self._read(lay.file, lay.offset, lay.row_bytes, flat)
        if lay.dtype == "fp32":
            rows = np.frombuffer(raw, "<f4").copy()
        elif lay.dtype == "fp16":
            rows = np.frombuffer(raw, "<f2").astype(np.float32)
        else:
            nb = lay.dim // lay.block_size
            scales = np.frombuffer(self._read(lay.scales_file, lay.scales_offset, nb * 4, flat), "<f4")
            values = self._levels[np.frombuffer(raw, np.uint8)].view(np.float32)  # exact small integers
            rows = values.reshape(flat.size, nb, lay.block_size) * scales.reshape(flat.size, nb, 1)
        return rows.reshape(*ids.shape, lay.dim)


def runtime_embedding(model_dir: Path, graph_file: str, dim: int) -> EmbeddingRows | None:
    """The runtime's lookup for the embedding part in ``graph_file``, or None to keep it in the session."""
    try:
        layout = table_layout((model_dir / graph_file).read_bytes(), dim)
    except (OSError, ModelError) as e:
        raise ModelError(f"{model_dir / graph_file}: not a readable ONNX graph ({e})") from None
    return None if layout is None else EmbeddingRows(model_dir, layout)
