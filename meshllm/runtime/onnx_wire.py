"""ONNX part graphs merged and retyped at the protobuf wire level, without the ``onnx`` package.

Why: a segment only has to concatenate its part graphs, for a float16 KV cache retype the caches, and
make the head read each row's last true position (batched prompts); each touches a handful of fields.
Importing ``onnx`` for that (with ``ml_dtypes``, protobuf's Python classes and the graph checker) cost
every serving process ~10 MB of resident memory before it held a single weight (docs/inference.md).
Here a message is a list of its wire records; every record this module does not edit (weights'
external-data references, attributes, shapes) is copied byte for byte, and the records it writes are
encoded as ``onnx`` encodes them, so the output is what ``onnx`` would serialize
(``tests/test_memory_runtime.py`` compares the two).

Wire format: a record is a varint key ``field << 3 | wire type`` and a payload (0: varint, 1: 8
bytes, 2: varint length and bytes, 5: 4 bytes). Field numbers below are those of ``onnx.proto``.
It also reads a part's nodes and initializers (names, types, shapes, where external data lies),
which the runtime's embedding lookup needs. This module knows nothing of segments or sessions; it
raises :class:`ModelError` on bytes that are not a protobuf message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from meshllm.errors import ModelError
from meshllm.model.interface import HEAD_LAST_INDEX, SEQLENS_K

# onnx.proto field numbers (the few this module reads or writes)
MODEL_IR_VERSION, MODEL_PRODUCER_NAME, MODEL_GRAPH, MODEL_OPSET_IMPORT = 1, 2, 7, 8
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 2, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 3, 4, 5, 7
TENSOR_NAME = 8
VALUE_INFO_NAME, VALUE_INFO_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_ELEM_TYPE = 1, 1
ATTRIBUTE_NAME, ATTRIBUTE_I, ATTRIBUTE_TYPE = 1, 3, 20
ATTRIBUTE_TYPE_INT = 2
FLOAT, INT64, FLOAT16 = 1, 7, 10  # TensorProto.DataType

MS_DOMAIN = "com.microsoft"
PRODUCER = "meshllm"

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class Record(NamedTuple):
    """One field occurrence: its number, its value (int for varints, bytes otherwise) and its encoding."""

    field: int
    value: int | bytes
    raw: bytes

    @property
    def data(self) -> bytes:
        if not isinstance(self.value, bytes):
            raise ModelError(f"protobuf field {self.field} is a number where a message or string was expected")
        return self.value

    @property
    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"protobuf field {self.field} is not UTF-8 text") from None


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]  # IndexError at the end: a truncated message
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def parse(buf: bytes) -> list[Record]:
    """The records of one message, in order."""
    out: list[Record] = []
    pos, end = 0, len(buf)
    try:
        while pos < end:
            start = pos
            key, pos = _read_varint(buf, pos)
            field, wire = key >> 3, key & 7
            value: int | bytes
            if wire == VARINT:
                value, pos = _read_varint(buf, pos)
            elif wire == LENGTH:
                n, pos = _read_varint(buf, pos)
                value = buf[pos:pos + n]
                pos += n
            elif wire in (FIXED64, FIXED32):
                n = 8 if wire == FIXED64 else 4
                value = buf[pos:pos + n]
                pos += n
            else:
                raise ValueError(f"wire type {wire}")
            if pos > end or field == 0:
                raise ValueError("truncated" if pos > end else "field 0")
            out.append(Record(field, value, buf[start:pos]))
    except (IndexError, ValueError) as e:
        raise ModelError(f"not a protobuf message ({e or 'truncated'})") from None
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(field: int, n: int) -> bytes:
    return _varint(field << 3 | VARINT) + _varint(n)


def length_field(field: int, payload: bytes | str) -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return _varint(field << 3 | LENGTH) + _varint(len(data)) + data


def first(records: Iterable[Record], field: int) -> Record | None:
    return next((r for r in records if r.field == field), None)


def strings(records: Iterable[Record], field: int) -> list[str]:
    return [r.text for r in records if r.field == field]


def name_of(message: bytes, field: int) -> str:
    rec = first(parse(message), field)
    return rec.text if rec is not None else ""


def graph_of(model: Sequence[Record]) -> Record:
    """The graph record of a model's records (:class:`ModelError` if it has none)."""
    g = first(model, MODEL_GRAPH)
    if g is None:
        raise ModelError("an ONNX model without a graph")
    return g


def with_graph(model: Sequence[Record], graph: bytes) -> bytes:
    """The model's records with its graph replaced by ``graph`` (the graph's fields, serialized)."""
    return b"".join(length_field(MODEL_GRAPH, graph) if r.field == MODEL_GRAPH else r.raw for r in model)


# --- merging ------------------------------------------------------------------


def merge(parts: Sequence[bytes], name: str) -> bytes:
    """Part models (serialized ``ModelProto``) concatenated into one; tensors flow by name.

    The graph's inputs are the parts' inputs that no node produces (each once), its outputs the
    last part's first output (hidden states or logits) and every ``present_*``; an initializer
    shared by several parts (the RoPE tables) is kept once. ``ir_version`` and ``opset_import``
    come from the first part."""
    if not parts:
        raise ModelError("no part graphs to merge")
    models = [parse(p) for p in parts]
    graphs = [parse(graph_of(m).data) for m in models]
    nodes = [r for g in graphs for r in g if r.field == GRAPH_NODE]
    produced = {o for n in nodes for o in strings(parse(n.data), NODE_OUTPUT)}
    inits: dict[str, bytes] = {}
    inputs: dict[str, bytes] = {}
    for g in graphs:
        for r in g:
            if r.field == GRAPH_INITIALIZER:
                inits.setdefault(name_of(r.data, TENSOR_NAME), r.raw)
            elif r.field == GRAPH_INPUT:
                n = name_of(r.data, VALUE_INFO_NAME)
                if n not in produced:
                    inputs.setdefault(n, r.raw)
    last_out = first(graphs[-1], GRAPH_OUTPUT)
    if last_out is None:
        raise ModelError("a part graph without outputs")
    presents = [r.raw for g in graphs for r in g
                if r.field == GRAPH_OUTPUT and name_of(r.data, VALUE_INFO_NAME).startswith("present_")]
    graph = b"".join([*(n.raw for n in nodes), length_field(GRAPH_NAME, name), *inits.values(), *inputs.values(),
                      last_out.raw, *presents])
    ir = first(models[0], MODEL_IR_VERSION)
    opsets = [r.raw for r in models[0] if r.field == MODEL_OPSET_IMPORT]
    return b"".join([ir.raw if ir is not None else b"", length_field(MODEL_PRODUCER_NAME, PRODUCER),
                     length_field(MODEL_GRAPH, graph), *opsets])


# --- the KV cache's dtype -----------------------------------------------------


def _node(op: str, inputs: Sequence[str], output: str, name: str, **ints: int) -> bytes:
    """A graph's node record with one output and non-negative integer attributes (a negative one would
    need a 10-byte varint), encoded as ``onnx.helper.make_node`` does (attributes sorted by name, no
    domain field)."""
    attrs = [length_field(NODE_ATTRIBUTE, length_field(ATTRIBUTE_NAME, k) + varint_field(ATTRIBUTE_I, v)
                          + varint_field(ATTRIBUTE_TYPE, ATTRIBUTE_TYPE_INT)) for k, v in sorted(ints.items())]
    node = b"".join([*(length_field(NODE_INPUT, i) for i in inputs), length_field(NODE_OUTPUT, output),
                     length_field(NODE_NAME, name), length_field(NODE_OP_TYPE, op), *attrs])
    return length_field(GRAPH_NODE, node)


def _cast(src: str, dst: str, name: str, to: int) -> bytes:
    return _node("Cast", [src], dst, name, to=to)


def _replace(records: Sequence[Record], field: int, index: int, value: str) -> list[Record]:
    """``records`` with the ``index``-th occurrence of string ``field`` set to ``value``."""
    out, seen = [], 0
    for r in records:
        if r.field == field:
            if seen == index:
                raw = length_field(field, value)
                r = Record(field, value.encode("utf-8"), raw)
            seen += 1
        out.append(r)
    return out


def _retype(value_info: Record, elem_type: int) -> bytes:
    """A graph input/output record with its tensor's element type set to ``elem_type``
    (``ValueInfoProto.type.tensor_type.elem_type``); every other field as it was."""

    def edit(message: bytes, path: tuple[int, ...]) -> bytes:
        out = []
        for r in parse(message):
            if r.field != path[0]:
                out.append(r.raw)
            elif len(path) == 1:
                out.append(varint_field(r.field, elem_type))
            else:
                out.append(length_field(r.field, edit(r.data, path[1:])))
        return b"".join(out)

    return length_field(value_info.field,
                        edit(value_info.data, (VALUE_INFO_TYPE, TYPE_TENSOR, TENSOR_TYPE_ELEM_TYPE)))


def with_float16_kv(model: bytes) -> bytes:
    """The model with its KV caches (``past_*``/``present_*``) float16.

    GroupQueryAttention has one type T for q, k, v, the caches and the cos/sin tables, so a float16
    cache makes the whole operator float16: Casts go in front of its float inputs and one after its
    output; everything else stays float32."""
    records = parse(model)
    graph: list[bytes] = []
    cast: dict[str, str] = {}  # float32 tensor -> its float16 copy (the RoPE tables are shared)
    for r in parse(graph_of(records).data):
        if r.field == GRAPH_NODE:
            node = parse(r.data)
            op, domain = first(node, NODE_OP_TYPE), first(node, NODE_DOMAIN)
            if op is None or op.text != "GroupQueryAttention" or domain is None or domain.text != MS_DOMAIN:
                graph.append(r.raw)
                continue
            ins = strings(node, NODE_INPUT)
            for i in (0, 1, 2, 7, 8):  # query, key, value, cos_cache, sin_cache
                if i < len(ins) and ins[i]:
                    src = ins[i]
                    if src not in cast:
                        cast[src] = src + ".f16"
                        graph.append(_cast(src, cast[src], f"Cast.{src}.f16", FLOAT16))
                    node = _replace(node, NODE_INPUT, i, cast[src])
            out = strings(node, NODE_OUTPUT)[0]
            node = _replace(node, NODE_OUTPUT, 0, out + ".f16")
            graph.append(length_field(GRAPH_NODE, b"".join(n.raw for n in node)))
            graph.append(_cast(out + ".f16", out, f"Cast.{out}.f32", FLOAT))
        elif r.field in (GRAPH_INPUT, GRAPH_OUTPUT) and \
                name_of(r.data, VALUE_INFO_NAME).startswith(("past_", "present_")):
            graph.append(_retype(r, FLOAT16))
        else:
            graph.append(r.raw)
    return with_graph(records, b"".join(graph))


# --- reading a part's nodes and initializers ---------------------------------------

TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 1, 2, 9, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
EXTERNAL = 1  # TensorProto.DataLocation


class Node(NamedTuple):
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    ints: dict[str, int]  # the integer attributes


class Tensor(NamedTuple):
    """An initializer: its name, data type and shape, and where its bytes are (external data only)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str | None  # the external file, relative to the model directory; None: inline data
    offset: int
    length: int


def _ints(records: Iterable[Record], field: int) -> list[int]:
    out: list[int] = []
    for r in records:
        if r.field != field:
            continue
        if isinstance(r.value, int):
            out.append(r.value)
        else:  # packed
            pos = 0
            try:
                while pos < len(r.value):
                    v, pos = _read_varint(r.value, pos)
                    out.append(v)
            except (IndexError, ValueError):
                raise ModelError(f"protobuf field {field}: a truncated packed list") from None
    return out


def read_node(message: bytes) -> Node:
    rec = parse(message)
    ints = {}
    for a in (r for r in rec if r.field == NODE_ATTRIBUTE):
        attr = parse(a.data)
        name, i = first(attr, ATTRIBUTE_NAME), first(attr, ATTRIBUTE_I)
        if name is not None and i is not None and isinstance(i.value, int):
            ints[name.text] = i.value
    op, domain = first(rec, NODE_OP_TYPE), first(rec, NODE_DOMAIN)
    return Node(op.text if op else "", domain.text if domain else "", strings(rec, NODE_INPUT),
                strings(rec, NODE_OUTPUT), ints)


def read_tensor(message: bytes) -> Tensor:
    rec = parse(message)
    name, dtype = first(rec, TENSOR_NAME), first(rec, TENSOR_DATA_TYPE)
    where = first(rec, TENSOR_DATA_LOCATION)
    ext: dict[str, str] = {}
    for e in (r for r in rec if r.field == TENSOR_EXTERNAL_DATA):
        kv = parse(e.data)
        k, v = first(kv, ENTRY_KEY), first(kv, ENTRY_VALUE)
        if k is not None and v is not None:
            ext[k.text] = v.text
    external = where is not None and where.value == EXTERNAL and "location" in ext
    return Tensor(name.text if name else "", int(dtype.value) if dtype and isinstance(dtype.value, int) else 0,
                  tuple(_ints(rec, TENSOR_DIMS)), ext["location"] if external else None,
                  int(ext.get("offset", 0)) if external else 0, int(ext.get("length", -1)) if external else 0)


def graph_contents(model: bytes) -> tuple[list[Node], dict[str, Tensor], list[str], list[str]]:
    """A model's nodes, initializers by name, and the names of its graph's inputs and outputs."""
    rec = parse(graph_of(parse(model)).data)
    nodes = [read_node(r.data) for r in rec if r.field == GRAPH_NODE]
    tensors = {t.name: t for t in (read_tensor(r.data) for r in rec if r.field == GRAPH_INITIALIZER)}
    return (nodes, tensors, [name_of(r.data, VALUE_INFO_NAME) for r in rec if r.field == GRAPH_INPUT],
            [name_of(r.data, VALUE_INFO_NAME) for r in rec if r.field == GRAPH_OUTPUT])


# --- the head's last position, per row -----------------------------------------------


def _int64_tensor(name: str, values: Sequence[int], dims: Sequence[int]) -> bytes:
    """An int64 initializer record with its data in ``raw_data``, encoded as ``onnx.numpy_helper.from_array``
    does."""
    raw = b"".join(v.to_bytes(8, "little", signed=True) for v in values)
    tensor = b"".join([*(varint_field(TENSOR_DIMS, d) for d in dims), varint_field(TENSOR_DATA_TYPE, INT64),
                       length_field(TENSOR_NAME, name), length_field(TENSOR_RAW_DATA, raw)])
    return length_field(GRAPH_INITIALIZER, tensor)


def _row_last(x: str, out: str) -> tuple[list[bytes], list[bytes]]:
    """The nodes and initializers that read ``out = x[b, min(seqlens_k[b], S - 1), :]`` from ``x`` (B, S, D)."""
    p = "head.row_last."
    nodes: list[bytes] = []
    inits: list[bytes] = []

    def const(name: str, values: Sequence[int], dims: Sequence[int] = ()) -> str:
        inits.append(_int64_tensor(p + name, values, dims))
        return p + name

    def node(op: str, inputs: Sequence[str], name: str, output: str = "", **ints: int) -> str:
        nodes.append(_node(op, inputs, output or p + name, p + name, **ints))
        return output or p + name

    shape = node("Shape", [x], "shape")  # (B, S, D)
    s = node("Gather", [shape, const("one_index", [1])], "S", axis=0)
    s1 = node("Sub", [s, const("one", [1])], "S_minus_1")
    seqlens = node("Cast", [SEQLENS_K], "seqlens64", to=INT64)
    row = node("Min", [seqlens, s1], "index")  # (B,)
    index = node("Unsqueeze", [row, const("axes12", [1, 2], [2])], "index3")  # (B, 1, 1)
    b = node("Slice", [shape, const("zero1", [0], [1]), const("one1", [1], [1])], "B")
    one = const("one1b", [1], [1])
    d = node("Slice", [shape, const("two1", [2], [1]), const("three1", [3], [1])], "D")
    dims = node("Concat", [b, one, d], "dims", axis=0)  # (B, 1, D)
    indices = node("Expand", [index, dims], "indices")
    picked = node("GatherElements", [x, indices], "picked", axis=1)  # (B, 1, D)
    node("Squeeze", [picked, const("axis1", [1], [1])], "last", output=out)  # (B, D)
    return nodes, inits


def with_row_last(model: bytes) -> bytes:
    """The model with its head reading, in each row, position ``min(seqlens_k[b], S - 1)`` instead of
    ``S - 1``; a model without the head (no ``Gather`` indexed by ``head.last_index``) is returned as it is.

    The two agree wherever a row has no padding: a decode step (S = 1) and a prompt chunk after earlier
    tokens (``seqlens_k >= S - 1``) read position ``S - 1``, bit for bit. They differ only for new sequences
    prefilled together (:meth:`meshllm.runtime.segment.Segment.prefill_many`): rows padded on the right to
    the longest, each with its true length in ``seqlens_k``, whose last true token is at ``seqlens_k[b]``.
    Done at load, so that model files exported before it serve batched prompts too. The ``Gather`` is
    replaced in place by a ``GatherElements`` and its index computation, the new int64 constants are added
    after the other initializers, and ``head.last_index`` is dropped once nothing reads it: the bytes
    ``onnx`` would serialize for the same edit (``tests/test_memory_runtime.py``)."""
    records = parse(model)
    graph = parse(graph_of(records).data)
    nodes = {i: read_node(r.data) for i, r in enumerate(graph) if r.field == GRAPH_NODE}
    at = next((i for i, n in nodes.items() if n.op_type == "Gather" and len(n.inputs) == 2
               and n.inputs[1] == HEAD_LAST_INDEX), None)
    if at is None:
        return model
    if not nodes[at].outputs:
        raise ModelError("the head's Gather has no output")
    new_nodes, new_inits = _row_last(nodes[at].inputs[0], nodes[at].outputs[0])
    unread = not any(HEAD_LAST_INDEX in n.inputs for i, n in nodes.items() if i != at)
    after = max(i for i, r in enumerate(graph) if r.field <= GRAPH_INITIALIZER)  # where initializers end
    out: list[bytes] = []
    for i, r in enumerate(graph):
        if i == at:
            out.extend(new_nodes)
        elif not (unread and r.field == GRAPH_INITIALIZER and name_of(r.data, TENSOR_NAME) == HEAD_LAST_INDEX):
            out.append(r.raw)
        if i == after:
            out.extend(new_inits)
    return with_graph(records, b"".join(out))
