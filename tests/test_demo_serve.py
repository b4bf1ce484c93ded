"""`meshllm demo --serve`: the page and the OpenAI API in front of the demo's mesh, and Ctrl-C (issue 18).

Run from the wheel installed in a fresh venv by tests/test_demo.py (its third demo run). Real processes: the
demo (its broker, four nodes, its gateway), the official `openai` client, `meshllm ask`, `meshllm status` and
a second `meshllm gateway --chat-template FILE`. Chat works on the bundled model, which has no chat template
(the ChatML fallback, named in /v1/models and `meshllm status`), streamed and not; a template file given to
the gateway or to `meshllm ask --chat` replaces it; SIGINT stops everything quietly.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.test_demo import check_demo_output, installed, mesh_processes, wheel_env

__all__ = ["installed"]  # the session fixture: the wheel, built and installed once

ROOT = Path(__file__).resolve().parent.parent
PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the user's words as a bare prompt


@pytest.fixture(scope="module")
def cli(installed: Path) -> list[str]:
    return [str(installed.parent / "python"), "-m", "meshllm"]


def _start(cli: list[str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=wheel_env(),
                            cwd="/")


def _finish(p: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """The demo's stdout up to the first line matching ``pattern`` (it streams; no sleeps)."""
    deadline, seen = time.monotonic() + timeout, []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the demo ended early ({proc.wait()}):\n{''.join(seen)}")
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{''.join(seen)}")


class DemoRun:
    """The demo process; :meth:`stop` is Ctrl-C (SIGINT), once, and records how it ended."""

    def __init__(self, proc: subprocess.Popen[str], head: str) -> None:
        self.proc, self.head = proc, head
        url = re.search(r"the OpenAI API (http://127\.0\.0\.1:\d+)/v1", head)
        broker = re.search(r"--broker (mqtt://\S+)", head)
        mesh = re.search(r"mesh (demo-[0-9a-f]+)", head)
        assert url and broker and mesh, head
        self.url, self.broker, self.mesh = url.group(1), broker.group(1), mesh.group(1)
        self.rest = self.err = ""
        self.stop_s = 0.0

    def stop(self) -> None:
        if self.proc.poll() is not None or self.stop_s:
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        self.rest, self.err = self.proc.communicate(timeout=30)
        self.stop_s = time.monotonic() - t0


@pytest.fixture(scope="module")
def demo(cli: list[str]) -> Iterator[DemoRun]:
    proc = _start(cli, "demo", "--serve", "0", "--max-tokens", "8", "--prompt", "She was")
    run = None
    try:
        run = DemoRun(proc, _read_until(proc, r"^  meshllm status ", 180))
        yield run
    finally:
        if run is not None:
            run.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_openai_client_chats_with_the_bundled_model_through_the_demo_gateway(demo: DemoRun) -> None:
    client = OpenAI(base_url=demo.url + "/v1", api_key="none")
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-austen"]
    assert models[0].model_extra["chat_template"] == "chatml (fallback)"
    messages = [{"role": "user", "content": "Tell me about Mr. Darcy."}]
    whole = client.chat.completions.create(model="tiny-austen", messages=messages, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content or ""
    assert len(re.findall(r"[A-Za-z]+", text)) >= 3 and whole.usage.completion_tokens == 12, whole
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-austen", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == text  # greedy: the stream says what the whole answer said


def test_the_printed_curl_and_python_snippets_work_as_pasted(demo: DemoRun) -> None:
    curl = re.search(r"^  (curl .*?)\n\n", demo.head, re.M | re.S)
    python = re.search(r"^  (python -c .*)$", demo.head, re.M)
    assert curl and python, demo.head
    runs = [subprocess.Popen(["bash", "-c", cmd.group(1)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=wheel_env()) for cmd in (curl, python)]
    (curl_out, curl_err), (py_out, py_err) = [p.communicate(timeout=60) for p in runs]
    assert runs[0].returncode == 0 and not curl_err, curl_err
    answer = json.loads(curl_out)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"], answer
    assert runs[1].returncode == 0 and not py_err and len(re.findall(r"[A-Za-z]+", py_out)) >= 3, (py_out, py_err)


def test_status_and_ask_reach_the_demo_mesh_and_a_template_file_replaces_the_fallback(
        demo: DemoRun, cli: list[str], tmp_path: Path) -> None:
    common = ["ask", "--mesh", demo.mesh, "--broker", demo.broker, "--max-tokens", "10", "--temperature", "0"]
    plain = tmp_path / "plain.jinja"
    plain.write_text(PLAIN)
    # at once: each is a process that starts Python (seconds on two busy cores)
    started = [_start(cli, "status", "--mesh", demo.mesh, "--broker", demo.broker), _start(cli, *common, "She was"),
               _start(cli, *common, "--chat", "She was"),
               _start(cli, *common, "--chat", "--chat-template", str(plain), "She was"),
               _start(cli, "gateway", "--mesh", demo.mesh, "--broker", demo.broker, "--port", "0",
                      "--chat-template", str(tmp_path / "missing.jinja"))]
    status, as_prompt, as_chat, as_templated_chat, bad = [_finish(p) for p in started]
    assert status.returncode == 0 and "chat template: chatml (fallback)" in status.stdout, status.stdout + status.stderr
    for p in (as_prompt, as_chat, as_templated_chat):
        assert p.returncode == 0 and p.stdout.strip() and not p.stderr, p.stdout + p.stderr
    assert as_templated_chat.stdout == as_prompt.stdout  # the file's template, not ChatML, made the prompt
    assert as_chat.stdout != as_prompt.stdout
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "cannot read" in bad.stderr, bad

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = _start(cli, "gateway", "--mesh", demo.mesh, "--broker", demo.broker, "--port", str(port), "--chat-template",
                str(plain))
    try:
        assert gw.stdout is not None
        started = json.loads(gw.stdout.readline())
        client = OpenAI(base_url=started["url"] + "/v1", api_key="none", max_retries=10)
        deadline = time.monotonic() + 30
        while not client.models.list().data and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.models.list().data[0].model_extra["chat_template"] == "plain.jinja (--chat-template)"
        chat = client.chat.completions.create(model="tiny-austen", max_tokens=10, temperature=0,
                                              messages=[{"role": "user", "content": "She was"}])
        completion = client.completions.create(model="tiny-austen", prompt="She was", max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == completion.choices[0].text
    finally:
        gw.send_signal(signal.SIGINT)
        gw.communicate(timeout=20)


def test_ctrl_c_stops_the_demo_quietly_and_leaves_nothing(demo: DemoRun) -> None:
    """Runs last in this file (pytest keeps the order): Ctrl-C ends the module's demo."""
    demo.stop()
    assert demo.proc.returncode == 0, (demo.proc.returncode, demo.err[-2000:])
    assert demo.stop_s < 15, f"Ctrl-C took {demo.stop_s:.1f} s"
    check_demo_output(demo.head + demo.rest, demo.err, ["She was"])
    assert not mesh_processes(demo.mesh), "Ctrl-C left node processes behind"
    for where in (demo.url, demo.broker):
        port = int(where.rsplit(":", 1)[1])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{where} still accepts connections"


def test_a_busy_serve_port_is_a_one_line_error_before_anything_starts(cli: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        p = _finish(_start(cli, "demo", "--serve", str(port)))
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 30
