"""Zero-configuration discovery over mDNS (zeroconf).

Each node advertises ``_meshllm._tcp.local.`` with a TXT record (node id, mesh
name, data-plane port, protocol version, and the URL of the broker it hosts,
if any) and browses for peers of the same mesh and for ``_mqtt._tcp.local.``
brokers. mDNS is bound to one interface address (``--interface``); tests and
demos bind it to 127.0.0.1 or to addresses inside their own network
namespaces, so that nothing leaves on a real network.

With a mesh secret (``key``), every record carries a ``sig`` TXT entry, an HMAC
of its fields and address under the secret (:func:`meshllm.mesh.access.record_signature`),
and records without a valid one are ignored, as are ``_mqtt._tcp`` brokers
(they cannot sign): a device without the secret can neither lure the mesh to a
broker it hosts nor, by posing as a peer with a small id, stall the broker choice.
A signed record can still be captured and replayed after its node is gone, so
a record's broker (and its ``epoch``) is only a lead: a node confirms it live
with the hosting node over the authenticated data plane before it logs in there
(:meth:`meshllm.mesh.node.Node._confirm_broker`). No wall-clock window: boards
without a real-time clock and without internet often disagree on the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshllm.aio import TaskOwner, stop_task
from meshllm.mesh.access import record_signature, signature_ok
from meshllm.mesh.broker import BrokerAd
from meshllm.mesh.topics import PROTOCOL_VERSION

log = logging.getLogger(__name__)

MESHLLM_SERVICE = "_meshllm._tcp.local."
MQTT_SERVICE = "_mqtt._tcp.local."
REFUTED_S = 30.0  # a record whose broker failed its live check is ignored this long (a slow peer is heard again)


@dataclass(frozen=True)
class PeerAd:
    node_id: str
    mesh: str
    host: str
    port: int  # data plane
    version: int
    broker: str | None  # URL of the broker this peer hosts
    epoch: str | None = None  # that broker's epoch (drawn at its start); confirmed live before it is used


def _txt(props: dict[bytes, bytes | None], key: str) -> str | None:
    v = props.get(key.encode())
    return v.decode("utf-8", "replace") if v is not None else None


def _signed_fields(props: Mapping[str, str | None], address: str) -> list[str]:
    return [props.get("id") or "", props.get("mesh") or "", address, props.get("port") or "", props.get("v") or "",
            props.get("broker") or "", props.get("epoch") or ""]


def lan_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine (used when no --interface is given)."""
    import ifaddr

    out = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips
           if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return out or ["127.0.0.1"]


class Discovery:
    """Advertises this node and keeps the set of peers and brokers seen (async context manager)."""

    def __init__(self, node_id: str, mesh: str, port: int, *, interface: str | None, advertise: bool = True,
                 key: bytes | None = None) -> None:
        self.node_id, self.mesh, self.port = node_id, mesh, port
        self.key = key  # the mesh secret's key: sign our record, ignore unsigned ones
        self.advertise = advertise  # False: only browse (``meshllm status``, clients)
        # mDNS instance name: unique per mesh, at most 63 bytes (an mDNS label)
        self._name = f"{f'{node_id}-{mesh}'[:63]}.{MESHLLM_SERVICE}"
        self._server = f"{node_id[:50]}-{secrets.token_hex(3)}.local."  # our A record's host name
        self.interface = interface
        self.address = interface or lan_addresses()[0]
        self.peers: dict[str, PeerAd] = {}
        self.external_brokers: dict[str, str] = {}  # service name -> URL
        self.changed = asyncio.Event()
        self._broker: str | None = None
        self._epoch: str | None = None
        # (node id, broker epoch) of records that failed a live check -> until when they are ignored
        self._refuted: dict[tuple[str, str], float] = {}
        self._names: dict[str, str] = {}  # service name -> node id
        self._tasks = TaskOwner(log, f"discovery {node_id}")  # the lookups of records that appeared
        self._azc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered: asyncio.Future[None] | None = None  # our record's registration (probing, then on the LAN)
        self._browser: AsyncServiceBrowser | None = None
        # zeroconf's announcements of our record run on as a task of its own after (un)registering: ours to end
        self._broadcasts: list[asyncio.Future[Any]] = []

    def _service_info(self) -> AsyncServiceInfo:
        props = {"id": self.node_id, "mesh": self.mesh, "port": str(self.port), "v": str(PROTOCOL_VERSION)}
        if self._broker:
            props["broker"] = self._broker
            props["epoch"] = self._epoch or ""
        if self.key is not None:
            props["sig"] = record_signature(self.key, _signed_fields(props, self.address))
        return AsyncServiceInfo(
            MESHLLM_SERVICE, self._name,
            addresses=[socket.inet_aton(self.address)], port=self.port, properties=props,
            server=self._server,
        )

    async def __aenter__(self) -> Discovery:
        interfaces: Any = [self.interface] if self.interface else [self.address]
        self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        if self.advertise:
            self._info = self._service_info()
            # probing the name takes about a second (RFC 6762 8.1): a node that knows its broker need not wait
            self._registered = asyncio.ensure_future(self._register(self._info))
        await self._tasks.__aenter__()
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [MESHLLM_SERVICE, MQTT_SERVICE],
                                            handlers=[self._on_change])
        return self

    async def _register(self, info: AsyncServiceInfo) -> None:
        assert self._azc is not None
        # the node id travels in TXT; the instance name only has to be unique on the LAN, so a
        # clash (a node of another mesh with the same id, a stale record) is resolved by renaming
        self._broadcasts.append(asyncio.ensure_future(
            await self._azc.async_register_service(info, allow_name_change=True)))
        self._name = info.name  # zeroconf renames the info in place on a clash

    async def __aexit__(self, *exc: object) -> None:
        if self._registered is not None:
            with contextlib.suppress(Exception):  # (a failed registration was seen by set_broker, or by nobody)
                await stop_task(self._registered)
        await self._tasks.stop()
        for b in self._broadcasts:
            await stop_task(b)  # the goodbye below says the last word
        self._broadcasts.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            await self._azc.async_unregister_all_services()  # goodbye packets: peers drop us at once
            await self._azc.async_close()

    async def set_broker(self, url: str | None, epoch: str | None = None) -> None:
        """Advertises (or withdraws) the broker this node hosts."""
        if url == self._broker or self._azc is None or not self.advertise:
            return
        if self._registered is not None:
            await self._registered  # our record is on the LAN before it is updated
        self._broker, self._epoch = url, epoch
        self._info = self._service_info()
        self._broadcasts = [b for b in self._broadcasts if not b.done()]
        self._broadcasts.append(asyncio.ensure_future(await self._azc.async_update_service(self._info)))

    def broker_ads(self) -> list[BrokerAd]:
        ads = [BrokerAd(url) for url in self.external_brokers.values()]
        ads += [BrokerAd(p.broker, p.node_id) for p in self.peers.values() if p.broker]
        if self._broker:
            ads.append(BrokerAd(self._broker, self.node_id))
        return ads

    def forget_broker(self, url: str) -> None:
        """Drops a broker found dead until it is announced again."""
        for node_id, p in list(self.peers.items()):
            if p.broker == url:
                self.peers[node_id] = PeerAd(p.node_id, p.mesh, p.host, p.port, p.version, None, None)
        for name, u in list(self.external_brokers.items()):
            if u == url:
                del self.external_brokers[name]

    def refute(self, peer: PeerAd) -> None:
        """A peer's broker failed its live check: ignore that record (its node id and broker epoch) for
        :data:`REFUTED_S`, however often it is announced again (a real broker restart draws a new epoch)."""
        self._refuted[(peer.node_id, peer.epoch or "")] = time.monotonic() + REFUTED_S
        self.peers.pop(peer.node_id, None)
        self.changed.set()

    def forget_peer(self, node_id: str) -> None:
        self.peers.pop(node_id, None)

    # --- browsing -----------------------------------------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            node_id = self._names.pop(name, None)
            if node_id:
                self.peers.pop(node_id, None)
            self.external_brokers.pop(name, None)
            self.changed.set()
            return
        self._tasks.spawn(self._resolve(service_type, name), f"resolve {name}")

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            return
        addrs = info.parsed_addresses(IPVersion.V4Only)
        if not addrs or info.port is None:
            return
        if service_type == MQTT_SERVICE:
            if self.key is not None:
                log.debug("ignoring unsigned MQTT broker %s (this mesh has a secret)", name)
                return
            self.external_brokers[name] = f"mqtt://{addrs[0]}:{info.port}"
            self.changed.set()
            return
        props = info.properties
        node_id, mesh = _txt(props, "id"), _txt(props, "mesh")
        if not node_id or mesh != self.mesh or node_id == self.node_id:
            return  # another mesh on the same LAN, or ourselves
        try:
            version = int(_txt(props, "v") or 0)
            port = int(_txt(props, "port") or info.port)
        except ValueError:
            log.warning("ignoring malformed mDNS record %s", name)
            return
        if self.key is not None:
            fields = _signed_fields({k: _txt(props, k) for k in ("id", "mesh", "port", "v", "broker", "epoch")},
                                    addrs[0])
            if not signature_ok(self.key, fields, _txt(props, "sig")):
                log.warning("ignoring the mDNS record of %s at %s%s: not signed with this mesh's secret", node_id,
                            addrs[0], f" (hosting {_txt(props, 'broker')})" if _txt(props, "broker") else "")
                return
        if self._refuted.get((node_id, _txt(props, "epoch") or ""), 0.0) > time.monotonic():
            return
        if version != PROTOCOL_VERSION:
            log.warning("peer %s speaks protocol v%d, this node v%d: ignored", node_id, version, PROTOCOL_VERSION)
            return
        self._names[name] = node_id
        self.peers[node_id] = PeerAd(node_id, mesh, addrs[0], port, version, _txt(props, "broker"),
                                     _txt(props, "epoch"))
        self.changed.set()
