"""``meshllm node``: one device's membership in the mesh.

A :class:`Node` is an async context manager. Entering it measures the device's
profile, opens the data-plane port, advertises the node over mDNS, and starts
the mesh loop: find (or host) the broker, gossip the profile as a retained
message with a last will that clears it, send heartbeats, expire silent
members, and take part in the planner election. Leaving it clears the
profile, withdraws the mDNS record and stops any hosted broker, so peers see
the node go at once instead of waiting for a time-out.

The decisions (broker choice, membership, election) are pure functions and
state machines in sibling modules; this module only feeds them events and
performs what they decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from meshllm.aio import stop_task
from meshllm.dataplane.auth import secret_key
from meshllm.dataplane.links import PeerUnreachable
from meshllm.dataplane.server import IDLE_TIMEOUT, DataPlane, Handler, probe_link
from meshllm.errors import ConfigError, MeshError, NodeIdInUse, SecretError
from meshllm.logs import RateLimitedLog
from meshllm.logs import clip as _short
from meshllm.mesh import broker_check
from meshllm.mesh.access import NODE_USER, node_login, node_token
from meshllm.mesh.broker import BrokerURL, EmbeddedBroker, choose_broker, port_open
from meshllm.mesh.discovery import Discovery
from meshllm.mesh.election import Election
from meshllm.mesh.membership import Membership
from meshllm.mesh.payloads import loads_object
from meshllm.mesh.topics import PROTOCOL_VERSION, Topics
from meshllm.profile import DeviceProfile, Link, measure_profile
from meshllm.secret import check_secret

log = logging.getLogger(__name__)
MAX_RECORD = 256 << 10  # bytes of a member record, planner claim or heartbeat (plans: payloads.MAX_PAYLOAD)
MAX_HEARTBEAT = 1 << 10
DEAF_AFTER_S = 5.0  # a session whose own heartbeats stopped coming back this long is left and made anew


@dataclass(frozen=True)
class Emulation:
    """Make this node behave like a slower device (demos, tests). Documented as emulation, never as a measurement."""

    compute_scale: float = 1.0  # compute and memory bandwidth divided by this, and segment run time multiplied
    memory_cap: int | None = None  # bytes
    link_delay_s: float = 0.0  # added one-way delay on this node's data-plane replies
    # "scale": a stage sleeps (compute_scale - 1) x each run it measured, so host noise is scaled too;
    # "model": each run lasts what the cost model predicts for the emulated profile (quiet, repeatable)
    timing: str = "scale"


@dataclass(frozen=True)
class NodeConfig:
    mesh: str = "meshllm"
    name: str = field(default_factory=socket.gethostname)
    node_id: str | None = None  # default: <name>-<random hex>
    broker: str | None = None  # mqtt://[user:pass@]host:port or mqtts://...
    broker_ca: str | None = None  # CA file for mqtts://
    port: int = 0  # data-plane TCP port (0: any free port)
    interface: str | None = None  # IPv4 address to bind mDNS and the data plane to (default: the LAN address)
    model: str | None = None
    plan_file: str | None = None  # pin this plan instead of computing one (operators, tests)
    secret: str | None = None  # mesh secret: data-plane peers must prove they hold it
    open_mesh: bool = False  # no secret: the owner's explicit choice (a mesh is closed by default)
    workload: str | None = None  # workload spec the planner optimises for (see `meshllm plan --workload`)
    objective: str = "wait"  # what the planner minimises: mean "wait" or mean end-to-end time ("response")
    emulation: Emulation = Emulation()
    heartbeat_s: float = 0.5
    failure_timeout_s: float = 1.5
    settle_s: float = 1.0  # time to listen to mDNS before deciding to host a broker
    dataplane_idle_s: float = IDLE_TIMEOUT  # a data-plane connection that sends nothing this long is closed
    profile: DeviceProfile | None = None  # skip measuring (tests, simulations)
    quick_profile: bool = False


class _SwitchBroker(Exception):
    """The broker rule now points elsewhere: leave this session and reconnect."""


class _Deaf(Exception):
    """The broker stopped delivering our own heartbeats back to us: leave this session and reconnect."""


@dataclass(frozen=True)
class Incarnation:
    """Which process a node id's heartbeats and record come from: a random ``instance`` per process, and
    when it started (wall clock), so that of two processes with one id the younger can step aside."""

    instance: str
    since: float

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Incarnation | None:
        instance, since = payload.get("instance"), payload.get("since")
        if not isinstance(instance, str) or not isinstance(since, (int, float)) or isinstance(since, bool):
            return None
        return cls(instance, float(since))

    def younger_than(self, other: Incarnation) -> bool:
        return (self.since, self.instance) > (other.since, other.instance)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        if not config.heartbeat_s > 0 or not config.failure_timeout_s >= 2 * config.heartbeat_s:
            raise ConfigError(f"--failure-timeout {config.failure_timeout_s:g} must be at least twice --heartbeat "
                              f"{config.heartbeat_s:g} (a member is declared lost after missing that many)")
        self.config = config
        self.node_id = config.node_id or f"{config.name}-{secrets.token_hex(3)}"
        self.topics = Topics(config.mesh)
        self.membership = Membership(self.node_id, timeout=config.failure_timeout_s)
        self.election = Election(self.node_id)
        self.profile: DeviceProfile | None = None
        self.broker_url: str | None = None
        self.plan: dict[str, Any] | None = None
        self._held_plan: dict[str, Any] | None = None  # a plan of a term whose claim has not arrived yet
        self.links: dict[str, Link] = {}
        # the view (members and their records, the planner, the plan, the session, being in touch) changed:
        # a version and an event that is replaced at each change, so that any number of tasks can wait on it
        self._view_version = 0
        self._view_event = asyncio.Event()
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._hosted: EmbeddedBroker | None = None
        self._stack = contextlib.AsyncExitStack()
        self._main: asyncio.Task[None] | None = None
        self._plan_listeners: list[Callable[[dict[str, Any]], Awaitable[None]]] = []
        self._subscriptions: list[tuple[str, Callable[[aiomqtt.Message], Awaitable[None]]]] = []
        self._session_listeners: list[Callable[[], Awaitable[None]]] = []
        self._broker_epochs: dict[str, str] = {}  # hosted broker URL -> epoch its host proved (one-time logins)
        self._echo = 0.0  # when our own last heartbeat came back through the broker
        self._started = time.monotonic()
        self._leaving = False
        self.incarnation = Incarnation(secrets.token_hex(8), time.time())
        self._sessions = 0  # broker sessions begun so far
        self._rlog = RateLimitedLog(log)  # for what others can trigger at will (malformed messages)
        self._record_extra: dict[str, Any] = {}  # fields a service adds to this node's record (set_record_fields)
        self._routes: list[tuple[str, Handler]] = []  # data-plane routes of services, made when the port opens
        if config.secret is None and not config.open_mesh:
            raise SecretError("a mesh is closed by default: give the node a secret (NodeConfig.secret), or "
                              "open_mesh=True for a mesh anyone on the LAN may use")
        if config.secret is not None:
            check_secret(config.secret)
        self.key = secret_key(config.secret) if config.secret else None

    # --- lifecycle ----------------------------------------------------

    async def __aenter__(self) -> Node:
        cfg = self.config
        try:
            profile = cfg.profile or await asyncio.get_running_loop().run_in_executor(
                None, lambda: measure_profile(self.node_id, cfg.name, quick=cfg.quick_profile))
            em = cfg.emulation
            self.profile = profile.emulate(em.compute_scale, em.memory_cap, em.link_delay_s)
            host = cfg.interface or "0.0.0.0"
            self.dataplane = await self._stack.enter_async_context(
                DataPlane(host, cfg.port, delay_s=em.link_delay_s, key=self.key, idle_timeout=cfg.dataplane_idle_s))
            self.dataplane.route(broker_check.QUERY, lambda msg, writer: broker_check.answer(
                self.key, (self._hosted.url, self._hosted.epoch) if self._hosted else None, msg, writer))
            for kind, handler in self._routes:
                self.dataplane.route(kind, handler)
            self.discovery = await self._stack.enter_async_context(
                Discovery(self.node_id, cfg.mesh, self.dataplane.port, interface=cfg.interface, key=self.key))
            self._main = asyncio.get_running_loop().create_task(self._run(), name=f"node-{self.node_id}")
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._leave()
            if self._main is not None:
                await stop_task(self._main)  # a caller cancelled meanwhile stays cancelled (after the cleanup)
        finally:
            await self._stop_hosted_broker()
            await self._stack.aclose()

    async def wait_stopped(self) -> None:
        """Waits until the mesh loop ends (it only ends on error or cancellation)."""
        assert self._main is not None
        await self._main

    def on_plan(self, listener: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._plan_listeners.append(listener)

    def on_session(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Runs ``listener`` at the start of every broker session (a new broker holds no retained state)."""
        self._session_listeners.append(listener)

    def subscribe(self, topic_filter: str, handler: Callable[[aiomqtt.Message], Awaitable[None]]) -> None:
        """Adds a subscription (made on every broker session) whose messages go to ``handler``."""
        self._subscriptions.append((topic_filter, handler))

    def route(self, kind: str, handler: Handler) -> None:
        """Sends data-plane frames of type ``kind`` to ``handler`` (call it before entering the node)."""
        self._routes.append((kind, handler))

    async def set_record_fields(self, fields: Mapping[str, Any]) -> None:
        """Adds (or replaces) fields of this node's gossiped record and restates it if a session is up."""
        self._record_extra.update(fields)
        await self._publish_record()

    async def update_profile(self, profile: DeviceProfile) -> None:
        """Replaces this node's gossiped profile (a figure measured while serving) and restates its record."""
        self.profile = profile
        await self._publish_record()

    async def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Publishes on the current broker session; False when not connected (the caller decides)."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError:
            return False
        return True

    # --- the view -----------------------------------------------------

    @property
    def in_touch(self) -> bool:
        """Whether this node hears the mesh: connected, and its own heartbeat came back lately. A node that
        is not must not act on its view of the others (expire them, resume their requests, re-plan)."""
        return self.connected.is_set() and time.monotonic() - self._echo < self.config.failure_timeout_s

    @property
    def is_planner(self) -> bool:
        return self.election.leader == self.node_id

    @property
    def planner_id(self) -> str | None:
        """The elected planner's node id, if one is known."""
        return self.election.leader

    def member_ids(self) -> set[str]:
        return set(self.membership.members)

    def member_records(self) -> dict[str, dict[str, Any]]:
        """Node id -> its gossiped record (a copy of the mapping; the records are not to be changed)."""
        return {m.node_id: m.info for m in self.membership.members.values()}

    def address_of(self, node_id: str) -> tuple[str, int]:
        """The data-plane address of a member (this node's own too); :class:`PeerUnreachable` if it is none."""
        if node_id == self.node_id:
            return (self.discovery.address, self.dataplane.port)
        m = self.membership.members.get(node_id)
        if m is None:
            raise PeerUnreachable(f"node {node_id} is not a member of the mesh")
        return (str(m.info["host"]), int(m.info["port"]))

    @property
    def view_version(self) -> int:
        """Grows at every change of the view (members and their records, planner, plan, session, in touch)."""
        return self._view_version

    async def view_changed(self, since: int) -> int:
        """Waits until the view changed after version ``since`` (at once if it already has); its version now."""
        while self._view_version == since:
            await self._view_event.wait()
        return self._view_version

    def _changed(self) -> None:
        self._view_version += 1
        event, self._view_event = self._view_event, asyncio.Event()
        event.set()

    def _record(self) -> dict[str, Any]:
        assert self.profile is not None
        return {
            "node_id": self.node_id,
            "name": self.config.name,
            "version": PROTOCOL_VERSION,
            "host": self.discovery.address,
            "port": self.dataplane.port,
            "profile": self.profile.to_json(),
            "links": {k: {"latency_s": v.latency_s, "bandwidth_Bps": v.bandwidth_Bps} for k, v in self.links.items()},
            "hosts_broker": self._hosted.url if self._hosted else None,
            "model": os.path.basename(self.config.model.rstrip("/")) if self.config.model else None,
            **self._record_extra,
            "instance": self.incarnation.instance,
            "since": self.incarnation.since,
        }

    # --- broker -------------------------------------------------------

    async def _find_broker(self) -> str:
        """Applies the broker rule until it yields a reachable broker (hosting one if it is our turn)."""
        settle_until = self._started + self.config.settle_s
        while True:
            d = self.discovery
            live = [p.node_id for p in d.peers.values()]
            choice = choose_broker(self.node_id, self.config.broker, d.broker_ads(), live)
            if choice == "host" and time.monotonic() < settle_until:
                choice = None  # listen a little longer before deciding to host
            if choice == "host":
                return await self._host_broker()
            if choice is None:
                # wait for a peer with a smaller id to host; drop such peers that are dead
                for p in [p for p in d.peers.values() if p.node_id < self.node_id]:
                    alive = (await broker_check.holds_secret(self.key, p.host, p.port) if self.key is not None
                             else await port_open(p.host, p.port))
                    if not alive:
                        d.forget_peer(p.node_id)
                with contextlib.suppress(asyncio.TimeoutError):
                    d.changed.clear()
                    await asyncio.wait_for(d.changed.wait(), 0.25)
                continue
            url = BrokerURL.parse(choice)
            if not await self._confirm_broker(choice):
                continue
            if await port_open(url.host, url.port):
                return choice
            log.info("%s: broker %s is unreachable", self.node_id, url)
            if self.config.broker:
                await asyncio.sleep(0.5)  # a configured broker: keep trying it
            else:
                d.forget_broker(choice)

    async def _confirm_broker(self, url: str) -> bool:
        """With a secret, a broker that a peer advertises is used only once that peer proves, live over the data
        plane, that it hosts it (:mod:`meshllm.mesh.broker_check`); its epoch is kept for the one-time login."""
        d = self.discovery
        hosts = [p for p in d.peers.values() if p.broker == url]
        if self.key is None or not hosts or url == self.config.broker:
            return True
        peer = hosts[0]
        epoch = await broker_check.confirmed_epoch(self.key, peer.host, peer.port, url)
        if epoch is None:
            log.warning("%s: %s advertises the broker %s but could not prove it hosts it (a stale or replayed "
                        "mDNS record?): ignored", self.node_id, peer.node_id, url)
            d.refute(peer)
            return False
        self._broker_epochs[url] = epoch
        return True

    async def _host_broker(self) -> str:
        if self._hosted is None:
            # a broker found over mDNS takes one-time node logins only (never the static node password)
            broker = EmbeddedBroker(self.discovery.address, secret=self.config.secret, static_node_login=False)
            await broker.__aenter__()
            self._hosted = broker
            await self.discovery.set_broker(broker.url, broker.epoch)
            log.info("%s: hosting the mesh broker at %s", self.node_id, broker.url)
        return self._hosted.url

    async def _stop_hosted_broker(self) -> None:
        if self._hosted is not None:
            broker, self._hosted = self._hosted, None
            with contextlib.suppress(Exception):
                await self.discovery.set_broker(None)
            await broker.__aexit__(None, None, None)

    # --- the mesh loop --------------------------------------------------

    async def _run(self) -> None:
        in_use: NodeIdInUse | None = None
        while in_use is None:
            url = await self._find_broker()
            try:
                await self._check_identity(url)
                await self._session(url)
            except* NodeIdInUse as eg:
                in_use = eg.exceptions[0]  # type: ignore[assignment]
            except* _SwitchBroker:
                log.info("%s: moving to another broker", self.node_id)
            except* _Deaf as eg:
                log.warning("%s: %s; reconnecting", self.node_id, eg.exceptions[0])
            except* aiomqtt.MqttError as eg:
                log.warning("%s: lost broker %s: %s", self.node_id, BrokerURL.parse(url), eg.exceptions[0])
                if not self.config.broker and not (self._hosted and self._hosted.url == url):
                    self.discovery.forget_broker(url)
            finally:
                self._client = None
                self.connected.clear()
                self._changed()
            if self._hosted is not None and self._hosted.url != self._chosen_url():
                await self._stop_hosted_broker()
            await asyncio.sleep(0.05)
        self._leaving = True  # the retained record under our id is the other process's: leave it be
        raise in_use

    def _chosen_url(self) -> str | None:
        d = self.discovery
        choice = choose_broker(self.node_id, self.config.broker, d.broker_ads(), list(d.peers))
        return self._hosted.url if choice == "host" and self._hosted else choice

    def _client_kwargs(self, b: BrokerURL) -> dict[str, Any]:
        kwargs = b.client_kwargs(self.config.broker_ca)
        if self.config.secret and not b.username:  # the mesh's own broker wants the node login (docs/security.md)
            # a broker a node hosts wants a one-time token per connection; a configured one the static login
            url = str(b)
            epoch = self._hosted.epoch if self._hosted and self._hosted.url == url else self._broker_epochs.get(url)
            kwargs["username"], kwargs["password"] = (
                (NODE_USER, node_token(self.config.secret, epoch)) if epoch else node_login(self.config.secret))
        return kwargs

    async def _check_identity(self, url: str) -> None:
        """Before a session under our id, looks (as a throw-away client, which disturbs nobody) for a live
        process already using it: MQTT client ids are node ids, and a second CONNECT with one takes over the
        first one's session. A live process heartbeats; a retained record alone may be a dead one's. Raises
        :class:`NodeIdInUse` on the first session, and on a later one if we are the younger of the two."""
        b = BrokerURL.parse(url)
        loop = asyncio.get_running_loop()
        other: Incarnation | None = None
        async with aiomqtt.Client(**self._client_kwargs(b), identifier=f"idcheck-{secrets.token_hex(6)}",
                                  clean_session=True, timeout=5) as client:
            await client.subscribe(self.topics.member(self.node_id), qos=1)
            await client.subscribe(self.topics.heartbeat(self.node_id), qos=0)
            # the retained record comes at once; only if it is another process's, wait for its heartbeats
            deadline = loop.time() + 0.3
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline) as timeout:
                    async for msg in client.messages:
                        payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                        try:
                            seen = Incarnation.of(loads_object(payload, MAX_RECORD)) if payload else None
                        except ValueError:
                            continue
                        if seen is None or seen.instance == self.incarnation.instance:
                            continue
                        if msg.topic.matches(self.topics.heartbeats):
                            other = seen
                            break
                        timeout.reschedule(loop.time() + self.config.failure_timeout_s + self.config.heartbeat_s)
        if other is None:
            return
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.since))
        if self._sessions == 0 or self.incarnation.younger_than(other):
            raise NodeIdInUse(f"node id {self.node_id!r} is already in use on mesh {self.config.mesh!r} by a live "
                              f"node (started {started}, broker {b}); stop that node or pick another --node-id")
        log.warning("%s: another process (started %s) took over our broker session with our node id; "
                    "taking it back (it is the younger and steps aside)", self.node_id, started)

    @property
    def _keepalive_s(self) -> int:
        """The broker fires our will (we left) after 1.5 keep-alive periods without a packet from us: about the
        failure timeout, never sooner than 3 s."""
        return max(2, math.ceil(self.config.failure_timeout_s / 1.5))

    async def _session(self, url: str) -> None:
        b = BrokerURL.parse(url)
        will = aiomqtt.Will(self.topics.member(self.node_id), b"", qos=1, retain=True)
        self._sessions += 1
        async with aiomqtt.Client(**self._client_kwargs(b), identifier=self.node_id, will=will,
                                  keepalive=self._keepalive_s, clean_session=True, timeout=5) as client:
            self._client = client
            self.broker_url = str(b)
            for t in (self.topics.members, self.topics.heartbeats, self.topics.planner, self.topics.plan,
                      *(f for f, _ in self._subscriptions)):
                await client.subscribe(t, qos=1)
            self.membership.grace(time.monotonic(), self.config.failure_timeout_s)
            await self._publish_record()
            self.connected.set()
            self._changed()
            log.info("%s: joined mesh %r via %s", self.node_id, self.config.mesh, b)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client))
                tg.create_task(self._heartbeat(client))
                tg.create_task(self._watch_broker(url))
                tg.create_task(self._measure_links())
                for listener in self._session_listeners:
                    tg.create_task(listener())

    async def republish_record(self) -> None:
        await self._publish_record()

    async def _publish_record(self) -> None:
        if self._client is not None:
            await self._client.publish(self.topics.member(self.node_id), json.dumps(self._record()), qos=1,
                                       retain=True)

    async def _publish_claim(self, term: int) -> None:
        assert self._client is not None
        await self._client.publish(self.topics.planner, json.dumps({"node": self.node_id, "term": term}),
                                   qos=1, retain=True)

    async def publish_plan(self, plan: dict[str, Any]) -> None:
        """Publishes a plan stamped with this planner's term (only the planner may)."""
        if not self.is_planner or self._client is None:
            raise RuntimeError("only the connected planner publishes plans")
        stamped = {**plan, "term": self.election.term, "planner": self.node_id}
        await self._client.publish(self.topics.plan, json.dumps(stamped), qos=1, retain=True)

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Feeds each message to its handler. Anyone on the broker may publish anything: a message that
        fails to decode or to be handled costs only itself (and a rate-limited warning), never the session."""
        for_session = (aiomqtt.MqttError, _SwitchBroker, _Deaf, NodeIdInUse)
        async for msg in client.messages:
            try:
                await self._handle(client, msg)
            except for_session:
                raise
            except (ValueError, KeyError, TypeError, ArithmeticError) as e:
                topic = str(msg.topic)
                self._rlog.warning(self._source(topic), "%s: ignoring malformed message on %s: %s",
                                   self.node_id, _short(topic), _short(f"{type(e).__name__}: {e}", 200))
            except Exception:  # a handler's bug: log it (its traceback, rate-limited) and go on
                topic = str(msg.topic)
                self._rlog.exception(self._source(topic), "%s: handling a message on %s failed",
                                     self.node_id, _short(topic))

    def _source(self, topic: str) -> str:
        """The rate-limiting key of a message: its kind of topic (members, heartbeat, plan, ...)."""
        rest = topic[len(self.topics.root) + 1:] if topic.startswith(self.topics.root + "/") else topic
        return "mqtt " + _short(rest.split("/", 1)[0], 40)

    async def _handle(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        now = time.monotonic
        topic = str(msg.topic)
        payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
        if msg.topic.matches(self.topics.heartbeats):
            sender = self.topics.leaf(topic)
            if sender == self.node_id:
                seen = Incarnation.of(loads_object(payload, MAX_HEARTBEAT))
                if seen == self.incarnation:
                    was_in_touch = self.in_touch
                    self._echo = now()
                    if not was_in_touch:
                        self._changed()  # back in touch: what waited for it may act now
                elif seen is not None:
                    self._other_process(seen)
                    return
            self.membership.on_heartbeat(sender, now())
        elif msg.topic.matches(self.topics.members):
            info = loads_object(payload, MAX_RECORD) if payload else None
            node_id = self.topics.leaf(topic)
            if node_id == self.node_id and not self._leaving:
                seen = Incarnation.of(info) if info is not None else None
                if info is None or (seen is not None and seen != self.incarnation):
                    # declared gone while we were stalled, or overwritten by another process with our id
                    # (if we are the younger, its heartbeats will make us step aside): we are back
                    if seen is None or not self.incarnation.younger_than(seen):
                        await self._publish_record()
                    return
            self.membership.on_record(node_id, info, now())
            self._changed()  # a member came or went, or its record (profile, links, files) changed
        elif topic == self.topics.planner and payload:
            claim = loads_object(payload, MAX_RECORD)
            if self.election.on_claim(str(claim["node"]), int(claim["term"])):
                self._changed()
                held, self._held_plan = self._held_plan, None
                if held is not None and self.election.accepts_plan(int(held["term"]), str(held["planner"])):
                    await self._apply_plan(held)  # it came before its claim
            elif self.is_planner and int(claim["term"]) < self.election.term:
                # a stale claim (a node that restarted, or came back from a partition) overwrote
                # the retained one: put ours back so that nodes joining now learn the real term
                await self._restate(client)
        elif topic == self.topics.plan and payload:
            plan = loads_object(payload)
            if self.election.accepts_plan(int(plan["term"]), str(plan["planner"])):
                await self._apply_plan(plan)
            elif self.election.plan_awaits_claim(int(plan["term"])):
                self._held_plan = plan  # applied once its planner's claim arrives; never without it
            else:
                log.info("%s: ignoring plan of stale term %s", self.node_id, _short(plan.get("term")))
                if self.is_planner and self.plan is not None:  # it overwrote ours: put ours back
                    await self._restate(client)
        else:
            for topic_filter, handler in self._subscriptions:
                if msg.topic.matches(topic_filter):
                    await handler(msg)

    def _other_process(self, other: Incarnation) -> None:
        """Another live process heartbeats under our node id (two started at once with one id): the younger
        steps aside, the older logs it and keeps serving."""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.since))
        if self.incarnation.younger_than(other):
            raise NodeIdInUse(f"node id {self.node_id!r} is already in use on mesh {self.config.mesh!r} by a live "
                              f"node (started {started}); stop that node or pick another --node-id")
        self._rlog.warning("node id", "%s: another process (started %s) uses our node id; it is the younger and "
                           "should step aside", self.node_id, started)

    async def _apply_plan(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self._changed()
        for listener in self._plan_listeners:
            await listener(plan)

    async def _restate(self, client: aiomqtt.Client) -> None:
        """The planner puts its claim and plan back as the retained ones (a fresh broker has none; a node
        that came back from a partition may have overwritten them with stale ones)."""
        await self._publish_claim(self.election.term)
        if self.plan is not None and self.plan.get("planner") == self.node_id:
            await client.publish(self.topics.plan, json.dumps(self.plan), qos=1, retain=True)

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        beat = 0
        restated = False
        # no claim before the session has had time to deliver the retained claim and the peers' records and
        # heartbeats: a node that just (re)connected knows nobody yet and would claim against a live planner
        joined = time.monotonic()
        may_claim_at = joined + 2 * self.config.heartbeat_s
        deaf_after = max(DEAF_AFTER_S, 3 * self.config.failure_timeout_s)
        while True:
            await client.publish(self.topics.heartbeat(self.node_id), json.dumps(
                {"n": beat, "instance": self.incarnation.instance, "since": self.incarnation.since}), qos=0)
            beat += 1
            silent = time.monotonic() - max(self._echo, joined)
            if silent > deaf_after:
                # the connection is up but nothing comes back: amqtt, for one, keeps the connection of a
                # client whose session another CONNECT with the same id replaced, and delivers it nothing
                raise _Deaf(f"none of our heartbeats came back for {silent:.1f} s: another client may have "
                            f"taken over our session (same node id), or the broker stopped delivering to us")
            # silence is only news when our own heartbeats still come back: a node cut off from the broker
            # (its link down, the session not yet timed out) must not declare everyone else gone
            gone = self.membership.expire(time.monotonic()) if self.in_touch else []
            if gone:
                self._changed()
                for node_id in gone:  # declare them gone mesh-wide (idempotent; a stalled node republishes)
                    await client.publish(self.topics.member(node_id), b"", qos=1, retain=True)
            settled = time.monotonic() >= may_claim_at and self.in_touch
            if settled and not restated:
                # still planner once the session delivered the retained claim (a higher term would have
                # demoted us): a fresh or restarted broker lacks our claim and plan
                restated = True
                if self.is_planner:
                    await self._restate(client)
            term = self.election.should_claim(self.membership.ids) if settled else None
            if term is not None:
                self.election.on_claim(self.node_id, term)
                await self._publish_claim(term)
                log.info("%s: elected planner, term %d", self.node_id, term)
                self._changed()
            await asyncio.sleep(self.config.heartbeat_s)

    async def _watch_broker(self, url: str) -> None:
        while True:
            self.discovery.changed.clear()
            chosen = self._chosen_url()
            if chosen is not None and chosen != url and await self._confirm_broker(chosen):
                raise _SwitchBroker()
            await self.discovery.changed.wait()

    async def _measure_links(self) -> None:
        """Once peers are known, measures latency and bandwidth to each; republishes the record when done."""
        while True:
            peers = [m for m in self.membership.members.values()
                     if m.node_id != self.node_id and m.node_id not in self.links]
            for m in peers:
                try:
                    self.links[m.node_id] = await probe_link(m.info["host"], int(m.info["port"]), timeout=2.0,
                                                             key=self.key)
                except (TimeoutError, OSError, EOFError, KeyError, ValueError, MeshError) as e:
                    log.debug("%s: probing %s failed: %s", self.node_id, m.node_id, e)
            if peers:
                await self._publish_record()
            await asyncio.sleep(1.0)

    async def _leave(self) -> None:
        """Clears our retained record so that peers drop us at once."""
        self._leaving = True
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
            await asyncio.wait_for(client.publish(self.topics.member(self.node_id), b"", qos=1, retain=True), 1.0)
