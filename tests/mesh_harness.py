"""Real node processes, real brokers and real mDNS on loopback, for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from meshllm.mesh.broker import free_port
from meshllm.mesh.status import read_state

LOOPBACK = "127.0.0.1"


class NodeProc:
    """``meshllm node`` in a subprocess; its log goes to a file for post-mortems."""

    def __init__(self, mesh: str, node_id: str, *, broker: str | None = None, interface: str = LOOPBACK,
                 extra: list[str] | None = None, netns: str | None = None, log_dir: Path | None = None) -> None:
        self.node_id = node_id
        cmd = [sys.executable, "-m", "meshllm", "node", "--mesh", mesh, "--node-id", node_id,
               "--interface", interface, "--quick-profile", *(extra or [])]
        if broker:
            cmd += ["--broker", broker]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"node-{mesh}-{node_id}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.started_at = time.monotonic()

    def wait_started(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"node {self.node_id} exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "started":
                    return event
        raise AssertionError(f"node {self.node_id} did not start within {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"node {self.node_id} ignored SIGTERM for {timeout} s") from None
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def nodes(mesh: str, ids: list[str], **kw: Any) -> Iterator[list[NodeProc]]:
    procs = [NodeProc(mesh, i, **kw) for i in ids]
    try:
        for p in procs:
            p.wait_started()
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(AssertionError):
                p.stop()


def state(mesh: str, broker: str) -> dict[str, Any]:
    return asyncio.run(read_state(mesh, broker, quiet_s=0.3))


def status_cli(mesh: str, broker: str | None = None, interface: str = LOOPBACK) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "meshllm", "status", "--mesh", mesh, "--json", "--interface", interface]
    if broker:
        cmd += ["--broker", broker]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def mosquitto() -> Iterator[str]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        raise AssertionError("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: _port_open(port), 10, "mosquitto to listen")
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def amqtt_broker() -> Iterator[str]:
    """The embedded broker as a standalone process (``meshllm broker``)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meshllm", "broker", "--host", LOOPBACK, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _port_open(port), 20, "amqtt broker to listen")
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((LOOPBACK, port)) == 0
