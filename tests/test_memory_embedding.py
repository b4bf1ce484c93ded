"""The first segment reads its tokens' embedding rows from the model file and holds no copy of the table.

Inside onnxruntime a tied int4 table stayed mapped and resident in full (the head's prepacking reads all
of it) beside the head's packed copy; a float32 table kept every page a token touched. The runtime's
lookup (:mod:`meshllm.runtime.embedding`) must give exactly what the embedding graph gives, for every
dtype meshllm exports, leave no mapping of the table in the process, and leave an embedding graph it does
not recognize (an old or hand-made one) in the session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from meshllm.errors import ModelError
from meshllm.runtime.embedding import runtime_embedding
from meshllm.runtime.segment import Segment
from tests.serving_harness import random_exports

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("fp32", "fp16", "int4", "int8")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emb")
    return random_exports(root, DTYPES, layers=2, seed=11)


def graph_embedding(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
    sess = ort.InferenceSession(str(model_dir / "embed.onnx"), so, providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {"input_ids": ids})[0]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_runtime_lookup_equals_the_embedding_graph_exactly(models: Path, dtype: str) -> None:
    lookup = runtime_embedding(models / dtype, "embed.onnx", 128)
    assert lookup is not None
    rng = np.random.default_rng(0)
    for ids in (np.array([[0]]), np.array([[511], [3], [511]]), rng.integers(0, 512, (1, 77)),
                rng.integers(0, 512, (16, 1))):
        got = lookup(ids)
        assert got.dtype == np.float32 and got.shape == (*ids.shape, 128)
        assert np.array_equal(got, graph_embedding(models / dtype, ids)), ids.shape


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_a_segment_with_the_runtime_lookup_gives_the_logits_of_the_graph(models: Path, dtype: str,
                                                                         tmp_path: Path) -> None:
    # the same model with its table inside the embedding graph file: a form the runtime leaves in the session
    inline = tmp_path / dtype
    shutil.copytree(models / dtype, inline)
    m = onnx.load(str(inline / "embed.onnx"))  # with its external data
    for t in m.graph.initializer:
        t.ClearField("data_location")
        del t.external_data[:]
    onnx.save(m, str(inline / "embed.onnx"))
    segs = [Segment(models / dtype, max_batch=2, prefill_chunk=32),
            Segment(inline, max_batch=2, verify=False, prefill_chunk=32)]
    assert segs[0]._embed is not None and segs[1]._embed is None
    outs = []
    for s in segs:
        s.open("a")
        s.open("b")
        x = [s.prefill("a", np.arange(1, 100) * 5 % 512), s.prefill("b", np.array([7, 7, 9]))]
        for t in range(4):
            x.append(s.decode(["a", "b"], np.array([3 + t, 500 - t])))
        outs.append(x)
    for got, want in zip(*outs, strict=True):
        assert np.array_equal(got, want)


SERVE = """
import json, sys
from pathlib import Path
import numpy as np
from meshllm.runtime.segment import Segment
seg = Segment(sys.argv[1], max_seq_len=64)
seg.open(0)
x = seg.prefill(0, np.arange(1, 40))
for t in range(3):
    x = seg.decode([0], np.array([int(x[0].argmax())]))
rss, name = {}, None
for line in Path("/proc/self/smaps").read_text().splitlines():
    head = line.split()
    if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
        name = head[5] if len(head) > 5 else ""
    elif head[0] == "Rss:" and name and name.endswith(".onnx.data"):
        rss[Path(name).name] = rss.get(Path(name).name, 0) + int(head[1])
print(json.dumps(rss))
"""


@pytest.mark.parametrize("dtype", ["int4", "fp32"])  # int8's head gathers rows of the table itself (its refinement)
def test_a_whole_model_process_holds_no_page_of_the_table_file(models: Path, dtype: str) -> None:
    # int4: the tied head packs its own copy of the blocks from embed.onnx.data and onnxruntime lets
    # them go (it keeps the head's scales mapped, a ninth of the table at block 32); fp32: the head has its
    # own file. No block of the embedding's rows stays in the process.
    r = subprocess.run([sys.executable, "-c", SERVE, str(models / dtype)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    resident = json.loads(r.stdout.splitlines()[-1]).get("embed.onnx.data", 0) * 1024
    lookup = runtime_embedding(models / dtype, "embed.onnx", 128)
    assert lookup is not None
    rows = lookup.layout.rows * lookup.layout.row_bytes
    scales = (models / dtype / "embed.onnx.data").stat().st_size - rows
    assert resident <= -(-scales // 4096) * 4096 < rows, (resident, scales, rows)


def test_a_table_file_shorter_than_its_rows_is_refused_at_load(models: Path, tmp_path: Path) -> None:
    broken = tmp_path / "int4"
    shutil.copytree(models / "int4", broken)
    data = broken / "embed.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelError, match="embed.onnx.data: shorter than the embedding table"):
        runtime_embedding(broken, "embed.onnx", 128)


def test_a_table_with_fewer_rows_than_the_vocabulary_is_refused_at_load(models: Path, tmp_path: Path) -> None:
    # ids are checked against vocab_size before a step: a row beyond the table would be read past its end
    broken = tmp_path / "int4"
    shutil.copytree(models / "int4", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["config"]["vocab_size"] = 600
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="embedding table has 512 rows but the config's vocab_size is 600"):
        Segment(broken)
