"""The Client's protocol handling against a real Mosquitto broker and a stand-in for the mesh.

The stand-in (:class:`Responder`) answers requests per the v1 contract,
steered by the prompt ("count 5", "reverse 5", "gap 5", ...), so that each
test can provoke one behaviour of the reply stream. End-to-end tests with
real nodes live elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiomqtt
import pytest

from meshllm.cli.ask import add_ask_parser
from meshllm.errors import MeshError
from meshllm.mesh.broker import BrokerError, BrokerURL, free_port
from meshllm.mesh.topics import Topics
from meshllm.serve import api
from meshllm.serve.client import (
    BUSY,
    OVERFLOW,
    PROTOCOL_ERROR,
    TIMEOUT,
    Chunk,
    Client,
    ReplyError,
    RequestFailed,
    RequestTimeout,
    _Reorder,
)
from tests.mesh_harness import mosquitto


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


class Responder:
    """Answers requests like the mesh would; what it does is read from the prompt."""

    def __init__(self, broker: str, mesh: str) -> None:
        self.broker, self.topics = broker, Topics(mesh)
        self.requests: list[api.Request] = []
        self.cancels: list[str] = []
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Responder:
        self._stack = contextlib.AsyncExitStack()
        self.mqtt = await self._stack.enter_async_context(
            aiomqtt.Client(**BrokerURL.parse(self.broker).client_kwargs(), identifier=f"resp-{secrets.token_hex(3)}"))
        self.mqtt.pending_calls_threshold = 1024
        await self.mqtt.subscribe(self.topics.requests, qos=1)
        await self.mqtt.subscribe(self.topics.cancel, qos=1)
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._reader = self._tg.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        for t in list(self._tasks):
            t.cancel()
        await self._stack.aclose()

    async def _read(self) -> None:
        async for msg in self.mqtt.messages:
            assert isinstance(msg.payload, bytes)
            if str(msg.topic) == self.topics.cancel:
                self.cancels.append(json.loads(msg.payload)["id"])
            else:
                try:
                    req = api.parse_request(msg.payload, self.topics.replies)
                except api.RequestFailed as e:
                    await self.send(e.reply_to or f"{self.topics.replies}/_invalid", e.reply())
                    continue
                self.requests.append(req)
                t = self._tg.create_task(self._answer(req))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            self._changed.set()

    async def wait_for(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()

    async def send(self, topic: str, obj: dict[str, Any] | bytes) -> None:
        await self.mqtt.publish(topic, obj if isinstance(obj, bytes) else json.dumps(obj), qos=1)

    async def _answer(self, req: api.Request) -> None:
        assert req.prompt is not None or req.messages
        words = (req.prompt or req.messages[-1]["content"]).split()
        verb, n = words[0], int(words[1]) if len(words) > 1 and words[1].isdigit() else 3
        n = min(n, req.sampling.max_tokens)
        to = req.reply_to
        tokens = [api.token_reply(req.id, i, f" t{i}", 100 + i) for i in range(n)]
        final = api.final_reply(req.id, n, "!" if verb == "tail" else "", "length", 4, n,
                                {"queue_s": 0.0, "ttft_s": 0.01, "total_s": 0.02, "tokens_per_s": 50.0,
                                 "replicas": {"prefill": 0, "decode": 0}})
        if verb == "error":
            await self.send(to, api.error_reply(req.id, words[1], "the mesh is full, try again later"))
        elif verb in ("count", "tail"):
            for m in [*tokens, final]:
                await self.send(to, m)
        elif verb == "reverse":  # final first, then the tokens backwards
            for m in [final, *reversed(tokens)]:
                await self.send(to, m)
        elif verb == "dup":
            for m in [*tokens, final]:
                await self.send(to, m)
                await self.send(to, m)
        elif verb == "gap":  # index 1 never comes
            for m in [tokens[0], *tokens[2:], final]:
                await self.send(to, m)
        elif verb == "stall":  # n tokens, then nothing
            for m in tokens:
                await self.send(to, m)
        elif verb == "junk":
            await self.send(to, tokens[0])
            await self.send(to, b"this is not JSON")
        elif verb == "slow":  # a long answer that stops when cancelled
            for i in range(10_000):
                if req.id in self.cancels:
                    return
                await self.send(to, api.token_reply(req.id, i, f" s{i}", i))
                await asyncio.sleep(0.01)
        elif verb == "silent":
            pass
        else:
            raise AssertionError(f"unknown verb {verb!r}")


@pytest.fixture
async def mesh(broker: str) -> AsyncIterator[tuple[str, Responder]]:
    name = f"t-client-{secrets.token_hex(3)}"
    async with Responder(broker, name) as r:
        yield name, r


def client(broker: str, mesh: tuple[str, Responder], **kw: Any) -> Client:
    return Client(mesh[0], broker, **kw)


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --- streaming ----------------------------------------------------------------


async def test_stream_yields_tokens_in_index_order_and_ends_with_the_final_chunk(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        chunks = await collect(c.stream("count 5", max_tokens=16, temperature=0))
    assert [ch.index for ch in chunks] == [0, 1, 2, 3, 4, 5]
    assert "".join(ch.text for ch in chunks) == " t0 t1 t2 t3 t4"
    assert [ch.token_id for ch in chunks] == [100, 101, 102, 103, 104, None]
    last = chunks[-1]
    assert last.done and last.finish_reason == "length" and last.usage is not None
    assert last.usage.completion_tokens == 5 and last.timings is not None and "ttft_s" in last.timings
    req = mesh[1].requests[0]
    assert req.sampling.max_tokens == 16 and req.sampling.temperature == 0
    assert req.reply_to == Topics(mesh[0]).reply(req.id)


async def test_out_of_order_replies_are_put_back_in_order(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        chunks = await collect(c.stream("reverse 6"))
    assert [ch.index for ch in chunks] == list(range(7)) and chunks[-1].done


async def test_duplicate_replies_are_ignored(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        chunks = await collect(c.stream("dup 4"))
    assert [ch.index for ch in chunks] == [0, 1, 2, 3, 4]


async def test_missing_index_is_reported_as_a_gap(broker, mesh) -> None:
    async with client(broker, mesh, gap_timeout=0.3) as c:
        seen: list[int] = []
        t0 = time.monotonic()
        with pytest.raises(ReplyError, match="index 1 .* missing") as e:
            async for ch in c.stream("gap 5"):
                seen.append(ch.index)
    assert e.value.code == PROTOCOL_ERROR and seen == [0]
    assert time.monotonic() - t0 < 3


async def test_error_object_raises_request_failed_with_its_code(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        with pytest.raises(RequestFailed) as e:
            await c.complete("error busy")
    assert e.value.code == BUSY and e.value.message == "the mesh is full, try again later"
    assert mesh[1].cancels == [], "a request the mesh ended is not cancelled"


async def test_malformed_reply_raises_reply_error(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        with pytest.raises(ReplyError, match="not a JSON object"):
            await c.complete("junk")


async def test_complete_joins_text_token_ids_usage_and_timings(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        r = await c.complete(messages=[{"role": "user", "content": "tail 3"}], seed=7, stop=["\n"])
    assert r.text == " t0 t1 t2!" and r.token_ids == (100, 101, 102) and r.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 3)
    assert r.timings["tokens_per_s"] == 50.0 and 0 < r.ttft_s <= r.total_s
    j = r.to_json()
    assert json.loads(json.dumps(j)) == j and j["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
    req = mesh[1].requests[0]
    assert req.messages == ({"role": "user", "content": "tail 3"},) and req.sampling.stop == ("\n",)


async def test_a_finished_request_is_not_cancelled(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        await c.complete("count 2")
        async for ch in c.stream("count 2"):
            if ch.done:
                break  # at the final chunk: nothing left to cancel
        await eventually(lambda: not c._subscribed, "the unsubscribes")
        await c.complete("count 1")  # sent after any cancel would have been, on the same connection
    assert len(mesh[1].requests) == 3 and mesh[1].cancels == []


async def test_custom_reply_topic_is_used(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        r = await c.complete("count 2", reply_to=f"apps/{mesh[0]}/answers", request_id="mine-1")
    assert r.request_id == "mine-1" and mesh[1].requests[0].reply_to == f"apps/{mesh[0]}/answers"


async def test_sixteen_concurrent_streams_share_one_connection(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        results = await asyncio.gather(*(c.complete(f"count {n}", max_tokens=64) for n in range(1, 17)))
        assert not c._inflight
    for n, r in zip(range(1, 17), results, strict=True):
        assert r.text == "".join(f" t{i}" for i in range(n)) and r.usage.completion_tokens == n
    assert len({r.request_id for r in results}) == 16 and len(mesh[1].requests) == 16


async def test_sixteen_interleaved_streams_each_see_only_their_own_tokens(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        streams = [c.stream(f"reverse {n}") for n in range(1, 17)]
        out = await asyncio.gather(*(collect(s) for s in streams))
    for n, chunks in zip(range(1, 17), out, strict=True):
        assert [ch.index for ch in chunks] == list(range(n + 1))
        assert len({ch.request_id for ch in chunks}) == 1


# --- cancel ---------------------------------------------------------------------


async def test_breaking_out_of_the_stream_publishes_cancel_and_unsubscribes(broker, mesh) -> None:
    responder = mesh[1]
    async with client(broker, mesh) as c:
        async for ch in c.stream("slow"):
            if ch.index == 2:
                rid = ch.request_id
                break
        await responder.wait_for(lambda: rid in responder.cancels)
        await eventually(lambda: not c._subscribed and not c._inflight, "the unsubscribe")
    assert responder.cancels == [rid]


async def test_cancelled_task_publishes_cancel(broker, mesh) -> None:
    responder = mesh[1]
    async with client(broker, mesh) as c:
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in c.stream("slow"):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await responder.wait_for(lambda: len(responder.cancels) == 1)
    assert responder.cancels == [responder.requests[0].id]


async def test_cancelling_the_task_that_owns_the_client_still_publishes_cancel(broker, mesh) -> None:
    responder = mesh[1]
    started = asyncio.Event()

    async def ask() -> None:  # like 'meshllm ask' interrupted by Ctrl-C
        async with client(broker, mesh) as c:
            async for _ in c.stream("slow"):
                started.set()

    task = asyncio.create_task(ask())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await responder.wait_for(lambda: len(responder.cancels) == 1)


async def test_closing_the_client_cancels_streams_left_open(broker, mesh) -> None:
    responder = mesh[1]
    async with client(broker, mesh) as c:
        s = c.stream("slow")
        await anext(s)
    await responder.wait_for(lambda: len(responder.cancels) == 1)
    with pytest.raises(MeshError, match="client was closed"):
        await anext(s)


# --- time-outs and failures ----------------------------------------------------------


async def test_no_first_reply_raises_timeout(broker, mesh) -> None:
    async with client(broker, mesh, first_token_timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="first_token_timeout") as e:
            await c.complete("silent")
    assert e.value.code == TIMEOUT and 0.3 <= time.monotonic() - t0 < 2
    await mesh[1].wait_for(lambda: len(mesh[1].cancels) == 1)


async def test_silence_mid_stream_raises_idle_timeout(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        seen = []
        with pytest.raises(RequestTimeout, match="after index 1 .*idle_timeout"):
            async for ch in c.stream("stall 2", idle_timeout=0.3):
                seen.append(ch.index)
    assert seen == [0, 1]


async def test_invalid_arguments_fail_before_anything_is_sent(broker, mesh) -> None:
    async with client(broker, mesh) as c:
        with pytest.raises(RequestFailed) as e:
            c.stream("count 1", temperature=-1)
        with pytest.raises(api.RequestFailed) as mesh_says:
            api.parse_request(json.dumps({"id": "x", "prompt": "count 1", "temperature": -1}), "r")
        assert (e.value.code, e.value.message) == (mesh_says.value.code, mesh_says.value.message)
        for bad in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": ""},
                    {"prompt": "a", "stop": [""]}, {"prompt": "a", "max_tokens": 0}, {"prompt": "a" * 200_001},
                    {"prompt": "a", "reply_to": "x/#"}, {"prompt": "a", "request_id": "no spaces"},
                    {"prompt": "a", "max_tokens": object()}, {"prompt": "\ud800"}):
            with pytest.raises(RequestFailed) as e:
                c.stream(**bad)
            assert e.value.code in (api.INVALID_REQUEST, api.CONTEXT_LENGTH)
        assert (await c.complete("count 1")).text == " t0"
    assert len(mesh[1].requests) == 1


async def test_unreachable_broker_raises_broker_error() -> None:
    with pytest.raises(BrokerError, match="cannot connect"):
        async with Client("m", f"mqtt://127.0.0.1:{free_port()}"):
            pass


async def test_lost_broker_connection_fails_the_stream_with_broker_error(broker, mesh) -> None:
    b = BrokerURL.parse(broker)
    links: list[asyncio.StreamWriter] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(b.host, b.port)
        links.extend([w, uw])
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        async with Client(mesh[0], f"mqtt://127.0.0.1:{port}", reconnect_timeout=0) as c:  # no second chance
            with pytest.raises(BrokerError, match="lost the connection"):
                async for ch in c.stream("slow"):
                    if ch.index == 1:
                        for w in links:
                            w.transport.abort()
            with pytest.raises(BrokerError):
                await c.complete("count 1")
    finally:
        proxy.close()


async def test_slow_consumer_overflows_its_bounded_queue(broker, mesh) -> None:
    async with client(broker, mesh, queue_size=4) as c:
        with pytest.raises(ReplyError) as e:
            async for _ in c.stream("count 40", max_tokens=40):
                await asyncio.sleep(0.05)
    assert e.value.code == OVERFLOW


# --- the pure reordering rule ----------------------------------------------------------------


def tok(i: int) -> Chunk:
    return Chunk("r", i, f"t{i}", i)


def test_reorder_holds_early_chunks_until_the_gap_fills() -> None:
    o = _Reorder("r", max_tokens=10)
    o.push(tok(1), now=1.0)
    assert o.pop_ready(1.0) == [] and o.gap_since == 1.0
    o.push(tok(0), now=2.0)
    assert [c.index for c in o.pop_ready(2.0)] == [0, 1] and o.gap_since is None
    o.push(tok(1), now=3.0)  # a duplicate of a delivered one
    o.push(tok(3), now=3.0)
    o.push(tok(3), now=3.5)  # a duplicate of a held one
    assert o.pop_ready(3.5) == [] and o.gap_since == 3.0
    assert "index 2" in o.describe_gap()


@pytest.mark.parametrize("pushes", [[Chunk("r", 11, "", 1)],
                                    [Chunk("r", 2, "", None, True, "stop"), tok(3)],
                                    [tok(3), Chunk("r", 2, "", None, True, "stop")]])
def test_reorder_rejects_indices_beyond_max_tokens_or_the_final(pushes: list[Chunk]) -> None:
    o = _Reorder("r", max_tokens=10)
    with pytest.raises(ReplyError):
        for c in pushes:
            o.push(c, now=0.0)


# --- meshllm ask -----------------------------------------------------------------------------


def ask(argv: list[str]) -> Awaitable[int]:
    p = argparse.ArgumentParser(prog="meshllm")
    add_ask_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return asyncio.to_thread(args.func, args)


async def test_ask_streams_the_answer_with_a_newline(broker, mesh, capsys) -> None:
    assert await ask(["ask", "--mesh", mesh[0], "--broker", broker, "--max-tokens", "8", "--temperature", "0",
                      "--top-p", "0.9", "--top-k", "4", "--seed", "1", "--stop", "x", "count 3"]) == 0
    assert capsys.readouterr().out == " t0 t1 t2\n"
    s = mesh[1].requests[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (8, 0.0, 0.9, 4, 1, ("x",))


async def test_ask_json_prints_one_object_with_usage_and_timings(broker, mesh, capsys) -> None:
    assert await ask(["ask", "--mesh", mesh[0], "--broker", broker, "--json", "tail 2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == " t0 t1!" and out["usage"]["completion_tokens"] == 2 and "ttft_s" in out["timings"]


async def test_ask_errors_are_mesh_errors(broker, mesh, capsys) -> None:
    with pytest.raises(RequestFailed, match=r"full.*\(busy\)"):
        await ask(["ask", "--mesh", mesh[0], "--broker", broker, "error busy"])
    with pytest.raises(RequestFailed, match="temperature"):
        await ask(["ask", "--mesh", mesh[0], "--broker", broker, "--temperature", "-1", "count 1"])
