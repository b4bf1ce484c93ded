"""The adversary of a chaos run: a hostile app with a valid login and a stranger on the LAN, at random.

While ``tools/chaos.py --adversary`` injects its faults, this sends the payloads of the adversarial
probe (docs/security.md lists them), one at a time at seeded random moments:

- as the **app** (the app login on a closed mesh): deeply nested JSON on ``requests``, ``cancel`` and
  ``replay``; a retained request; a request over the size limit; a ``reply_to`` onto the mesh's state;
  writes to state topics it may not write (a fake plan with a huge term, a member record, readiness);
- as a **stranger** (no login): an MQTT login with no or a wrong password, and junk and idle
  connections to a node's data plane;
- as a **careless user**: a second ``meshllm node`` with the id of a running node (with ``--dup``).

Nothing here asserts: the chaos report counts the attacks by kind and every node process that exited
without being killed by the fault schedule; the run fails if any did, or if a request was lost.
Bounded in count and time like everything in the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt

from meshllm.mesh.broker import BrokerURL

ROOT = Path(__file__).resolve().parent.parent
DEEP = b"[" * 50000


class Adversary:
    def __init__(self, *, broker: str, mesh: str, app_login: tuple[str, str] | None, nodes: dict[str, tuple[str, int]],
                 seed: int, say: Any, interface: str, secret_env: dict[str, str] | None,
                 alive: Any, duplicates: bool = True) -> None:
        self.broker, self.mesh = broker, mesh
        self.app_login = app_login
        self.nodes = nodes  # node id -> (data-plane host, port), refreshed by the caller
        self.rng = random.Random(seed ^ 0xBAD)
        self.say = say
        self.interface = interface
        self.secret_env = secret_env
        self.alive = alive  # () -> {node id: still running?} for the nodes the schedule did not kill
        self.duplicates = duplicates
        self.attacks: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # attacks the mesh turned away at the door (as it should)
        self.node_exits: list[str] = []
        self.duplicate_outcomes: list[str] = []
        self.root = f"meshllm/v1/{mesh}"

    def report(self) -> dict[str, Any]:
        return {"attacks": dict(sorted(self.attacks.items())), "refused": dict(sorted(self.refused.items())),
                "node_exits": self.node_exits, "duplicate_node": self.duplicate_outcomes}

    async def run(self, until: float) -> None:
        kinds = ["deep_json", "retained_request", "oversized_request", "reply_to_state", "state_write",
                 "stranger_login", "dataplane_junk"]
        dup_budget = 2 if self.duplicates else 0
        async with asyncio.TaskGroup() as tg:  # a duplicate node takes seconds to be refused: it runs beside
            for _ in range(10_000):
                if time.monotonic() >= until:
                    return
                await asyncio.sleep(self.rng.uniform(0.3, 1.5))
                kind = self.rng.choice(kinds + (["duplicate_node"] if dup_budget else []))
                if kind == "duplicate_node":
                    dup_budget -= 1
                    tg.create_task(self._attack(kind))
                else:
                    await self._attack(kind)

    async def _attack(self, kind: str) -> None:
        try:
            async with asyncio.timeout(45):
                await getattr(self, f"_{kind}")()
            self.attacks[kind] += 1
        except (aiomqtt.MqttError, OSError, TimeoutError) as e:
            self.refused[kind] += 1
            if kind not in ("stranger_login", "state_write"):
                self.say(f"adversary: {kind}: {e}")
        for node_id, ok in self.alive().items():
            if not ok and node_id not in self.node_exits:
                self.node_exits.append(node_id)
                self.say(f"adversary: node {node_id} EXITED after a {kind} attack")

    # --- as the app -----------------------------------------------------------------

    def _client(self, login: tuple[str, str] | None, **kw: Any) -> aiomqtt.Client:
        b = BrokerURL.parse(self.broker)
        user, password = login or (None, None)
        return aiomqtt.Client(b.host, b.port, username=user, password=password, timeout=5,
                              identifier=f"adv-{secrets.token_hex(4)}", **kw)

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                       login: Any = "app") -> None:
        async with self._client(self.app_login if login == "app" else login) as c:
            await c.publish(topic, payload, qos=qos, retain=retain)

    async def _deep_json(self) -> None:
        topic = self.rng.choice(["requests", "cancel", "replay"])
        payload = self.rng.choice([DEEP, b'{"id": "x", "from": ' + b"[" * 5000 + b"}", b"[1]", b"\xff\xfe\x00"])
        await self._publish(f"{self.root}/{topic}", payload, qos=self.rng.choice([0, 1]))

    async def _retained_request(self) -> None:
        req = {"id": f"adv-retained-{secrets.token_hex(3)}", "prompt": "She was", "max_tokens": 2}
        await self._publish(f"{self.root}/requests", json.dumps(req).encode(), retain=True)

    async def _oversized_request(self) -> None:
        req = {"id": f"adv-big-{secrets.token_hex(3)}", "prompt": "x" * (1_200_000), "max_tokens": 2}
        await self._publish(f"{self.root}/requests", json.dumps(req).encode())

    async def _reply_to_state(self) -> None:
        req = {"id": f"adv-rt-{secrets.token_hex(3)}", "prompt": "She was", "max_tokens": 2,
               "reply_to": f"{self.root}/plan"}
        await self._publish(f"{self.root}/requests", json.dumps(req).encode())

    async def _state_write(self) -> None:
        node = self.rng.choice(sorted(self.nodes) or ["n1"])
        topic, payload = self.rng.choice([
            ("plan", json.dumps({"version": 10**6, "term": 9_000_000, "planner": "evil", "n_layers": 6,
                                 "replicas": [{"id": 0, "role": "mixed", "slots": 1, "stages": [
                                     {"node_id": "evil", "start": 0, "stop": 6}]}]}).encode()),
            ("planner", b'{"node": "evil", "term": 9000000}'),
            (f"ready/{node}", b"[1]"),
            (f"members/{node}", DEEP),
            (f"heartbeat/{node}", DEEP),
        ])
        # a closed mesh refuses these publishes (the broker's topic rule); an open mesh gets only the malformed
        if self.app_login is None and topic in ("plan", "planner"):
            return
        await self._publish(f"{self.root}/{topic}", payload, retain=self.rng.random() < 0.5)

    # --- as a stranger ---------------------------------------------------------------

    async def _stranger_login(self) -> None:
        if self.app_login is None:
            return  # an open mesh lets anyone in: nothing to try
        login = self.rng.choice([None, ("meshllm-app", "guess"), ("meshllm-node", secrets.token_hex(32))])
        async with self._client(login) as c:
            await c.publish(f"{self.root}/requests", b'{"id": "stranger", "prompt": "x"}', qos=1)
            raise OSError("a stranger got in")  # unreachable on a closed mesh: counted as refused otherwise

    async def _dataplane_junk(self) -> None:
        if not self.nodes:
            return
        host, port = self.nodes[self.rng.choice(sorted(self.nodes))]
        held: list[asyncio.StreamWriter] = []
        try:
            for i in range(60):
                with contextlib.suppress(OSError, TimeoutError):
                    _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
                    w.write(secrets.token_bytes(self.rng.choice([0, 16, 600, 5000])) if i % 3 else b"")
                    if i % 10 == 0:
                        held.append(w)  # idle, unauthenticated connections held for a while
                    else:
                        w.close()
            await asyncio.sleep(2.0)
        finally:
            for w in held:
                w.close()

    # --- a careless user ------------------------------------------------------------

    async def _duplicate_node(self) -> None:
        victim = self.rng.choice(sorted(self.nodes) or ["n1"])
        cmd = [sys.executable, "-m", "meshllm", "node", "--mesh", self.mesh, "--node-id", victim, "--interface",
               self.interface, "--broker", self.broker, "--quick-profile"]
        if self.secret_env is None:
            cmd.append("--open")
        env = {**__import__("os").environ, **(self.secret_env or {})}
        p = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                                 cwd=ROOT)
        try:
            async with asyncio.timeout(40):
                _, err = await p.communicate()
            line = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
            self.duplicate_outcomes.append(f"exit {p.returncode}: {line[:160]}")
            self.say(f"adversary: a second node with id {victim}: exit {p.returncode}: {line[:120]}")
        except TimeoutError:
            p.kill()
            await p.wait()
            self.duplicate_outcomes.append("still running after 40 s (killed)")
            self.say(f"adversary: a second node with id {victim} was NOT refused within 40 s")
