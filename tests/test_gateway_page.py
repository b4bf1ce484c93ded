"""The live mesh page, rendered by headless Chromium from a gateway in front of a live 3-node mesh
serving the bundled model (models/tiny-austen); and the openai package on that model.

Chromium is Debian's package (``apt-get install chromium``; .ci/run installs it): the test fails, it
does not skip, when it is missing. ``MESHLLM_SCREENSHOT=docs/mesh-page.png pytest
tests/test_gateway_page.py`` also saves the screenshot for the docs.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.mesh_harness import mosquitto, wait_until
from tests.serving_harness import replica, serving_mesh
from tests.test_gateway import GatewayProc, http

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "tiny-austen"
NODES = ["desk-nuc", "kitchen-pi5", "attic-pi4"]
PLAN = {"version": 1, "n_layers": 6, "replicas": [
    replica(0, "prefill", [("desk-nuc", 0, 6)], context=256),
    replica(1, "decode", [("kitchen-pi5", 0, 3), ("attic-pi4", 3, 6)], context=256)]}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise AssertionError("Chromium is not installed: apt-get install chromium (.ci/run does)")
    return exe


def headless(url: str, tmp: Path, *args: str, budget_ms: int = 4000) -> subprocess.CompletedProcess[str]:
    """Chromium, headless and offline-friendly; ``--virtual-time-budget`` lets the page poll a few times."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}",
           f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


class _Page(html.parser.HTMLParser):
    """What the test looks for in the rendered DOM: elements by data attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, attr: str, value: str | None = None) -> list[dict[str, str | None]]:
        return [a for _, a in self.elements if attr in a and (value is None or a[attr] == value)]


@pytest.fixture(scope="module")
def page_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway in front of a live 3-node mesh (a PREFILL replica, a 2-stage DECODE replica); yields its URL."""
    root = tmp_path_factory.mktemp("page")
    with mosquitto() as broker:
        mesh = "home"  # the broker is this fixture's own
        with serving_mesh(mesh, broker, BUNDLED, NODES, PLAN, root):
            gw = GatewayProc(mesh, broker, log_dir=root)
            try:
                wait_until(lambda: (s := http("GET", f"{gw.url}/v1/mesh", key=None)[2])["plan"]
                           and all(r["ready"] for r in s["plan"]["replicas"]), 15, "the gateway to see the plan")
                yield gw.url
            finally:
                gw.stop()


@pytest.fixture
def load(page_mesh: str) -> Iterator[None]:
    """Streams completions through the gateway meanwhile, so that the page has live figures to show."""
    stop = threading.Event()
    client = openai.OpenAI(base_url=f"{page_mesh}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id

    def run() -> None:
        while not stop.is_set():
            for _ in client.completions.create(model=model, prompt="Once upon a time", max_tokens=60,
                                               temperature=0.8, stream=True):
                if stop.is_set():
                    break
    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until(lambda: any(r["tokens_per_s"] for r in http("GET", f"{page_mesh}/v1/mesh", key=None)[2]["plan"]
                           ["replicas"]), 10, "live tokens/s")
    try:
        yield
    finally:
        stop.set()
        t.join(30)


def test_openai_package_gets_meshllm_generate_text_for_the_bundled_model(page_mesh: str) -> None:
    prompt = "It is a truth universally acknowledged"
    want = subprocess.run([sys.executable, "-m", "meshllm", "generate", prompt, "--model", str(BUNDLED),
                           "--max-tokens", "24", "--temperature", "0", "--json", "--threads", "1"],
                          capture_output=True, text=True, timeout=60, check=True)
    want_text = json.loads(want.stdout)["text"]
    client = openai.OpenAI(base_url=f"{page_mesh}/v1", api_key="none", max_retries=0, timeout=60)
    assert client.models.list().data[0].id == "tiny-austen"
    whole = client.completions.create(model="tiny-austen", prompt=prompt, max_tokens=24, temperature=0)
    assert whole.choices[0].text == want_text
    stream = client.completions.create(model="tiny-austen", prompt=prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want_text
    # the bundled model has no chat template: chats get the ChatML fallback, named in /v1/models
    assert client.models.list().data[0].model_extra["chat_template"] == "chatml (fallback)"
    chat = client.chat.completions.create(model="tiny-austen", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 8


def test_page_shows_the_three_nodes_and_the_plan(page_mesh: str, load: None, tmp_path: Path) -> None:
    out = headless(page_mesh + "/", tmp_path, "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    page = _Page()
    page.feed(out.stdout)
    text = " ".join(page.text)
    # the members table: a row per node
    rows = {a["data-node"] for a in page.having("data-node") if a.get("class") is None}
    assert rows == set(NODES), text[:2000]
    # the plan: a PREFILL replica on one node, a DECODE replica over two, each stage with its layers
    replicas = {a["data-replica"]: a["data-role"] for a in page.having("data-role")}
    assert replicas == {"0": "prefill", "1": "decode"}
    stages = {(a["data-replica"], a["data-node"]) for a in page.having("data-node") if a.get("class") == "stage"}
    assert stages == {("0", "desk-nuc"), ("1", "kitchen-pi5"), ("1", "attic-pi4")}
    for words in ("layers 0–5", "layers 0–2", "layers 3–5", "PREFILL", "DECODE", "● ready", "planner", "v1",
                  "tiny-austen", "context 256 tokens"):
        assert words in text, words
    assert "no plan yet" not in text and "unreachable" not in text


def test_page_screenshot_is_a_picture_of_the_mesh(page_mesh: str, load: None, tmp_path: Path) -> None:
    shot = tmp_path / "mesh-page.png"
    out = headless(page_mesh + "/", tmp_path, f"--screenshot={shot}", "--window-size=1280,860",
                   "--hide-scrollbars", budget_ms=8000)
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 860)
    assert len(data) > 30_000  # a drawn page, not a blank one
    if os.environ.get("MESHLLM_SCREENSHOT"):
        shutil.copy(shot, os.environ["MESHLLM_SCREENSHOT"])
