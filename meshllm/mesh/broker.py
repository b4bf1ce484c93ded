"""The MQTT broker of a mesh: where to find one, and an embedded one to host.

Which broker a node uses (:func:`choose_broker`) is a pure rule, so that every
node reaches the same answer from the same view:

1. ``--broker URL`` when given (Mosquitto, EMQX, a bridged fog broker...);
2. else an external ``_mqtt._tcp`` broker advertised on the LAN;
3. else the broker hosted by the mesh node with the smallest node id;
4. else, if this node has the smallest id among the live peers it sees, it
   hosts an embedded amqtt broker itself; otherwise it waits for that peer.

Two nodes that start brokers at the same moment converge: the one with the
larger id sees the smaller id's broker, stops its own and moves over. The mesh
never depends on the embedded broker: any MQTT 3.1.1 broker works.

With a mesh secret the embedded broker refuses anonymous clients, accepts only
the node and app logins derived from the secret, and enforces the topic rule
of :mod:`meshllm.mesh.access` (amqtt plugins in :mod:`meshllm.mesh.broker_auth`). Without one it is
open to anyone who can reach it, as documented in docs/security.md.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from meshllm.errors import BrokerError

log = logging.getLogger(__name__)

SHUTDOWN_S = 2.0  # amqtt's own shutdown, once every client connection is aborted
# What a Mosquitto serving a mesh needs beside its listener and logins (docs/mesh.md): never drop QoS 1 replies
# to a slow subscriber (it drops beyond 1000 queued by default), and no Nagle's algorithm on its writes (a reply
# written behind another small packet otherwise waits 40 ms for the peer's delayed ACK)
MOSQUITTO_OPTIONS = ("max_queued_messages 0", "set_tcp_nodelay true")


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts"):
            raise BrokerError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise BrokerError(f"broker URL {url!r} has no host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise BrokerError(f"broker URL {url!r} has an invalid port") from None
        return cls(parts.hostname, port, tls,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def client_kwargs(self, ca_file: str | None = None) -> dict[str, Any]:
        import aiomqtt

        # TCP_NODELAY: a node answers a request's PUBACK and journals it (a QoS 1 publish) back to back;
        # with Nagle's algorithm the publish waits for the broker to ACK the PUBACK, which delayed ACKs
        # hold 40 ms (half the requests waited 40 ms before their prefill started, tools/sim_to_real.py)
        kw: dict[str, Any] = {"hostname": self.host, "port": self.port,
                              "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)}
        if self.username:
            kw["username"] = self.username
            kw["password"] = self.password
        if self.tls:
            kw["tls_params"] = aiomqtt.TLSParameters(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        return kw


@dataclass(frozen=True)
class BrokerAd:
    """A broker seen on the LAN: external (``host_node`` None) or hosted by a mesh node."""

    url: str
    host_node: str | None = None


def existing_broker(ads: list[BrokerAd]) -> str | None:
    """The broker already on the LAN that everyone should use: external first, then the smallest host id."""
    external = sorted(a.url for a in ads if a.host_node is None)
    if external:
        return external[0]
    hosted = sorted((a.host_node, a.url) for a in ads if a.host_node is not None)
    return hosted[0][1] if hosted else None


def choose_broker(self_id: str, configured: str | None, ads: list[BrokerAd], live_peers: list[str]) -> str | None:
    """The broker URL to use, ``"host"`` to host one, or None to wait for a peer's."""
    if configured:
        return configured
    url = existing_broker(ads)
    if url is not None:
        return url
    return "host" if min([self_id, *live_peers]) == self_id else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return False
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass
    return True


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration walks a snapshot.

    amqtt 0.12 iterates its subscription table across ``await`` points (when a
    client connects, and when one disconnects) while other clients subscribe,
    which raises "dictionary changed size during iteration" and drops the
    connecting client. Iterating over a copy makes those loops safe.
    """

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().keys()))

    def keys(self):  # type: ignore[no-untyped-def]
        return list(super().keys())

    def values(self):  # type: ignore[no-untyped-def]
        return list(super().values())

    def items(self):  # type: ignore[no-untyped-def]
        return list(super().items())


def _coro_self(task: asyncio.Task[Any]) -> Any:
    frame = getattr(task.get_coro(), "cr_frame", None)
    return frame.f_locals.get("self") if frame is not None else None


def _coro_file(task: asyncio.Task[Any]) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return str(code.co_filename) if code is not None else ""


def _frames(exc: BaseException) -> list[str]:
    import traceback

    return [f.filename for f in traceback.extract_tb(exc.__traceback__)]


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` for the lifetime of the context.

    With ``secret`` it accepts only the node and app logins derived from it and enforces the
    topic rule of :mod:`meshllm.mesh.access`; without it, anyone may connect and do anything.
    """

    def __init__(self, host: str, port: int = 0, *, secret: str | None = None, static_node_login: bool = True
                 ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.secret = secret
        # drawn anew at each start: a node's one-time login names it, so it is good at this broker only
        self.epoch = secrets.token_hex(8)
        self.static_node_login = static_node_login  # False: nodes must present a one-time token (hosted brokers)
        self._broker: Any = None
        self._previous_handler: Any = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}  # client connection -> its socket

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        from meshllm.mesh import broker_auth

        # amqtt logs every TCP probe of its port as an error; keep only its critical messages
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 256}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        logins = None
        if self.secret is not None:
            logins = broker_auth.Logins(self.secret, self.epoch, static_node_login=self.static_node_login)
            config["plugins"] = broker_auth.plugins_config(logins)
        loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._quiet_amqtt)
        self._broker = Broker(config)
        if logins is not None:
            broker_auth.guard_sessions(self._broker, logins)
            broker_auth.refuse_app_retain(self._broker)
        if isinstance(getattr(self._broker, "_subscriptions", None), dict):
            self._broker._subscriptions = _SnapshotDict(self._broker._subscriptions)
        broker_auth.confine_retained(self._broker)
        self._track_connections()
        await self._broker.start()
        log.info("embedded broker listening on %s (%s)", self.url,
                 "logins and topic rules enforced" if self.secret is not None else "open to anonymous clients")
        return self

    def _track_connections(self) -> None:
        """Remember each client connection's task and socket, so that shutdown can end them all.

        amqtt binds ``stream_connected`` when its listener starts; wrapping it on the instance first
        puts every connection through here."""
        inner = self._broker.stream_connected

        async def stream_connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                   listener_name: str) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections[task] = writer
            try:
                await inner(reader, writer, listener_name)
            finally:
                self._connections.pop(task, None)

        self._broker.stream_connected = stream_connected

    async def __aexit__(self, *exc: object) -> None:
        """Stops promptly and quietly, whatever the clients are doing.

        amqtt 0.12.1's shutdown stops each client's handler in turn and waits for it: a client that has
        stopped reading (a frozen process: tests/test_broker_shutdown.py) held it over 5 s, after which the
        old code left the broker to the event loop's teardown, with a warning and an error. So: stop
        listening, abort every client socket (their handlers then end at once), give amqtt's shutdown a
        bounded time, and cancel and await whatever of this broker is left, so that nothing ends later
        with an error in the event loop (the exception filter stays until then)."""
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        # the broker and its clients' protocol handlers: whose tasks are ours to end (amqtt forgets the handlers)
        owners = [broker, *(h for _, h in list(getattr(broker, "_sessions", {}).values()))]
        try:
            for server in list(getattr(broker, "_servers", {}).values()):
                if getattr(server, "instance", None) is not None:
                    server.instance.close()
            for writer in list(self._connections.values()):
                writer.transport.abort()
            try:
                async with asyncio.timeout(SHUTDOWN_S):
                    await broker.shutdown()
            except TimeoutError:
                log.debug("embedded broker: amqtt's shutdown took over %g s; ending its tasks", SHUTDOWN_S)
            except Exception as e:  # amqtt raises plain exceptions from its state machine
                log.debug("embedded broker shutdown: %s", e)
            await self._end_tasks(owners)
        finally:
            asyncio.get_running_loop().set_exception_handler(self._previous_handler)
        log.info("embedded broker on %s stopped", self.url)

    async def _end_tasks(self, owners: list[Any]) -> None:
        """Cancels and awaits what is left of this broker: its connections, and the tasks whose coroutine is a
        method of the broker or of one of its handlers (never another broker's, nor anyone else's)."""
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()
                and (t in self._connections or any(_coro_self(t) is o for o in owners))]
        for t in left:
            t.cancel()
        if left:
            done, pending = await asyncio.wait(left, timeout=SHUTDOWN_S)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.debug("amqtt task ended with %r", t.exception())
            if pending:
                log.debug("embedded broker: %d amqtt task(s) did not end", len(pending))
        self._connections.clear()

    def _quiet_amqtt(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """amqtt leaves tasks that fail when a client vanishes mid-delivery (a closed transport);
        those are normal on a mesh and go to the debug log, anything else to the usual handler."""
        exc = context.get("exception")
        task = context.get("task") or context.get("future")
        from_amqtt = (exc is not None and any("amqtt" in f for f in _frames(exc))) or \
            (isinstance(task, asyncio.Task) and "amqtt" in _coro_file(task))
        amqtt_error = exc is not None and type(exc).__module__.startswith("amqtt")
        if (amqtt_error or isinstance(exc, (ConnectionError, RuntimeError, asyncio.CancelledError))) and from_amqtt:
            log.debug("amqtt: %s", exc)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)
