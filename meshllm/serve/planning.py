"""The planner's duty in a live mesh: (re)plan when membership or profiles change.

Runs on every serving node and acts only while the node is the elected
planner. It waits for the membership to settle, builds device profiles from
the gossiped records (with the links each node measured), runs the same
planner code as ``meshllm plan`` (:mod:`meshllm.plan`), and publishes the
plan, stamped with its term, when it is new or clearly better than the
current one (hysteresis). An operator may pin a plan instead
(``--plan-file``); the duty then publishes that plan as soon as all its nodes
are members, and plans for the remaining members while one of them is gone.
The options (``--workload``, ``--plan-file``) are checked by
:meth:`PlannerOptions.parse` when the node is built, before it joins the mesh:
a typo stops ``meshllm node`` with one line, not a mesh that never gets a plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from meshllm.errors import ConfigError, PlanError
from meshllm.model.manifest import Manifest
from meshllm.plan.objective import OBJECTIVES
from meshllm.plan.workload import Workload
from meshllm.profile import DeviceProfile, Link

log = logging.getLogger(__name__)

SETTLE_S = 0.7  # membership must be unchanged this long before planning


class PlannerNode(Protocol):
    """What the planner duty reads of its mesh node (:class:`~meshllm.mesh.node.Node`), and the one thing it
    does with it: publish a plan."""

    node_id: str
    plan: dict[str, Any] | None

    @property
    def is_planner(self) -> bool: ...

    @property
    def in_touch(self) -> bool: ...

    @property
    def view_version(self) -> int: ...

    async def view_changed(self, since: int) -> int: ...

    def member_ids(self) -> set[str]: ...

    def member_records(self) -> dict[str, dict[str, Any]]: ...

    async def publish_plan(self, plan: dict[str, Any]) -> None: ...


def member_profiles(members: dict[str, Any]) -> list[DeviceProfile]:
    """Device profiles from gossiped member records, with their measured links. A member whose profile the cost
    model cannot use (a broken or hostile record) is left out of plans with a warning: it costs only itself."""
    out = []
    for node_id, info in sorted(members.items()):
        try:
            p = DeviceProfile.from_json(info["profile"])
            links = {peer: Link(**v) for peer, v in (info.get("links") or {}).items()}
            p = DeviceProfile(**{**p.__dict__, "node_id": node_id, "links": links})
            p.check()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("leaving %s out of plans: its gossiped profile is unusable: %s", node_id, e)
            continue
        out.append(p)
    return out


def _planned_figures(profile: Any) -> str:
    """What of a member's profile makes the planner look at its plan again: all but the serving overhead, which a
    node restates as it serves. A plan made for a new figure would move requests under load for a gain of a
    fraction of a millisecond per run, so the figure counts from the next plan made for another reason (a member
    came or went, a device's measured figures changed)."""
    if isinstance(profile, dict):
        profile = {k: v for k, v in profile.items() if k != "serving_overhead_s"}
    return json.dumps(profile, sort_keys=True)


def servable(members: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The members a plan may give a stage: not one that reported a ``model_error`` (its files failed and
    no peer could repair them), nor one that lacks files (``has_files`` false) while no other member holds
    the same model to fetch them from."""
    def ok(node_id: str, info: dict[str, Any]) -> bool:
        if info.get("model_error"):
            return False
        if info.get("has_files") is not False:
            return True
        return any(o.get("has_files") and not o.get("model_error") and o.get("model_sha") == info.get("model_sha")
                   for i, o in members.items() if i != node_id)
    return {i: info for i, info in members.items() if ok(i, info)}


@dataclass(frozen=True)
class PlannerOptions:
    """A node's planner options, checked: the ``--workload`` spec parsed, the ``--plan-file`` read."""

    workload: Workload | None = None  # None: the default for the model's context (PlannerDuty.workload)
    pinned: dict[str, Any] | None = None
    objective: str = "wait"  # what plans minimise: mean "wait" or mean end-to-end time ("response")

    @classmethod
    def parse(cls, workload: str | None, plan_file: str | None, objective: str = "wait") -> PlannerOptions:
        """:class:`~meshllm.errors.ConfigError` naming the option at fault if one cannot be used."""
        parsed = None
        if workload is not None:
            try:
                parsed = Workload.parse(workload)
            except PlanError as e:
                raise ConfigError(f"--workload {workload!r}: {e}") from None
        if objective not in OBJECTIVES:
            raise ConfigError(f"--objective {objective!r}: not one of {', '.join(OBJECTIVES)}")
        return cls(parsed, _pinned_plan(plan_file) if plan_file else None, objective)


def _pinned_plan(path: str) -> dict[str, Any]:
    """The plan in ``path``, checked as far as the planner duty reads it (replicas of stages on node ids)."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--plan-file {path}: cannot read it: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--plan-file {path}: not a JSON plan: {e}") from None
    replicas = plan.get("replicas") if isinstance(plan, dict) else None
    if not isinstance(replicas, list) or not all(
            isinstance(r, dict) and isinstance(r.get("stages"), list) and r["stages"]
            and all(isinstance(s, dict) and isinstance(s.get("node_id"), str) for s in r["stages"])
            for r in replicas):
        raise ConfigError(f"--plan-file {path}: not a plan: it needs \"replicas\", each a list of \"stages\" "
                          "with a \"node_id\" (as `meshllm plan` writes)")
    return plan


class PlannerDuty:
    """Plans while ``node`` is the planner; ``manifest`` gives the model's manifest (None until it is known)."""

    def __init__(self, node: PlannerNode, manifest: Callable[[], Manifest | None], options: PlannerOptions) -> None:
        self.node = node
        self._manifest = manifest
        self.options = options
        self.version = 0
        self.pinned = options.pinned

    async def run(self) -> None:
        """Looks at the mesh each time its view changes (members, records, planner, session, being in touch):
        the node's event, never a poll."""
        node = self.node
        seen: tuple[Any, ...] | None = None
        looked: int | None = None  # the view version last looked at (None: look now)
        while True:
            if looked is not None:
                await node.view_changed(looked)
            looked = node.view_version
            if not node.is_planner or not node.in_touch:
                seen = None
                continue
            everyone = node.member_records()
            members = servable(everyone)
            view = tuple(sorted((i, _planned_figures(m.get("profile")), len(m.get("links") or {}))
                                for i, m in members.items()))
            if view == seen:
                continue
            await asyncio.sleep(SETTLE_S)  # let a burst of joins settle
            if node.member_ids() != set(everyone):
                continue
            for i in sorted(set(everyone) - set(members)):
                log.warning("%s: leaving %s out of plans: %s", node.node_id, i,
                            everyone[i].get("model_error") or "it lacks model files and no member holds them")
            seen = view
            try:  # in a thread: planning takes up to ~2 s of CPU, and a blocked loop would miss heartbeats
                plan = await asyncio.to_thread(self.make_plan, members)
            except Exception as e:  # a planner bug must not take the node down
                log.exception("%s: planning failed: %s", node.node_id, e)
                continue
            live = node.plan
            if plan is None and live is not None and live.get("planner") != node.node_id:
                # a predecessor's plan, still good: this planner takes it over under its own term, so that it is
                # the one it restates to a broker that lost its retained state (a restart) and new nodes get it
                plan = {k: v for k, v in live.items() if k not in ("term", "planner")}
                try:
                    await node.publish_plan(plan)
                except (RuntimeError, aiomqtt.MqttError) as e:
                    log.warning("%s: could not take over plan v%s: %s", node.node_id, plan.get("version"), e)
                    seen, looked = None, None
                    await asyncio.sleep(SETTLE_S)  # try again shortly, whether or not the view changes
                continue
            if plan is not None:
                self.version = max(self.version, int((node.plan or {}).get("version", 0))) + 1
                plan["version"] = self.version  # versions only grow, whoever planned before
                try:
                    await node.publish_plan(plan)
                except (RuntimeError, aiomqtt.MqttError) as e:  # lost the broker or the role: plan again later
                    log.warning("%s: plan v%d not published: %s", node.node_id, self.version, e)
                    seen, looked = None, None
                    await asyncio.sleep(SETTLE_S)  # try again shortly, whether or not the view changes
                    continue
                log.info("%s: published plan v%d (%d replicas)", node.node_id, self.version,
                         len(plan.get("replicas", [])))

    def make_plan(self, members: dict[str, Any]) -> dict[str, Any] | None:
        """The plan to publish now, or None to keep the current one."""
        live = self.node.plan
        if self.pinned is not None:
            needed = {s["node_id"] for r in self.pinned["replicas"] for s in r["stages"]}
            if needed <= set(members):
                return None if live and live.get("pinned") else {**self.pinned, "pinned": True}
            if not live:
                return None  # still waiting for the pinned plan's nodes
            if live.get("pinned"):  # one of them left: serve with the members that remain until it is back
                log.warning("%s: %s of the pinned plan left; planning for the remaining members",
                            self.node.node_id, ", ".join(sorted(needed - set(members))))
                live = None
        from meshllm.plan import ModelCosts, Plan, PlanOptions, replan

        manifest = self._manifest()
        assert manifest is not None
        if not members:
            return None
        costs = ModelCosts.from_manifest(manifest)
        profiles = member_profiles(members)
        current = Plan.from_json(live) if live else None
        plan, is_new = replan(current, profiles, costs, self.workload(manifest.config.max_seq_len),
                              options=PlanOptions(objective=self.options.objective))
        if not plan.replicas:
            log.warning("%s: no feasible plan for %d devices: %s", self.node.node_id, len(profiles),
                        "; ".join(plan.notes))
            return None
        return dict(plan.to_json()) if is_new else None

    def workload(self, max_seq_len: int) -> Any:
        """The workload plans are made for: ``--workload``, else prompts and answers of half the context each
        at one request per second (so that every replica reserves the model's whole context per slot)."""
        if self.options.workload is not None:
            return self.options.workload
        return Workload.simple(max_seq_len / 2, max_seq_len / 2, 1.0, name="default")
