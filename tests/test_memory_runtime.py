"""What a serving process holds: no ``onnx`` import, part graphs merged at the wire level as onnx would.

A segment merges its part graphs (and retypes a float16 KV cache, and rewrites the head to read each row's
last true position) with :mod:`meshllm.runtime.onnx_wire` instead of the ``onnx`` package, whose import cost
every serving process ~10 MB before it held a weight. The merged bytes are checked against the ``onnx``
implementations the runtime used before (kept here as the oracles), for float and quantized models; a fresh
process that loads a segment and runs steps must not import ``onnx`` at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from meshllm.errors import ModelError
from meshllm.model import graphs
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights
from meshllm.model.manifest import load_manifest
from meshllm.runtime import onnx_wire
from meshllm.runtime.segment import Segment, merge_parts
from tests.serving_harness import random_exports

ROOT = Path(__file__).resolve().parent.parent
_TINY = make_llama2c_config(16, 32, 1, 2, 1, 32, 8, shared_classifier=True)
#: a small real part graph (one layer, weights inline) for the damaged-bytes property
GRAPH = graphs.build_layer(_TINY, random_llama2c_weights(_TINY, seed=1), 0, "fp32").SerializeToString()
#: and a head graph, which the per-row rewrite edits
HEAD = graphs.build_head(_TINY, random_llama2c_weights(_TINY, seed=1), "fp32").SerializeToString()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mem")
    return random_exports(root, ("fp32", "fp16", "int4", "int8"), layers=3, seed=7)


# --- the oracle: the onnx-based merge and KV retyping the runtime used before ------------------------


def onnx_merge(model_dir: Path, files: list[str], name: str) -> onnx.ModelProto:
    protos = [onnx.load(str(model_dir / f), load_external_data=False) for f in files]
    nodes = [n for p in protos for n in p.graph.node]
    produced = {o for n in nodes for o in n.output}
    inits: dict[str, onnx.TensorProto] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    for p in protos:
        for t in p.graph.initializer:
            inits.setdefault(t.name, t)
        for vi in p.graph.input:
            if vi.name not in produced:
                inputs.setdefault(vi.name, vi)
    last_out = protos[-1].graph.output[0]
    presents = [vi for p in protos for vi in p.graph.output if vi.name.startswith("present_")]
    graph = helper.make_graph(nodes, name, list(inputs.values()), [last_out, *presents],
                              initializer=list(inits.values()))
    model = helper.make_model(graph, opset_imports=protos[0].opset_import, producer_name="meshllm")
    model.ir_version = protos[0].ir_version
    return model


def onnx_float16_kv(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    caches = {vi.name for vi in (*g.input, *g.output) if vi.name.startswith(("past_", "present_"))}
    cast: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft":
            for i in (0, 1, 2, 7, 8):
                if i < len(n.input) and n.input[i]:
                    src = n.input[i]
                    if src not in cast:
                        cast[src] = src + ".f16"
                        nodes.append(helper.make_node("Cast", [src], [cast[src]], name=f"Cast.{src}.f16",
                                                      to=TensorProto.FLOAT16))
                    n.input[i] = cast[src]
            out = n.output[0]
            n.output[0] = out + ".f16"
            nodes.append(n)
            nodes.append(helper.make_node("Cast", [n.output[0]], [out], name=f"Cast.{out}.f32", to=TensorProto.FLOAT))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for vi in (*g.input, *g.output):
        if vi.name in caches:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def onnx_row_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """The head's last-position Gather replaced by a per-row GatherElements at ``min(seqlens_k, S - 1)``."""
    g = model.graph
    at = next((i for i, n in enumerate(g.node) if n.op_type == "Gather" and len(n.input) == 2
               and n.input[1] == graphs.HEAD_LAST_INDEX), None)
    if at is None:
        return model
    old = g.node[at]
    x, out, p = old.input[0], old.output[0], "head.row_last."

    def const(name: str, arr: np.ndarray) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(arr), p + name))
        return p + name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        new.append(helper.make_node(op, inputs, [p + name], name=p + name, **attrs))
        return p + name

    new: list[onnx.NodeProto] = []
    shape = node("Shape", [x], "shape")  # (B, S, D)
    s1 = node("Sub", [node("Gather", [shape, const("one_index", np.array(1, np.int64))], "S", axis=0),
                      const("one", np.array(1, np.int64))], "S_minus_1")
    row = node("Min", [node("Cast", [graphs.SEQLENS_K], "seqlens64", to=TensorProto.INT64), s1], "index")  # (B,)
    index = node("Unsqueeze", [row, const("axes12", np.array([1, 2], np.int64))], "index3")  # (B, 1, 1)
    dims = node("Concat", [node("Slice", [shape, const("zero1", np.array([0], np.int64)),
                                          const("one1", np.array([1], np.int64))], "B"),
                           const("one1b", np.array([1], np.int64)),
                           node("Slice", [shape, const("two1", np.array([2], np.int64)),
                                          const("three1", np.array([3], np.int64))], "D")], "dims", axis=0)
    picked = node("GatherElements", [x, node("Expand", [index, dims], "indices")], "picked", axis=1)  # (B, 1, D)
    new.append(helper.make_node("Squeeze", [picked, const("axis1", np.array([1], np.int64))], [out],
                                name=p + "last"))  # (B, D)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:at] + new + nodes[at + 1:])
    if not any(graphs.HEAD_LAST_INDEX in n.input for n in g.node):
        kept = [t for t in g.initializer if t.name != graphs.HEAD_LAST_INDEX]
        del g.initializer[:]
        g.initializer.extend(kept)
    return model


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int4", "int8"])
@pytest.mark.parametrize("span", [(0, 3), (0, 1), (1, 2), (1, 3), (2, 3)])
def test_wire_merge_equals_the_onnx_merge_byte_for_byte(models: Path, dtype: str, span: tuple[int, int]) -> None:
    model_dir = models / dtype
    parts = load_manifest(model_dir).segment_parts(*span)
    files = [p.files[0] for p in parts]
    name = f"segment_{span[0]}_{span[1]}"
    want = onnx_merge(model_dir, files, name)
    got = merge_parts(model_dir, files, name)
    assert got == want.SerializeToString()
    assert onnx_wire.with_float16_kv(got) == onnx_float16_kv(want).SerializeToString()
    assert onnx_wire.with_float16_kv(got) != got


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
@pytest.mark.parametrize("span", [(0, 3), (2, 3), (0, 2)])
def test_wire_row_last_equals_the_onnx_rewrite_byte_for_byte(models: Path, dtype: str, span: tuple[int, int]) -> None:
    """A merged graph with the head gets the per-row head (float32 and float16 caches); one without is left as
    it is."""
    model_dir = models / dtype
    files = [p.files[0] for p in load_manifest(model_dir).segment_parts(*span)]
    name = f"segment_{span[0]}_{span[1]}"
    got = merge_parts(model_dir, files, name)
    assert onnx_wire.with_row_last(got) == onnx_row_last(onnx_merge(model_dir, files, name)).SerializeToString()
    f16 = onnx_wire.with_float16_kv(got)
    assert onnx_wire.with_row_last(f16) == \
        onnx_row_last(onnx_float16_kv(onnx_merge(model_dir, files, name))).SerializeToString()
    has_head = span[1] == 3
    assert (onnx_wire.with_row_last(got) != got) == has_head
    if has_head:  # the index is gone and the rewrite is done once
        rewritten = onnx_wire.with_row_last(got)
        _, inits, _, _ = onnx_wire.graph_contents(rewritten)
        assert graphs.HEAD_LAST_INDEX in onnx_wire.graph_contents(got)[1] and graphs.HEAD_LAST_INDEX not in inits
        assert onnx_wire.with_row_last(rewritten) == rewritten


def test_wire_row_last_keeps_the_index_another_node_reads(models: Path) -> None:
    model_dir = models / "fp32"
    files = [p.files[0] for p in load_manifest(model_dir).segment_parts(2, 3)]
    model = onnx_merge(model_dir, files, "x")
    model.graph.node.append(helper.make_node("Identity", [graphs.HEAD_LAST_INDEX], ["still_read"], name="reader"))
    got = onnx_wire.with_row_last(model.SerializeToString())
    assert got == onnx_row_last(model).SerializeToString()
    assert graphs.HEAD_LAST_INDEX in onnx_wire.graph_contents(got)[1]


def test_a_file_that_is_not_a_graph_is_refused_with_its_name(models: Path, tmp_path: Path) -> None:
    (tmp_path / "layer_000.onnx").write_bytes(b"\x0a\xff\xff")  # a length beyond the end
    with pytest.raises(ModelError, match="layer_000.onnx: not a readable ONNX graph"):
        merge_parts(tmp_path, ["layer_000.onnx"], "x")
    (tmp_path / "x.onnx").write_bytes(b"\x08\x07")  # a message, but no graph in it
    with pytest.raises(ModelError, match="cannot merge"):
        merge_parts(tmp_path, ["x.onnx"], "x")
    # a graph whose node output name is not UTF-8
    node = onnx_wire.length_field(onnx_wire.GRAPH_NODE, onnx_wire.length_field(onnx_wire.NODE_OUTPUT, b"\xff\xfe"))
    (tmp_path / "y.onnx").write_bytes(onnx_wire.length_field(onnx_wire.MODEL_GRAPH, node))
    with pytest.raises(ModelError, match="not UTF-8"):
        merge_parts(tmp_path, ["y.onnx"], "y")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 199), st.binary(max_size=8))
def test_damaged_graph_bytes_give_a_model_error_or_a_model_never_another_exception(
        junk: bytes, cut: int, splice: bytes) -> None:
    # random bytes, and a real part graph spliced or cut short
    for data in (junk, GRAPH[:cut] + splice + GRAPH[cut:], GRAPH[:cut], HEAD[:cut] + splice + HEAD[cut:]):
        for fn in (lambda d: onnx_wire.merge([d], "x"), lambda d: onnx_wire.with_float16_kv(d),
                   onnx_wire.graph_contents, onnx_wire.with_row_last):
            try:
                out = fn(data)
            except ModelError:
                continue
            assert out is not None


def test_the_package_builds_graphs_with_the_interface_the_runtime_names(models: Path) -> None:
    # graphs re-exports the interface: exported files and the runtime agree on tensor names
    assert graphs.hidden_out(2) == "hidden.3" and graphs.KV_DTYPES["fp16"] is np.float16


SERVE = """
import json, sys
import numpy as np
from meshllm.runtime.segment import Segment
seg = Segment(sys.argv[1], max_seq_len=64, kv_dtype=sys.argv[2])
seg.open(0)
x = seg.prefill(0, np.arange(1, 20))
for t in range(3):
    x = seg.decode([0], np.array([int(x[0].argmax())]))
print(json.dumps({"onnx": sorted(m for m in sys.modules if m == "onnx" or m.startswith(("onnx.", "ml_dtypes")))}))
"""


@pytest.mark.parametrize(("dtype", "kv"), [("int4", "fp32"), ("fp32", "fp16")])
def test_a_process_that_runs_a_segment_never_imports_onnx(models: Path, dtype: str, kv: str) -> None:
    r = subprocess.run([sys.executable, "-c", SERVE, str(models / dtype), kv], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {"onnx": []}


def test_a_float16_cache_from_the_wire_runs_like_before(models: Path) -> None:
    # the retyped graph loads and decodes: logits near the float32 cache's
    a, b = Segment(models / "fp32", kv_dtype="fp32"), Segment(models / "fp32", kv_dtype="fp16")
    outs = []
    for s in (a, b):
        s.open(0)
        outs.append(s.prefill(0, np.arange(1, 30)))
    assert np.abs(outs[0] - outs[1]).max() < 1e-2 * np.abs(outs[0]).max()
