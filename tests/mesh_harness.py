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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from meshllm.mesh.broker import MOSQUITTO_OPTIONS, free_port
from meshllm.mesh.status import read_state

LOOPBACK = "127.0.0.1"


class NodeProc:
    """``meshllm node`` in a subprocess; its log goes to a file for post-mortems."""

    def __init__(self, mesh: str, node_id: str, *, broker: str | None = None, interface: str = LOOPBACK,
                 extra: list[str] | None = None, netns: str | None = None, log_dir: Path | None = None,
                 closed: bool = False, env: dict[str, str] | None = None) -> None:
        self.node_id = node_id
        verbose = ["-v"] if os.environ.get("MESHLLM_TEST_VERBOSE") else []
        cmd = [sys.executable, "-m", "meshllm", *verbose, "node", "--mesh", mesh, "--node-id", node_id,
               "--interface", interface, "--quick-profile", *(extra or [])]
        if not closed and not {"--secret-file", "--join", "--open"} & set(cmd) and "MESHLLM_SECRET" not in os.environ:
            cmd.append("--open")  # most tests exercise an open mesh; security tests pass a secret or closed=True
        if broker:
            cmd += ["--broker", broker]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"node-{mesh}-{node_id}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **env} if env else None)
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


@contextlib.asynccontextmanager
async def members_declared_lost(broker: str, mesh: str) -> AsyncIterator[list[str]]:
    """The ids whose member record is cleared (declared lost, or left) while the block runs, in order."""
    import aiomqtt

    from meshllm.mesh.broker import BrokerURL

    cleared: list[str] = []
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(f"meshllm/v1/{mesh}/members/+", qos=1)

        async def watch() -> None:
            async for m in c.messages:
                if not m.payload:
                    cleared.append(str(m.topic).rsplit("/", 1)[-1])
        watcher = asyncio.ensure_future(watch())
        try:
            yield cleared
        finally:
            watcher.cancel()


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
def mosquitto(*, users: dict[str, str] | None = None, tls: bool = False) -> Iterator[str]:
    """A Mosquitto broker on a free loopback port; with ``users`` it requires a password, with ``tls``
    it speaks TLS with a throw-away CA (its file is left beside as ``ca.pem`` for the URL's clients)."""
    with mosquitto_proc(users=users, tls=tls) as m:
        yield m.url


class Mosquitto:
    """A Mosquitto process that can be stopped and started again on the same port (broker restarts)."""

    def __init__(self, conf: Path, port: int, url: str) -> None:
        self.conf, self.port, self.url = conf, port, url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if exe is None:
            raise AssertionError("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(self.port), 10, "mosquitto to listen")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(10)


@contextlib.contextmanager
def mosquitto_proc(*, users: dict[str, str] | None = None, tls: bool = False) -> Iterator[Mosquitto]:
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        # user root: keep access to our temp files
        conf = [f"listener {port} 127.0.0.1", "persistence false", "user root", *MOSQUITTO_OPTIONS]
        if users:
            pw = Path(d) / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
            conf += ["allow_anonymous false", f"password_file {pw}"]
        else:
            conf.append("allow_anonymous true")
        if tls:
            make_test_ca(Path(d))
            conf += [f"cafile {d}/ca.pem", f"certfile {d}/server.pem", f"keyfile {d}/server.key"]
        (Path(d) / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        user = f"{next(iter(users))}:{next(iter(users.values()))}@" if users else ""
        url = f"{'mqtts' if tls else 'mqtt'}://{user}127.0.0.1:{port}" + (f"#{d}/ca.pem" if tls else "")
        m = Mosquitto(Path(d) / "mosquitto.conf", port, url)
        m.start()
        try:
            yield m
        finally:
            m.stop()


def make_test_ca(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=meshllm-test-ca",
        "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", f"{d}/server.key",
        "-out", f"{d}/server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{d}/server.pem", "-extfile", f"{d}/ext.cnf")


@contextlib.contextmanager
def amqtt_broker(secret_file: Path | None = None) -> Iterator[str]:
    """The embedded broker as a standalone process (``meshllm broker [--secret-file]``)."""
    port = free_port()
    secret = ["--secret-file", str(secret_file)] if secret_file else ["--open"]
    proc = subprocess.Popen([sys.executable, "-m", "meshllm", "broker", "--host", LOOPBACK, "--port", str(port),
                             *secret], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
