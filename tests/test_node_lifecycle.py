"""A node owns what it starts: a failure half-way into ``async with`` closes exactly what was started (no task,
socket, thread or broker connection left behind) and says why in one line; leaving never swallows the
caller's own cancellation."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from meshllm.aio import stop_task
from meshllm.errors import ConfigError, NoModelSource
from meshllm.mesh.broker import port_open
from meshllm.mesh.node import Node, NodeConfig
from meshllm.profile import DeviceProfile
from meshllm.serve import model_files
from meshllm.serve.server import ServingNode
from tests.mesh_harness import LOOPBACK, NodeProc

PROFILE = DeviceProfile("x", "x", 50e9, 10e9, 8 * 10**9)


def _config(tmp_path: Path, **kw: object) -> NodeConfig:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    base: dict[str, object] = dict(mesh=f"t-life-{secrets.token_hex(3)}", node_id="n1", interface=LOOPBACK,
                                   open_mesh=True, profile=PROFILE, model=str(model), settle_s=0.2)
    return NodeConfig(**{**base, **kw})  # type: ignore[arg-type]


def _fds() -> set[str]:
    """This process's open sockets (by inode), to compare before and after."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(("segment", "load", "intake"))}


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    s.listen()
    return s


def test_a_data_plane_port_in_use_leaves_nothing_behind(tmp_path: Path) -> None:
    """The node is the last part to start here (peer links and the executors come before it)."""
    async def go() -> None:
        before = _fds()
        with _busy_port() as busy:
            node = ServingNode(_config(tmp_path, port=busy.getsockname()[1]))
            with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:.*--port") as e:
                await node.__aenter__()
        assert "\n" not in str(e.value)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert _fds() == before
        assert _threads() == set()
        assert node.executor._shutdown and node.loader._shutdown  # type: ignore[attr-defined]
    asyncio.run(go())


def test_a_failure_after_joining_the_mesh_leaves_no_task_socket_or_broker(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with no model files and no peer to fetch them from fails after it joined: by then it hosts the
    mesh's broker, holds a session on it, advertises over mDNS and listens on its data plane."""
    monkeypatch.setattr(model_files, "START_WAIT_S", 3.0)  # past the settle time and the broker start

    async def go() -> None:
        before = _fds()
        node = ServingNode(_config(tmp_path))
        joined: list[str] = []

        async def watch() -> None:  # the node really got that far: it hosted a broker and joined it
            while not node.node.connected.is_set():
                await asyncio.sleep(0.02)
            joined.append(str(node.node.broker_url))
        watcher = asyncio.get_running_loop().create_task(watch())
        with pytest.raises(NoModelSource, match="no peer holds the model files"):
            await node.__aenter__()
        await stop_task(watcher)
        assert joined, "the node failed before it joined the mesh: the test proves nothing"
        host, port = joined[0].rsplit("/", 1)[-1].rsplit(":", 1)
        assert not await port_open(host, int(port)), "the hosted broker still listens"
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert _fds() == before
        assert _threads() == set()
    asyncio.run(go())


def test_a_port_in_use_stops_meshllm_node_with_one_line(tmp_path: Path) -> None:
    with _busy_port() as busy:
        node = NodeProc(f"t-life-{secrets.token_hex(3)}", "p1", log_dir=tmp_path, closed=True,
                        env={"MESHLLM_SECRET": secrets.token_urlsafe(32)},
                        extra=["--port", str(busy.getsockname()[1])])
        try:
            rc = node.proc.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            raise
    log = node.log_path.read_text()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert rc == 2, log
    assert len(lines) == 1 and lines[0].startswith("meshllm: error: the data plane cannot listen on"), log


def test_leaving_a_node_keeps_the_callers_cancellation(tmp_path: Path) -> None:
    """A task cancelled while it leaves a node stays cancelled: the node's exit used to wait for its mesh loop
    under ``suppress(CancelledError)``, which swallowed the caller's cancellation with the loop's."""
    async def go() -> None:
        # no broker is found within the test (a long settle, nobody else): the exit's first wait is the loop's end
        node = Node(_config(tmp_path, settle_s=60.0, model=None))
        went_on: list[bool] = []

        async def body() -> None:
            async with node:
                asyncio.current_task().cancel()  # type: ignore[union-attr]
            went_on.append(True)
        task = asyncio.get_running_loop().create_task(body())
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not went_on
        assert asyncio.all_tasks() == {asyncio.current_task()}
    asyncio.run(go())


def test_stop_task_absorbs_the_tasks_cancellation_but_not_the_callers() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        forever = loop.create_task(asyncio.Event().wait())
        await stop_task(forever)  # its own cancellation: quiet
        assert forever.cancelled()

        async def failing() -> None:
            raise KeyError("boom")
        broken = loop.create_task(failing())
        await asyncio.sleep(0)
        with pytest.raises(KeyError):
            await stop_task(broken)  # its error is not hidden

        async def stopper() -> None:
            slow = loop.create_task(_slow_to_stop())
            await asyncio.sleep(0)
            await stop_task(slow)
        outer = loop.create_task(stopper())
        await asyncio.sleep(0.05)
        outer.cancel()  # the caller is cancelled while it waits for the task to end
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

        cleaned: list[str] = []

        async def cleans_up_after_its_cancellation() -> None:
            helper = loop.create_task(asyncio.Event().wait())
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await stop_task(helper)  # its cancellation was delivered: stopping a task now is quiet
                cleaned.append("helper stopped")
                raise
        cleaner = loop.create_task(cleans_up_after_its_cancellation())
        await asyncio.sleep(0.01)
        cleaner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cleaner
        assert cleaned == ["helper stopped"]
    asyncio.run(go())


async def _slow_to_stop() -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(0.2)  # a task whose cleanup takes a while
