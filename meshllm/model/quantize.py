"""Weight-only block quantization to onnxruntime's ``MatMulNBits`` and ``GatherBlockQuantized``.

Decode on small CPUs is bound by memory bandwidth, so the bytes of the weights
decide its speed and how many devices a model needs. This module turns the
float weights of a part graph into 4- or 8-bit blocks (numpy only,
deterministic), and rewrites the graph so that onnxruntime runs them without
ever widening them back to float32:

* every ``MatMul`` whose weight is an initializer (possibly behind the ``Cast``
  of an fp16 export) becomes ``com.microsoft.MatMulNBits``;
* the embedding ``Gather`` becomes ``com.microsoft.GatherBlockQuantized``,
  reading the very same bytes as a ``MatMulNBits`` would, so that a tied LM head
  and the embedding share one table on disk.

Layout (``MatMulNBits``, weight ``W`` of the graph is ``(K, N)``, quantized as
``W.T``, blocks along K): data uint8 ``(N, K/block, block*bits/8)`` with two
4-bit values per byte (low nibble first), scales float32 ``(N, K/block)``,
optional zero points uint8 ``(N, ceil(K/block*bits/8))``; without zero points
the kernel uses the midpoint (8 or 128). A block size must divide K: padding
would quantize zeros into the last block and hide a shape error, so it is
refused instead.

Symmetric blocks (no zero points) follow llama.cpp: 4 bits take
``scale = m / -8`` where ``m`` is the block's value of largest magnitude (so
it maps exactly onto -8 and all 16 levels are used), 8 bits
``scale = max|w| / 127``. Asymmetric blocks map ``[min(w, 0), max(w, 0)]``
onto ``[0, 2^bits - 1]`` with a zero point.

int8's scheme (:meth:`QuantSpec.for_dtype`) also answers the rounding of the
activations that the fast kernels (accuracy level 4) quantize to int8 per block,
which cost the bundled model more top-1 agreement with fp32 than its weights:
the down projection's input is rotated by a block Hadamard matrix (its weights
absorb the inverse, exactly), the head's largest logits are recomputed with
float activations, and the layers' blocks get zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshllm.errors import QuantizeError

MS_DOMAIN = "com.microsoft"

#: Quantized dtypes and their bits.
QUANT_DTYPES = {"int4": 4, "int8": 8}
ACCURACY_LEVELS = (1, 4)  # fp32 compute, int8 activations (the fast CPU kernels)
DEFAULT_BLOCK_SIZE = 32
#: The default block size of a model: the first of these that divides every weight's input dimension.
#: Larger blocks run faster on onnxruntime's CPU kernels (one int32-to-float scale step per block):
#: a decode step of the 110M shape took 17 % (int4) and 30 % (int8) less CPU time at 64 than at 32,
#: 128 saved 30 % and 43 %; the bundled model lost little quality at 64 (int4 perplexity +1.76 %
#: instead of +1.50 %, int8 agreement 98.61 % instead of 98.73 %: docs/inference.md). 128 is not
#: a default because its quality could not be measured (the bundled model's width is 192).
DEFAULT_BLOCK_SIZES = (64, DEFAULT_BLOCK_SIZE)
#: How many of the head's largest logits int8 recomputes with float activations (``QuantSpec.head_refine``).
HEAD_REFINE = 8
#: The output name (suffix) of the down projection in meshllm's layer graphs (``graphs.swiglu``).
DOWN_PROJ = ".mlp_out"


def default_block_size(rows: tuple[int, ...]) -> int:
    """The block size for weights with these input dimensions (``DEFAULT_BLOCK_SIZE`` if none fits:
    the caller's check then names the block size that would)."""
    return next((b for b in DEFAULT_BLOCK_SIZES if all(k % b == 0 for k in rows)), DEFAULT_BLOCK_SIZE)


@dataclass(frozen=True)
class QuantSpec:
    """How a model is quantized; recorded in the manifest.

    ``table_bits`` is for the embedding table and the LM head (which share one
    table when the embeddings are tied); ``bits`` for every other projection.
    """

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4
    symmetric: bool = True
    table_bits: int | None = None
    #: Rotate the down projection's input by a Hadamard matrix within each block (see
    #: :func:`hadamard`): its int8 activation blocks then lose less.
    ffn_hadamard: bool = False
    #: Recompute the head's ``head_refine`` largest logits with float activations (0: off).
    head_refine: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.table_bits not in (None, 4, 8):
            raise QuantizeError(f"bits must be 4 or 8, got {self.bits}/{self.table_bits}")
        if isinstance(self.head_refine, bool) or not isinstance(self.head_refine, int) or self.head_refine < 0:
            raise QuantizeError(f"head_refine must be a count >= 0, got {self.head_refine!r}")
        check_block_size(self.block_size)
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise QuantizeError(f"--accuracy-level must be one of {ACCURACY_LEVELS} (1 = fp32 compute, "
                                f"4 = int8 activations), got {self.accuracy_level}")

    @property
    def head_bits(self) -> int:
        return self.table_bits or self.bits

    @classmethod
    def for_dtype(cls, dtype: str, block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = 4) -> QuantSpec:
        """The scheme meshllm uses for ``dtype`` (chosen by measurement: docs/inference.md).

        int8 with int8 activations (accuracy level 4) rotates the down projection's input, refines
        the head's top logits and gives the layers' blocks zero points: together they took its top-1
        agreement with fp32 from 98.59 % to 99.06 % on the bundled model for ~3 % of a decode step's
        kernel time, 2-4 % more peak memory and a ~9 % slower prefill (110M shape; docs/inference.md)."""
        if dtype not in QUANT_DTYPES:
            raise QuantizeError(f"{dtype!r} is not a quantized dtype (choose from {', '.join(QUANT_DTYPES)})")
        tuned = dtype == "int8" and accuracy_level == 4
        return cls(QUANT_DTYPES[dtype], block_size, accuracy_level, symmetric=not tuned, table_bits=None,
                   ffn_hadamard=tuned, head_refine=HEAD_REFINE if tuned else 0)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "symmetric": self.symmetric, "table_bits": self.head_bits, "ffn_hadamard": self.ffn_hadamard,
                "head_refine": self.head_refine}


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise QuantizeError(f"--block-size must be a power of two >= 16 (onnxruntime's MatMulNBits), "
                            f"got {block_size!r}")


# --- blocks ----------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """A float matrix ``(N, K)`` quantized in blocks along K, in ``MatMulNBits`` layout."""

    data: np.ndarray  # uint8 (N, K / block_size, block_size * bits / 8)
    scales: np.ndarray  # float32 (N, K / block_size)
    zero_points: np.ndarray | None  # uint8 (N, ceil(n_blocks * bits / 8)), or None: the midpoint
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.data.shape[1] * self.block_size

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def _pack4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, the first in the low nibble."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(p: np.ndarray, n: int) -> np.ndarray:
    q = np.empty((*p.shape[:-1], p.shape[-1] * 2), np.uint8)
    q[..., 0::2], q[..., 1::2] = p & 0x0F, p >> 4
    return q[..., :n]


def hadamard(n: int) -> np.ndarray:
    """Sylvester's ``n x n`` matrix of +-1 (``n`` a power of two), ``H @ H.T = n I``.

    Why: ``x @ W == (x @ H) @ (H.T @ W / n)`` exactly, and ``x @ H`` spreads each block's
    few large values over the whole block. The SwiGLU product feeding the down projection
    is heavy-tailed, so a block's int8 scale (its largest value / 127) is coarse for the
    rest; rotated, the block is near Gaussian and rounds with less error."""
    if n < 1 or n & (n - 1):
        raise QuantizeError(f"a Hadamard matrix needs a power of two, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rotate_rows(w: np.ndarray, block_size: int) -> np.ndarray:
    """``W`` (K, N) for inputs rotated by :func:`hadamard` in blocks of ``block_size``:
    ``blockdiag(H).T @ W / block_size`` (exact in float64, then float32)."""
    k = w.shape[0]
    if k % block_size:
        raise QuantizeError(f"block size {block_size} does not divide the {k} rows of a weight matrix")
    h = hadamard(block_size).astype(np.float64)
    blocks = np.asarray(w, np.float64).reshape(k // block_size, block_size, -1)
    return (np.einsum("ji,bjn->bin", h, blocks) / block_size).reshape(w.shape).astype(np.float32)


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> Blocks:
    """Quantizes ``w`` (N, K) in blocks of ``block_size`` along K."""
    check_block_size(block_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise QuantizeError(f"can only quantize matrices, got shape {w.shape}")
    n, k = w.shape
    if k % block_size:
        divisors = [b for b in (16, 32, 64, 128, 256) if k % b == 0]
        raise QuantizeError(f"block size {block_size} does not divide the {k} rows of a weight matrix "
                            f"(use --block-size {divisors[-1] if divisors else '...'}"
                            f"{'' if divisors else ': none of 16..256 divides it'})")
    blocks = w.reshape(n, k // block_size, block_size)
    levels = (1 << bits) - 1
    zp: np.ndarray | None
    if symmetric:
        if bits == 4:  # the value of largest magnitude maps exactly onto -8
            idx = np.abs(blocks).argmax(axis=-1)[..., None]
            scale = np.take_along_axis(blocks, idx, axis=-1)[..., 0] / -8.0
        else:
            scale = np.abs(blocks).max(axis=-1) / 127.0
        mid = np.full(scale.shape, 1 << (bits - 1), np.float32)
        zp = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / levels
        mid = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, levels).astype(np.float32)
        zp = mid.astype(np.uint8)
    scale = scale.astype(np.float32)
    inv = np.where(scale == 0, 0.0, 1.0 / np.where(scale == 0, 1.0, scale)).astype(np.float32)
    q = np.clip(np.round(blocks * inv[..., None]) + mid[..., None], 0, levels).astype(np.uint8)
    if bits == 4:
        q = _pack4(q)
        if zp is not None:
            zp = _pack4(zp)
    return Blocks(np.ascontiguousarray(q), scale, zp, bits, block_size)


def dequantize_blocks(b: Blocks) -> np.ndarray:
    """The float32 matrix (N, K) that ``b`` stands for: the reference the kernels must match."""
    n, nb = b.scales.shape
    q = _unpack4(b.data, b.block_size) if b.bits == 4 else b.data
    if b.zero_points is None:
        zp = np.full((n, nb), 1 << (b.bits - 1), np.float32)
    else:
        zp = (_unpack4(b.zero_points, nb) if b.bits == 4 else b.zero_points).astype(np.float32)
    return ((q.astype(np.float32) - zp[..., None]) * b.scales[..., None]).reshape(n, nb * b.block_size)


# --- graph rewrite -----------------------------------------------------------


@dataclass
class SharedTable:
    """The quantized embedding table of a model, for a tied head to read the same bytes."""

    source: np.ndarray  # float32 (V, D) it was made from
    blocks: Blocks
    names: tuple[str, ...]  # data, scales[, zero points] initializer names

    def tensors(self) -> list[TensorProto]:
        arrays = [self.blocks.data, self.blocks.scales]
        if self.blocks.zero_points is not None:
            arrays.append(self.blocks.zero_points)
        return [numpy_helper.from_array(a, n) for a, n in zip(arrays, self.names, strict=True)]


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node)


class _Rewriter:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in g.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1
        self.new_inits: list[TensorProto] = []
        self.dropped_inits: set[str] = set()
        self.dropped_nodes: set[str] = set()  # by first output

    def weight(self, name: str) -> tuple[str, np.ndarray] | None:
        """(initializer name, float32 array) behind ``name``: an initializer or a Cast of one to float."""
        if name in self.inits:
            t = self.inits[name]
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                return name, numpy_helper.to_array(t).astype(np.float32)
            return None
        node = self.producer.get(name)
        if node is not None and node.op_type == "Cast" and node.input[0] in self.inits:
            found = self.weight(node.input[0])
            if found is not None and self.consumers.get(name) == 1:
                self.dropped_nodes.add(node.output[0])
                return found
        return None

    def drop(self, init: str) -> None:
        if self.consumers.get(init, 0) <= 1:
            self.dropped_inits.add(init)

    def add(self, name: str, arr: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def add_blocks(self, base: str, b: Blocks) -> tuple[str, ...]:
        names = [self.add(f"{base}.q{b.bits}", b.data), self.add(f"{base}.scales", b.scales)]
        if b.zero_points is not None:
            names.append(self.add(f"{base}.zp", b.zero_points))
        return tuple(names)

    def matmul_nbits(self, node: onnx.NodeProto, names: tuple[str, ...], b: Blocks, spec: QuantSpec,
                     out: str | None = None) -> onnx.NodeProto:
        n, k = b.shape
        outputs = [out] if out is not None else list(node.output)
        return helper.make_node("MatMulNBits", [node.input[0], *names], outputs, name=node.name + ".nbits",
                                domain=MS_DOMAIN, K=k, N=n, bits=b.bits, block_size=b.block_size,
                                accuracy_level=spec.accuracy_level)

    def rotate_input(self, node: onnx.NodeProto, block_size: int, nodes: list[onnx.NodeProto]) -> str:
        """Appends ``x @ blockdiag(H)`` of ``node``'s input to ``nodes`` (3 nodes); returns its name.
        The matrix and shapes are named by block size only, so the layers of a segment share them."""
        x, base = node.input[0], node.name
        h = f"hadamard.{block_size}"
        if h not in {t.name for t in self.new_inits}:
            self.add(h, hadamard(block_size))
            self.add(h + ".blocks", np.array([0, 0, -1, block_size], np.int64))
            self.add(h + ".rows", np.array([0, 0, -1], np.int64))
        nodes.append(helper.make_node("Reshape", [x, h + ".blocks"], [base + ".blocks"], name=base + ".blocks"))
        nodes.append(helper.make_node("MatMul", [base + ".blocks", h], [base + ".rotated"], name=base + ".hadamard"))
        nodes.append(helper.make_node("Reshape", [base + ".rotated", h + ".rows"], [base + ".x"], name=base + ".rows"))
        return base + ".x"

    def refined_head(self, node: onnx.NodeProto, names: tuple[str, ...], b: Blocks,
                     spec: QuantSpec) -> list[onnx.NodeProto]:
        """The head's ``MatMulNBits``, then its ``spec.head_refine`` largest logits per row
        recomputed from the same blocks with float activations.

        Why: a token's top-1 is decided among the few largest logits, which are often close in a
        small model; rounding the activations to int8 flips such near-ties. Gathering k rows and
        a (k x D) float product cost little beside the (V x D) head."""
        n = b.shape[0]
        x, out, base = node.input[0], node.output[0], node.name
        approx = base + ".approx"
        kk = self.add(base + ".k", np.array([min(spec.head_refine, n)], np.int64))
        scales3 = base + ".scales3"
        minus1 = self.add(base + ".axis", np.array([-1], np.int64))
        rows_shape = self.add(base + ".rows_shape", np.array([0, 0, -1], np.int64))
        return [
            self.matmul_nbits(node, names, b, spec, out=approx),
            helper.make_node("TopK", [approx, kk], [base + ".top", base + ".ids"], name=base + ".topk", axis=-1),
            helper.make_node("Unsqueeze", [names[1], minus1], [scales3], name=base + ".unsqueeze"),
            helper.make_node("GatherBlockQuantized", [names[0], base + ".ids", scales3], [base + ".rows3"],
                             name=base + ".gbq", domain=MS_DOMAIN, bits=b.bits, block_size=b.block_size,
                             gather_axis=0, quantize_axis=2),
            helper.make_node("Reshape", [base + ".rows3", rows_shape], [base + ".rows"], name=base + ".rows"),  # B,k,D
            helper.make_node("Unsqueeze", [x, minus1], [base + ".col"], name=base + ".col"),  # (B, D, 1)
            helper.make_node("MatMul", [base + ".rows", base + ".col"], [base + ".exact3"], name=base + ".exact"),
            helper.make_node("Squeeze", [base + ".exact3", minus1], [base + ".exact_top"], name=base + ".squeeze"),
            helper.make_node("ScatterElements", [approx, base + ".ids", base + ".exact_top"], [out],
                             name=base + ".scatter", axis=-1),
        ]


def quantize_part(model: onnx.ModelProto, spec: QuantSpec, part: str,
                  table: SharedTable | None = None) -> tuple[onnx.ModelProto, SharedTable | None]:
    """A copy of part graph ``model`` (weights loaded) with its weights quantized.

    ``part`` is "embed", "head" or "layer.<i>": the embedding table and the head use
    ``spec.head_bits``. Returns the new graph and, for the embedding, the quantized
    table; pass that table back for the head: if the head's weight is the same
    matrix (tied embeddings), the head reads the table's initializers (same names)
    instead of holding its own.
    """
    if is_quantized(model):
        raise QuantizeError(f"part {part!r} is already quantized")
    rw = _Rewriter(model)
    nodes: list[onnx.NodeProto] = []
    made: SharedTable | None = None
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if node.op_type == "MatMul" and (w := rw.weight(node.input[1])) is not None:
            init, arr = w  # (K, N)
            bits = spec.head_bits if part == "head" else spec.bits
            if spec.ffn_hadamard and node.output[0].endswith(DOWN_PROJ):
                arr = rotate_rows(arr, spec.block_size)
                node.input[0] = rw.rotate_input(node, spec.block_size, nodes)
            if table is not None and part == "head" and table.source.shape == arr.T.shape \
                    and np.array_equal(table.source, arr.T):
                names, blocks = table.names, table.blocks
                rw.new_inits.extend(table.tensors())
                made = table
            else:  # a refined head gathers its rows like the embedding: symmetric blocks
                symmetric = spec.symmetric or (part == "head" and spec.head_refine > 0)
                blocks = quantize_blocks(arr.T, bits, spec.block_size, symmetric)
                names = rw.add_blocks(init, blocks)
            rw.drop(init)
            if part == "head" and spec.head_refine:
                nodes.extend(rw.refined_head(node, names, blocks, spec))
            else:
                nodes.append(rw.matmul_nbits(node, names, blocks, spec))
        elif node.op_type == "Gather" and part == "embed" and (w := rw.weight(node.input[0])) is not None:
            init, arr = w  # (V, D)
            blocks = quantize_blocks(arr, spec.head_bits, spec.block_size, symmetric=True)
            names = rw.add_blocks(init, blocks)
            made = SharedTable(arr, blocks, names)
            rw.drop(init)
            # (V, nb, bytes) gathered by rows, blocks along the last axis: scales need a trailing 1
            scales3 = node.name + ".scales3"
            axis = rw.add(node.name + ".axis", np.array([-1], np.int64))
            nodes.append(helper.make_node("Unsqueeze", [names[1], axis], [scales3], name=node.name + ".unsqueeze"))
            gathered = node.name + ".blocks"
            nodes.append(helper.make_node("GatherBlockQuantized", [names[0], node.input[1], scales3], [gathered],
                                          name=node.name + ".gbq", domain=MS_DOMAIN, bits=blocks.bits,
                                          block_size=blocks.block_size, gather_axis=0, quantize_axis=2))
            nodes.append(helper.make_node("Reshape", [gathered, rw.add(node.name + ".shape",
                                                                       np.array([0, 0, -1], np.int64))],
                                          list(node.output), name=node.name + ".reshape"))
        else:
            nodes.append(node)
    nodes = [n for n in nodes if n.output[0] not in rw.dropped_nodes]
    # what stays float (norms, biases) is stored as float32: a quantized graph has no Cast left
    kept: list[TensorProto] = []
    upcast: dict[str, str] = {}
    for t in model.graph.initializer:
        if t.name in rw.dropped_inits:
            continue
        if t.data_type == TensorProto.FLOAT16:
            t = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
            upcast[t.name] = t.name
        kept.append(t)
    final: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    for n in nodes:
        if n.op_type == "Cast" and n.input[0] in upcast:
            rename[n.output[0]] = n.input[0]
            continue
        final.append(n)
    for n in final:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    graph = helper.make_graph(final, model.graph.name, list(model.graph.input), list(model.graph.output),
                              initializer=kept + rw.new_inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    return out, made


def initializer_bytes(model: onnx.ModelProto, *, skip_prefix: tuple[str, ...] = ("rope.",)) -> int:
    """Bytes of the part's initializers as held at run time (fp16 is upcast to float32 at load)."""
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith(skip_prefix):
            continue
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        item = {TensorProto.FLOAT16: 4, TensorProto.UINT8: 1, TensorProto.INT64: 8}.get(t.data_type, 4)
        total += n * item
    return total
