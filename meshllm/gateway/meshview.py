"""What the gateway knows about its mesh, read from MQTT: members, planner, plan, readiness, live load.

:class:`MeshView` is pure: it is fed the messages of the mesh's retained
topics (``members/+``, ``planner``, ``plan``, ``ready/+``) and of the live
``stats/+`` topic, with the time they arrived, and answers the questions the
gateway asks: which model the mesh serves and its context length, whether any
replica is ready, and the status snapshot that ``/v1/mesh`` serves and the
mesh page draws. :class:`MeshWatcher` owns the MQTT subscription that feeds
it. Neither sends anything to the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from meshllm.mesh.broker import BrokerURL
from meshllm.mesh.topics import Topics
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import PublishedPlan, Replica

log = logging.getLogger(__name__)

STATS_STALE_S = 3.0  # a node's live figures are shown as stale after this long without news
_KINDS = ("members", "ready", "stats")


@dataclass(frozen=True)
class ModelInfo:
    """The model the mesh serves as the gateway names it: ``id`` is what ``/v1/models`` lists;
    ``aliases`` are other names requests may use for it (manifest name, directory name)."""

    id: str
    context_length: int | None
    aliases: frozenset[str] = field(default_factory=frozenset)
    chat_template: str | None = None  # which template chats get: the model's own, or the fallback (by name)

    def accepts(self, name: str) -> bool:
        return name == self.id or name in self.aliases


@dataclass
class MeshView:
    """The mesh as seen from its broker. Feed it with :meth:`apply`; ask it with the other methods."""

    mesh: str
    broker: str = ""
    model_override: ModelInfo | None = None  # from the gateway's --model DIR, if given
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)  # node -> (arrival, record)
    planner: str | None = None
    term: int = 0
    plan: PublishedPlan | None = None
    synced: bool = False  # the retained state has been read at least once since connecting

    # --- input ---------------------------------------------------------

    def apply(self, topic: str, payload: bytes, now: float) -> None:
        """One MQTT message of the mesh; malformed payloads are ignored (and logged)."""
        root = Topics(self.mesh).root + "/"
        if not topic.startswith(root):
            return
        rest = topic[len(root):]
        try:
            data = json.loads(payload) if payload else None
        except (ValueError, RecursionError):
            log.debug("mesh %s: ignoring a malformed message on %s", self.mesh, topic)
            return
        if data is not None and not isinstance(data, dict):
            return
        if rest == "planner":
            self.planner = str(data["node"]) if data and data.get("node") is not None else None
            self.term = int(data.get("term", 0)) if data and isinstance(data.get("term"), int) else 0
        elif rest == "plan":
            try:
                self.plan = PublishedPlan.decode(data) if data else None
            except PlanError as e:
                log.warning("mesh %s: ignoring the published plan: %s", self.mesh, e)
                self.plan = None
        else:
            kind, _, node = rest.partition("/")
            if kind not in _KINDS or not node or "/" in node:
                return
            if kind == "stats":
                if data is not None:
                    self.stats[node] = (now, data)
                return
            table = self.members if kind == "members" else self.ready
            if data is None:
                table.pop(node, None)
                if kind == "members":
                    self.stats.pop(node, None)
            else:
                table[node] = data

    def forget(self) -> None:
        """The connection to the broker was lost: what we knew may no longer hold."""
        self.members.clear()
        self.ready.clear()
        self.stats.clear()
        self.planner, self.term, self.plan, self.synced = None, 0, None, False

    # --- questions -----------------------------------------------------

    def replicas(self) -> tuple[Replica, ...]:
        return self.plan.plan.replicas if self.plan is not None else ()

    def replica_ready(self, r: Replica) -> bool:
        """Every stage of the replica is a member and reports this plan version and replica loaded."""
        version = self.plan.version if self.plan is not None else None
        for s in r.stages:
            rec = self.ready.get(s.node_id, {})
            if s.node_id not in self.members or rec.get("pv") != version or rec.get("r") != r.id:
                return False
        return bool(r.stages)

    def ready_replicas(self) -> list[int]:
        return sorted(r.id for r in self.replicas() if self.replica_ready(r))

    def unavailable_reason(self) -> str | None:
        """Why no request can be served now, or None when a prefill and a decode replica are ready."""
        if not self.synced:
            return None  # too early to tell: let the mesh answer
        if not self.members:
            return f"no node of mesh {self.mesh!r} is connected to the broker"
        if self.planner is None or self.planner not in self.members:
            return "the mesh has no planner at the moment (an election is under way)"
        if self.plan is None:
            return "the mesh has no plan yet"
        ready = [r for r in self.replicas() if self.replica_ready(r)]
        roles = {r.role.value for r in ready}
        if not ready or not (roles & {"prefill", "mixed"}) or not (roles & {"decode", "mixed"}):
            return "no replica of the plan is ready yet (nodes are loading their layers)"
        return None

    def model(self) -> ModelInfo | None:
        """The model served, or None while nothing says which. Precedence for the id: the gateway's
        ``--model`` manifest, the plan's ``model``, the members' ``model_name``, their ``model``."""
        names: list[str] = []
        if self.model_override is not None:
            names.append(self.model_override.id)
            names.extend(sorted(self.model_override.aliases))
        if self.plan is not None and self.plan.plan.model:
            names.append(self.plan.plan.model)
        for key in ("model_name", "model"):
            names.extend(sorted({str(m[key]) for m in self.members.values() if isinstance(m.get(key), str)
                                 and m[key]}))
        if not names:
            return None
        templates = sorted({str(m["chat_template"]) for m in self.members.values()
                            if isinstance(m.get("chat_template"), str) and m["chat_template"]})
        return ModelInfo(names[0], self.context_length(), frozenset(names[1:]) - {names[0]},
                         templates[0] if templates else None)

    def context_length(self) -> int | None:
        """The longest sequence (prompt + answer) every replica can hold: the smallest KV context
        the plan reserves, capped by the model's own (from ``--model`` or the members' records)."""
        limits = [r.context for r in self.replicas() if r.context > 0]
        model_max = [int(m["context_length"]) for m in self.members.values()
                     if isinstance(m.get("context_length"), int) and m["context_length"] > 0]
        if self.model_override is not None and self.model_override.context_length:
            model_max.append(self.model_override.context_length)
        if model_max:
            limits = [min(x, min(model_max)) for x in limits] or [min(model_max)]
        return min(limits) if limits else None

    def snapshot(self, now: float) -> dict[str, Any]:
        """The status JSON of ``/v1/mesh``: everything the mesh page draws."""
        plan = self.plan
        live = {n: rec for n, (t, rec) in self.stats.items() if now - t <= STATS_STALE_S}
        sched = next((rec["scheduler"] for n, rec in live.items()
                      if n == self.planner and isinstance(rec.get("scheduler"), dict)), None)
        active = (sched or {}).get("active", {}) if sched else {}
        replicas: list[dict[str, Any]] = []
        for r in self.replicas():
            stages = []
            for i, s in enumerate(r.stages):
                st = live.get(s.node_id, {})
                stages.append({"node_id": s.node_id, "start": s.start, "stop": s.stop, "index": i,
                               "ready": plan is not None and self.ready.get(s.node_id, {}).get("pv") == plan.version,
                               "member": s.node_id in self.members, "inbox": st.get("inbox"),
                               "active": st.get("active"), "tokens_per_s": st.get("tokens_per_s"),
                               "busy_s": st.get("busy_s")})
            rates = [s["tokens_per_s"] for s in stages if isinstance(s["tokens_per_s"], (int, float))]
            inboxes = [s["inbox"] for s in stages if isinstance(s["inbox"], int)]
            stage_active = [s["active"] for s in stages if isinstance(s["active"], int)]
            replicas.append({
                "id": r.id, "role": r.role.value, "slots": r.slots,
                "context": r.context, "ready": self.replica_ready(r), "stages": stages,
                "tokens_per_s": round(sum(rates), 2) if rates else None,
                "queue": sum(inboxes) if inboxes else None,  # work items waiting in the stages' inboxes
                "active": active.get(str(r.id), max(stage_active) if stage_active else None),
                "predicted": {"prefill_rate": r.prefill_rate, "decode_token_rate": r.decode_token_rate},
            })
        members: dict[str, dict[str, Any]] = {}
        for node, m in sorted(self.members.items()):
            p: dict[str, Any] = m["profile"] if isinstance(m.get("profile"), dict) else {}
            members[node] = {
                "name": m.get("name"), "host": m.get("host"), "port": m.get("port"),
                "hosts_broker": m.get("hosts_broker"), "planner": node == self.planner,
                "profile": {k: p.get(k) for k in ("flops", "mem_bandwidth_Bps", "mem_bytes", "device_class",
                                                  "emulated", "serving_overhead_s")},
                "links": m.get("links") or {},
                "ready": self.ready.get(node),
                "stats": live.get(node),
            }
        model = self.model()
        return {
            "object": "mesh", "mesh": self.mesh, "broker": self.broker, "synced": self.synced,
            "planner": self.planner, "term": self.term,
            "model": {"id": model.id, "context_length": model.context_length, "chat_template": model.chat_template}
            if model else None,
            "members": members,
            "plan": None if plan is None else {
                "version": plan.version, "term": plan.term, "method": plan.plan.method,
                "pinned": plan.pinned, "n_layers": plan.plan.n_layers, "replicas": replicas,
                "idle": [n for n in self.members if n not in plan.stage_nodes],
                "metrics": plan.plan.metrics.to_json() if plan.predicted else None,
            },
            "scheduler": sched,
            "unavailable": self.unavailable_reason(),
            "time": time.time(),
        }


class MeshWatcher:
    """Subscribes to a mesh's state topics on ``broker`` and feeds a :class:`MeshView`.

    ``async with MeshWatcher(view, url) as w: await w.run()``: :meth:`run` returns
    never; it raises :class:`aiomqtt.MqttError` when the connection is lost.
    """

    SYNC_QUIET_S = 0.3  # retained messages arrive at once after subscribing; this much silence ends them

    def __init__(self, view: MeshView, broker: str, ca_file: str | None = None) -> None:
        self.view, self.broker, self.ca_file = view, broker, ca_file
        self.topics = Topics(view.mesh)
        self._mqtt: aiomqtt.Client | None = None

    async def __aenter__(self) -> MeshWatcher:
        b = BrokerURL.parse(self.broker)
        self._mqtt = aiomqtt.Client(**b.client_kwargs(self.ca_file), keepalive=15, timeout=10,
                                    identifier=f"meshllm-gateway-{secrets.token_hex(4)}")
        await self._mqtt.__aenter__()
        self.view.forget()
        self.view.broker = str(b)
        t = self.topics
        for topic in (t.members, t.planner, t.plan, t.readiness, t.all_stats):
            await self._mqtt.subscribe(topic, qos=0 if topic == t.all_stats else 1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._mqtt is not None
        with contextlib.suppress(aiomqtt.MqttError):
            await self._mqtt.__aexit__(None, None, None)
        self._mqtt = None

    async def run(self) -> None:
        assert self._mqtt is not None
        view = self.view
        loop_time = time.monotonic
        messages = aiter(self._mqtt.messages)
        while True:
            try:
                msg = await asyncio.wait_for(anext(messages), None if view.synced else self.SYNC_QUIET_S)
            except TimeoutError:
                view.synced = True
                continue
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
            view.apply(str(msg.topic), bytes(payload), loop_time())
