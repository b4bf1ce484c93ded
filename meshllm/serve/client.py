"""The app side of the request API: one MQTT connection, many concurrent streamed requests.

:class:`Client` is what apps, ``meshllm ask`` and the HTTP gateway use::

    async with Client(mesh="home") as c:
        async for chunk in c.stream(prompt="Once upon a time", max_tokens=64):
            print(chunk.text, end="", flush=True)
        result = await c.complete(messages=[{"role": "user", "content": "Hi"}])

Per request it subscribes to the reply topic, publishes the request (QoS 1),
and yields the replies in ``index`` order until the final message. Requests
are validated here with :func:`meshllm.serve.api.parse_request`, so bad input
fails before anything is sent, with the message the mesh would give.

A consumer that stops early (``break``, a cancelled task) makes the client
publish ``{"id": ...}`` on the cancel topic, so the mesh stops generating.
The ordering, duplicate and gap rules live in :class:`_Reorder` (pure, clock
passed in); this module owns the MQTT effects and must not know how the mesh
serves a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeGuard

import aiomqtt

from meshllm.errors import PROTOCOL_ERROR, TIMEOUT, MeshError, ReplyError, RequestFailed, RequestTimeout
from meshllm.mesh.access import with_login
from meshllm.mesh.broker import BrokerError, BrokerURL
from meshllm.mesh.status import find_broker
from meshllm.mesh.topics import Topics
from meshllm.serve import api
from meshllm.serve.api import (
    BUSY,
    CANCELLED,
    CONTEXT_LENGTH,
    INTERNAL,
    INVALID_JSON,
    INVALID_REQUEST,
    UNAVAILABLE,
)

__all__ = [
    "BUSY", "CANCELLED", "CONTEXT_LENGTH", "INTERNAL", "INVALID_JSON", "INVALID_REQUEST", "OVERFLOW",
    "PROTOCOL_ERROR", "TIMEOUT", "UNAVAILABLE",
    "Chunk", "Client", "ReplyError", "RequestFailed", "RequestTimeout", "Result", "Usage",
]

log = logging.getLogger(__name__)

# error codes the client raises itself (the mesh's own codes are re-exported from api above)
OVERFLOW = "overflow"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One reply in order. The last chunk has ``done`` set and carries the outcome; its text is the
    tail the mesh held back (often empty) and it has no ``token_id``."""

    request_id: str
    index: int
    text: str
    token_id: int | None = None
    done: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: dict[str, Any] | None = None


@dataclass(frozen=True)
class Result:
    """A whole completion. ``timings`` are the mesh's; ``ttft_s``/``total_s`` are measured here,
    from the call to the first chunk / the final one."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timings: dict[str, Any] = field(default_factory=dict)
    ttft_s: float = 0.0
    total_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.request_id, "text": self.text, "token_ids": list(self.token_ids),
                "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.usage.prompt_tokens,
                          "completion_tokens": self.usage.completion_tokens},
                "timings": self.timings, "client_timings": {"ttft_s": self.ttft_s, "total_s": self.total_s}}


# --- reply parsing and ordering (pure) ------------------------------------


def _parse_reply(obj: Any, request_id: str) -> Chunk | RequestFailed:
    """One reply message as a chunk, or the mesh's error; raises ReplyError for anything else.
    Unknown extra fields are ignored, so that a newer mesh can add some."""

    def bad(why: str) -> ReplyError:
        return ReplyError(f"malformed reply for request {request_id!r}: {why}", request_id)

    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), str) or not isinstance(err.get("message"), str):
            raise bad("'error' must be an object with string 'code' and 'message'")
        return RequestFailed(err["code"], err["message"], request_id)
    index, text = obj.get("index"), obj.get("text")
    if not _is_int(index) or index < 0:
        raise bad(f"'index' must be an integer >= 0, got {index!r}")
    if not isinstance(text, str):
        raise bad("'text' must be a string")
    if obj.get("done") is True:
        usage, timings, reason = obj.get("usage"), obj.get("timings", {}), obj.get("finish_reason")
        if not isinstance(reason, str):
            raise bad("the final message needs a string 'finish_reason'")
        if (not isinstance(usage, dict) or not _is_int(usage.get("prompt_tokens"))
                or not _is_int(usage.get("completion_tokens"))):
            raise bad("the final message needs 'usage' with integer 'prompt_tokens' and 'completion_tokens'")
        if not isinstance(timings, dict):
            raise bad("'timings' must be an object")
        return Chunk(request_id, index, text, None, True, reason,
                     Usage(usage["prompt_tokens"], usage["completion_tokens"]), timings)
    token_id = obj.get("token_id")
    if not _is_int(token_id):
        raise bad("a token message needs an integer 'token_id'")
    return Chunk(request_id, index, text, token_id)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


class _Reorder:
    """Puts one request's chunks back in ``index`` order.

    Replies can come from different nodes, so they can arrive out of order;
    QoS 1 can deliver one twice. Duplicates are dropped; a missing index is a
    gap, which the caller reports when it lasts (``gap_since``). Indices run
    0..n with the final chunk at n <= max_tokens, so the buffer is bounded.
    """

    def __init__(self, request_id: str, max_tokens: int) -> None:
        self.request_id, self.max_index = request_id, max_tokens
        self.next_index = 0
        self.gap_since: float | None = None  # when the chunk at next_index became overdue
        self._held: dict[int, Chunk] = {}
        self._final_index: int | None = None

    def push(self, chunk: Chunk, now: float) -> None:
        i = chunk.index
        if i < self.next_index or i in self._held:
            log.debug("request %s: duplicate reply index %d dropped", self.request_id, i)
            return
        if i > self.max_index:
            raise ReplyError(f"reply index {i} of request {self.request_id!r} is beyond max_tokens "
                             f"({self.max_index})", self.request_id)
        final = i if chunk.done else self._final_index
        beyond = max([j for j in (i, *self._held) if final is not None and j > final], default=None)
        if beyond is not None:
            raise ReplyError(f"request {self.request_id!r} got reply index {beyond} after its final message "
                             f"(index {final})", self.request_id)
        if chunk.done:
            self._final_index = i
        self._held[i] = chunk
        if self.next_index not in self._held and self.gap_since is None:
            self.gap_since = now

    def pop_ready(self, now: float) -> list[Chunk]:
        """The chunks that are now in order; stops after the final one."""
        out = []
        while self.next_index in self._held:
            out.append(self._held.pop(self.next_index))
            self.next_index += 1
        if out:
            self.gap_since = now if self._held else None
        return out

    def describe_gap(self) -> str:
        return (f"reply index {self.next_index} of request {self.request_id!r} is missing while "
                f"{len(self._held)} later one(s) arrived (up to index {max(self._held, default=-1)})")


# --- the client -------------------------------------------------------------


_WAKE = object()  # put in a queue to wake its consumer after a failure
_CLEANUP_S = 3.0  # how long a cancel or unsubscribe may hold up closing the client


class _Pending:
    """One request in flight: where its replies go until its consumer takes them."""

    def __init__(self, request_id: str, topic: str, queue_size: int) -> None:
        self.id, self.topic = request_id, topic
        self.queue: asyncio.Queue[tuple[float, object]] = asyncio.Queue(queue_size)
        self.failure: MeshError | None = None
        self.order: _Reorder | None = None  # set once the request is sent: the replay starts at its next index
        self.payload = b""  # the request as sent, to send again until it is answered

    def deliver(self, arrival: float, obj: object) -> None:
        try:
            self.queue.put_nowait((arrival, obj))
        except asyncio.QueueFull:
            self.fail(ReplyError(f"request {self.id!r}: {self.queue.maxsize} replies are waiting for the "
                                 "consumer; read the stream faster or raise queue_size", self.id, OVERFLOW))

    def fail(self, exc: MeshError) -> None:
        if self.failure is None:
            self.failure = exc
            with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes its consumer anyway
                self.queue.put_nowait((time.monotonic(), _WAKE))


class Client:
    """An MQTT connection to a mesh's broker, shared by any number of concurrent requests.

    ``broker`` is a URL (``mqtt://[user:pass@]host:port`` or ``mqtts://...`` with
    ``ca_file``); None finds the mesh's broker over mDNS like ``meshllm status``.
    ``login`` (user, password) is presented when the URL names no user: a mesh
    with a secret wants its app login (``meshllm credentials``).
    Time-outs, in seconds: ``first_token_timeout`` from sending a request to its
    first reply (it includes queueing on a busy mesh and the prefill),
    ``idle_timeout`` between replies, ``gap_timeout`` for a missing index while
    later ones arrive. ``queue_size`` bounds the replies buffered per request
    for a slow consumer.

    If the broker connection drops (a restart, or the mesh moving to another
    broker), the client reconnects for up to ``reconnect_timeout`` seconds (to
    the same URL, or to the broker mDNS finds now), subscribes again and asks
    the mesh to publish again the replies of each request in flight from the
    first index it lacks (``replay``); indices it has are dropped, so the
    stream goes on as if nothing happened. Past that time requests in flight
    fail with :class:`BrokerError`. Until a request's first reply arrives it is
    sent again every ``resend_s`` seconds (the mesh serves it once), so that
    one sent while the mesh changed planner or broker is not lost.
    """

    def __init__(self, mesh: str = "meshllm", broker: str | None = None, interface: str | None = None,
                 ca_file: str | None = None, *, first_token_timeout: float = 120.0, idle_timeout: float = 30.0,
                 gap_timeout: float = 2.0, queue_size: int = 1024, discovery_timeout: float = 5.0,
                 login: tuple[str, str] | None = None, reconnect_timeout: float = 30.0,
                 resend_s: float = 3.0) -> None:
        try:
            self.topics = Topics(mesh)
        except ValueError as e:
            raise MeshError(str(e)) from None
        self.mesh, self.broker, self.interface, self.ca_file = mesh, broker, interface, ca_file
        self.first_token_timeout, self.idle_timeout, self.gap_timeout = first_token_timeout, idle_timeout, gap_timeout
        self.queue_size, self.discovery_timeout = queue_size, discovery_timeout
        self.login = login
        self.reconnect_timeout, self.resend_s = reconnect_timeout, resend_s
        self._connected = asyncio.Event()
        self.broker_display = "(not connected)"
        self._mqtt: aiomqtt.Client | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._reader: asyncio.Task[None] | None = None
        self._open = False
        self._lost: BrokerError | None = None
        self._inflight: dict[str, _Pending] = {}
        self._topic_users: dict[str, set[str]] = {}  # reply topic -> ids of requests in flight on it
        self._subscribed: set[str] = set()

    @property
    def lost(self) -> bool:
        """Whether the broker connection is gone for good (reconnecting failed): re-enter the client."""
        return self._lost is not None

    # --- lifecycle ---------------------------------------------------------

    async def _connect(self) -> aiomqtt.Client:
        url = self.broker or await find_broker(self.mesh, self.interface, self.discovery_timeout)
        b = BrokerURL.parse(with_login(url, self.login))
        self.broker_display = str(b)  # without the password
        try:
            mqtt = aiomqtt.Client(**b.client_kwargs(self.ca_file), keepalive=5, timeout=10,
                                  identifier=f"meshllm-client-{secrets.token_hex(4)}")
            mqtt.pending_calls_threshold = 1024  # many concurrent requests are the point, not a warning sign
            await mqtt.__aenter__()
        except (aiomqtt.MqttError, OSError) as e:
            raise BrokerError(f"cannot connect to the broker at {b}: {e}") from None
        return mqtt

    async def __aenter__(self) -> Client:
        mqtt = await self._connect()
        self._connected.set()
        self._mqtt, self._lost, self._open = mqtt, None, True
        self._inflight.clear()
        self._topic_users.clear()
        self._subscribed.clear()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._reader = self._tg.create_task(self._read(), name="meshllm-client-reader")
        log.debug("client connected to %s for mesh %r", self.broker_display, self.mesh)
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._open = False
        for p in list(self._inflight.values()):  # streams whose consumer never finished
            p.fail(MeshError(f"the client was closed while request {p.id!r} was in flight"))
            self._release(p, cancel=True)
        assert self._tg is not None and self._reader is not None and self._mqtt is not None
        self._reader.cancel()
        try:
            # not the body's exception: that would cancel the tasks still publishing cancels
            await self._tg.__aexit__(None, None, None)
        finally:
            self._tg = None
            with contextlib.suppress(aiomqtt.MqttError):
                await self._mqtt.__aexit__(None, None, None)

    async def _read(self) -> None:
        """Owns the connection's incoming messages: hands each to its request's queue; reconnects."""
        mqtt = self._mqtt
        while mqtt is not None:
            try:
                async for msg in mqtt.messages:
                    payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                    self._dispatch(str(msg.topic), bytes(payload), time.monotonic())
                return
            except aiomqtt.MqttError as e:
                log.warning("lost the connection to the broker at %s: %s; reconnecting", self.broker_display, e)
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await mqtt.__aexit__(None, None, None)
                mqtt = await self._reconnect(str(e))

    async def _reconnect(self, why: str) -> aiomqtt.Client | None:
        """A new connection with the old subscriptions, and a replay of what each request missed; None (and
        every request in flight failed) if none can be made within ``reconnect_timeout``."""
        deadline = time.monotonic() + self.reconnect_timeout
        while time.monotonic() < deadline:
            try:
                mqtt = await self._connect()
                for topic in sorted(self._subscribed):
                    await mqtt.subscribe(topic, qos=1)
                for p in list(self._inflight.values()):
                    if p.order is not None:
                        await mqtt.publish(self.topics.replay, json.dumps({"id": p.id, "from": p.order.next_index}),
                                           qos=1)
            except (MeshError, aiomqtt.MqttError, OSError) as e:
                log.debug("reconnecting: %s", e)
                await asyncio.sleep(0.5)
                continue
            self._mqtt = mqtt
            self._connected.set()
            log.warning("reconnected to the broker at %s; asked for the replies of %d request(s) again",
                        self.broker_display, sum(1 for p in self._inflight.values() if p.order is not None))
            return mqtt
        self._lost = BrokerError(f"lost the connection to the broker at {self.broker_display} ({why}) and "
                                 f"found none again within {self.reconnect_timeout:g} s")
        log.warning("%s", self._lost)
        self._connected.set()  # wake whoever waits for the connection: they now see _lost
        for p in self._inflight.values():
            p.fail(self._lost)
        return None

    def _dispatch(self, topic: str, payload: bytes, arrival: float) -> None:
        users = self._topic_users.get(topic)
        if not users:
            return  # a late reply after we left
        try:
            obj: object = json.loads(payload)
        except (ValueError, RecursionError):
            obj = None  # _parse_reply reports it
        rid = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(rid, str):
            targets = [rid] if rid in users else []
        else:  # whose it is cannot be told: everyone on the topic hears of it
            targets = list(users)
        for t in targets:
            self._inflight[t].deliver(arrival, obj)

    # --- requests ----------------------------------------------------------

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
               max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
               request_id: str | None = None, reply_to: str | None = None,
               first_token_timeout: float | None = None, idle_timeout: float | None = None
               ) -> AsyncGenerator[Chunk, None]:
        """Sends one request and yields its :class:`Chunk` s in order, the final one last.

        Give ``prompt`` or ``messages``; parameters left None take the mesh's
        defaults; ``request_id`` (default: random) and ``reply_to`` (default:
        ``replies/<id>``) are for apps that need to name them. The arguments are
        checked now, by the mesh's own rules: a refusal raises
        :class:`RequestFailed` with the code and message the mesh would send.
        Nothing is sent until iteration starts. An ``error`` reply raises
        :class:`RequestFailed` too. Stopping early (``break``, a cancelled task)
        cancels the request on the mesh; wrap the stream in
        ``contextlib.aclosing`` if the generator may be kept alive after that.
        """
        if not self._open:
            raise RuntimeError("use the client inside 'async with Client(...)'")
        rid = request_id or f"c{secrets.token_hex(8)}"
        obj: dict[str, Any] = {"id": rid}
        for k, v in (("prompt", prompt), ("max_tokens", max_tokens), ("temperature", temperature),
                     ("top_p", top_p), ("top_k", top_k), ("seed", seed), ("reply_to", reply_to)):
            if v is not None:
                obj[k] = v
        if messages is not None:
            obj["messages"] = ([dict(m) if isinstance(m, Mapping) else m for m in messages]
                               if isinstance(messages, (list, tuple)) else messages)
        if stop is not None:
            obj["stop"] = stop if isinstance(stop, str) else list(stop)
        try:
            payload = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # an unpaired surrogate: let parse_request say so, as the mesh would
            payload = json.dumps(obj).encode("ascii")
        except (TypeError, ValueError) as e:
            raise RequestFailed(INVALID_REQUEST, f"request is not JSON-serializable: {e}", rid) from None
        req = api.parse_request(payload, self.topics.replies)  # the mesh's own refusal, raised here
        if rid in self._inflight:
            raise RequestFailed(INVALID_REQUEST, f"request id {rid!r} is already in flight on this client", rid)
        return self._run(req, payload, self.first_token_timeout if first_token_timeout is None else first_token_timeout,
                         self.idle_timeout if idle_timeout is None else idle_timeout)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """Sends one request and waits for the whole :class:`Result`; arguments as for :meth:`stream`."""
        t0 = time.monotonic()
        ttft: float | None = None
        parts: list[str] = []
        ids: list[int] = []
        async with contextlib.aclosing(self.stream(prompt, **kwargs)) as chunks:
            async for c in chunks:
                ttft = time.monotonic() - t0 if ttft is None else ttft
                parts.append(c.text)
                if c.token_id is not None:
                    ids.append(c.token_id)
                if c.done:
                    assert c.finish_reason is not None and c.usage is not None
                    return Result(c.request_id, "".join(parts), tuple(ids), c.finish_reason, c.usage,
                                  c.timings or {}, ttft, time.monotonic() - t0)
        raise AssertionError("the stream ended without a final chunk")  # _run never does that

    async def _run(self, req: api.Request, payload: bytes, first_token_timeout: float,
                   idle_timeout: float) -> AsyncGenerator[Chunk, None]:
        pending = self._register(req)
        cancel = True
        try:
            await self._subscribe(pending.topic)
            t0 = time.monotonic()
            await self._call(lambda m: m.publish(self.topics.requests, payload, qos=1))
            log.debug("request %s sent, replies on %s", req.id, pending.topic)
            order = pending.order = _Reorder(req.id, req.sampling.max_tokens)
            pending.payload = payload
            last_arrival: float | None = None
            while True:
                for chunk in order.pop_ready(time.monotonic()):
                    cancel = not chunk.done  # before the yield: a consumer may close us right at the final chunk
                    yield chunk
                    if chunk.done:
                        return
                last_arrival, obj = await self._next_reply(pending, order, t0, last_arrival, first_token_timeout,
                                                           idle_timeout)
                reply = _parse_reply(obj, req.id)
                if isinstance(reply, RequestFailed):
                    cancel = False  # the mesh has ended it
                    raise reply
                order.push(reply, last_arrival)
        finally:
            self._release(pending, cancel=cancel)

    async def _next_reply(self, p: _Pending, order: _Reorder, t0: float, last_arrival: float | None,
                          first_token_timeout: float, idle_timeout: float) -> tuple[float, object]:
        """The next message for ``p`` with its arrival time, or the time-out that applies now."""
        if p.queue.empty():
            if p.failure is not None:
                raise p.failure
            rid = p.id
            if order.gap_since is not None:
                deadline = order.gap_since + self.gap_timeout
                late: RequestFailed = ReplyError(f"{order.describe_gap()} for {self.gap_timeout:g} s", rid)
            elif last_arrival is None:
                deadline = t0 + first_token_timeout
                late = RequestTimeout(f"no reply to request {rid!r} within {first_token_timeout:g} s "
                                      f"(first_token_timeout); is the mesh {self.mesh!r} serving? "
                                      "see 'meshllm status'", rid)
            else:
                deadline = last_arrival + idle_timeout
                late = RequestTimeout(f"the mesh stopped replying to request {rid!r} after index "
                                      f"{order.next_index - 1} for {idle_timeout:g} s (idle_timeout)", rid)
            while True:
                # Until the first reply the request is sent again every resend_s: one sent while no node was
                # planner (a hand-over) or while the nodes were away from the broker is then not lost; the
                # mesh serves a request it already holds once.
                until = deadline if last_arrival is not None else min(deadline, time.monotonic() + self.resend_s)
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
                    # arrives together with a reply (CPython gh-86296), and the consumer would keep streaming
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        arrival, obj = await p.queue.get()
                    break
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise late from None
                    log.debug("request %s: no reply yet; sending it again", rid)
                    await self._call(lambda m: m.publish(self.topics.requests, p.payload, qos=1))
        else:  # what has arrived counts, even when the consumer was slower than the deadline
            arrival, obj = p.queue.get_nowait()
        if obj is _WAKE:
            assert p.failure is not None
            raise p.failure
        return arrival, obj

    # --- bookkeeping; every step up to the packet it sends runs without awaiting, so that
    # --- subscribe/unsubscribe packets for a shared reply topic go out in the order decided

    def _register(self, req: api.Request) -> _Pending:
        if not self._open:
            raise RuntimeError("the client is closed")
        if self._lost is not None:
            raise self._lost
        if req.id in self._inflight:
            raise RequestFailed(INVALID_REQUEST, f"request id {req.id!r} is already in flight on this client", req.id)
        p = _Pending(req.id, req.reply_to, self.queue_size)
        self._inflight[req.id] = p
        self._topic_users.setdefault(p.topic, set()).add(req.id)
        return p

    async def _subscribe(self, topic: str) -> None:
        if topic not in self._subscribed:
            self._subscribed.add(topic)
            await self._call(lambda m: m.subscribe(topic, qos=1))

    def _release(self, p: _Pending, *, cancel: bool) -> None:
        """Forgets a request; the cancel and unsubscribe go out from a task the client owns, so
        that this works from a generator's ``finally`` whatever ended it (break, cancellation, GC)."""
        if self._inflight.get(p.id) is not p:
            return  # released already
        del self._inflight[p.id]
        users = self._topic_users.get(p.topic, set())
        users.discard(p.id)
        if not users:
            self._topic_users.pop(p.topic, None)
        if self._tg is None or self._lost is not None:
            return
        try:
            self._tg.create_task(self._cleanup(p.id, p.topic, cancel), name=f"meshllm-client-cleanup-{p.id}")
        except RuntimeError:  # the task group has finished: the connection is gone anyway
            log.debug("request %s: client closed before its cleanup", p.id)

    async def _cleanup(self, request_id: str, topic: str, cancel: bool) -> None:
        mqtt = self._mqtt_client()
        try:
            if cancel:
                log.debug("request %s: cancelling", request_id)
                await mqtt.publish(self.topics.cancel, json.dumps({"id": request_id}), qos=1, timeout=_CLEANUP_S)
            if topic not in self._topic_users and topic in self._subscribed:
                self._subscribed.discard(topic)
                await mqtt.unsubscribe(topic, timeout=_CLEANUP_S)
        except aiomqtt.MqttError as e:
            log.debug("request %s: cleanup failed: %s", request_id, e)

    def _mqtt_client(self) -> aiomqtt.Client:
        if self._mqtt is None:
            raise RuntimeError("use the client inside 'async with Client(...)'")
        return self._mqtt

    async def _call(self, op: Any, attempts: int = 3) -> Any:
        """``op(connection)``; while the client reconnects it waits, then tries again on the new connection (a
        request sent twice is recognised by the mesh as the same one)."""
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(self.reconnect_timeout + self.discovery_timeout):
                    await self._connected.wait()
            except TimeoutError:
                pass
            if self._lost is not None:
                raise self._lost
            mqtt = self._mqtt_client()
            try:
                return await op(mqtt)
            except aiomqtt.MqttError as e:
                if self._lost is not None:
                    raise self._lost from None
                if attempt == attempts - 1:
                    raise BrokerError(f"the broker at {self.broker_display} failed a request: {e}") from None
                # the reader notices a lost connection and makes a new one: try again on that
                now = time.monotonic()
                deadline, noticed_by = now + self.reconnect_timeout + self.discovery_timeout, now + 2.0
                while self._mqtt is mqtt and self._lost is None and time.monotonic() < deadline:
                    if self._connected.is_set() and time.monotonic() > noticed_by:  # the connection is fine:
                        raise BrokerError(f"the broker at {self.broker_display} refused a request: {e}") from None
                    await asyncio.sleep(0.05)
