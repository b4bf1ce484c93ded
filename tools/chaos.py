"""Bounded chaos against a real mesh: faults while a request stream runs, and an account of every request.

    python tools/chaos.py --duration 300 --nodes 4 --seed 1 --faults kill,cut,netem [--rate 1] [--json FILE]

Testbed: one network namespace per ``meshllm node`` and one for an external
Mosquitto broker, all on a throw-away bridge (:func:`tests.netns.bridged_hosts`,
addresses 10.214.x.y); the bridge gets the address .254 so that this process
(the app and the fault injector, in the root namespace) reaches them. Nothing
touches the machine's real interfaces; namespaces, processes and qdiscs are
removed on exit, Ctrl-C and errors included.

Faults, from a seeded schedule, one at a time (so at most one node is down and
the mesh can always serve; before each fault the tool waits, bounded, until the
mesh is whole and ready again):

- ``kill``: SIGKILL a random node, restart it (same node id) after a while;
- ``cut``: ``ip link set down`` on a node's veth, up again after a while;
- ``netem``: ``tc qdisc ... netem loss X% delay Y ms`` on a node's veth, then removed;
- ``broker``: SIGTERM Mosquitto, start it again on the same address and port.

The request stream (seeded Poisson arrivals, greedy, bounded in count and time)
goes through :class:`meshllm.Client`. Each request ends as exactly one of
*completed* (final chunk), *failed* (an error: the mesh's code, or the client's
own such as ``broker_lost``) or *lost* (no final and no error by its deadline);
*accepted* means it got any reply. Completed token ids are checked against a
fault-free reference (:class:`~meshllm.runtime.generate.LocalModel`). A raw MQTT
subscription to every reply topic counts what travels on the wire separately
from the client (which drops indices it already has): duplicate indices,
duplicates carrying a different token (conflicts), and indices missing below a
final message. Exit status 1 if anything was lost, wrong, duplicated to the
app or missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

from meshllm.errors import MeshError  # noqa: E402
from meshllm.mesh.access import app_login, node_login, with_login  # noqa: E402
from meshllm.mesh.broker import MOSQUITTO_OPTIONS, BrokerError  # noqa: E402
from meshllm.mesh.status import read_state  # noqa: E402
from meshllm.mesh.topics import Topics  # noqa: E402
from meshllm.secret import SECRET_ENV, generate_secret  # noqa: E402
from meshllm.serve.client import Client, RequestFailed, RequestTimeout  # noqa: E402
from tests.netns import bridged_hosts  # noqa: E402

FAULT_KINDS = ("kill", "cut", "netem", "broker")
SUBNET = 214  # the tests use 10.213.x.y; a chaos run beside them keeps to its own
PROMPTS = ["It is a truth universally acknowledged", "She was", "Mr. Darcy", "The weather was fine, and",
           "Elizabeth could not help", "My dear Mr. Bennet,", "In the evening", "Her sister"]
MESH_CODES = {"invalid_json", "invalid_request", "context_length_exceeded", "busy", "unavailable",
              "internal_error", "cancelled"}


# --- the schedule (pure) -------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the request stream starts (nominal: a fault waits for the mesh to be whole)
    kind: str
    target: str | None  # node id (None: the broker)
    hold: float  # how long the fault lasts
    loss_pct: float = 0.0
    delay_ms: float = 0.0

    def describe(self) -> str:
        what = {"kill": f"SIGKILL {self.target}, restart after {self.hold:.1f} s",
                "cut": f"link of {self.target} down for {self.hold:.1f} s",
                "netem": f"netem on {self.target}: loss {self.loss_pct:.0f}% delay {self.delay_ms:.0f} ms "
                         f"for {self.hold:.1f} s",
                "broker": f"broker SIGTERM, back after {self.hold:.1f} s"}
        return what[self.kind]


def plan_faults(seed: int, duration: float, kinds: list[str], node_ids: list[str], *, first_s: float = 4.0,
                hold_s: tuple[float, float] = (2.0, 7.0), gap_s: tuple[float, float] = (3.0, 7.0)) -> list[Fault]:
    """A seeded sequence of faults, one at a time, all over before the last ``gap_s[0]`` seconds of the run."""
    rng = random.Random(seed)
    out: list[Fault] = []
    t = first_s
    for _ in range(int(duration / gap_s[0]) + 1):
        kind = rng.choice(kinds)
        hold = rng.uniform(1.0, 4.0) if kind == "broker" else rng.uniform(*hold_s)
        if t + hold > duration - gap_s[0]:
            break
        target = None if kind == "broker" else rng.choice(node_ids)
        loss, delay = (rng.choice([5.0, 10.0, 20.0, 30.0]), rng.choice([20.0, 50.0, 100.0, 200.0])) \
            if kind == "netem" else (0.0, 0.0)
        out.append(Fault(round(t, 2), kind, target, round(hold, 2), loss, delay))
        t += hold + rng.uniform(*gap_s)
    return out


# --- the testbed ------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=20)


class Testbed:
    """Namespaces on a bridge, Mosquitto in one, a ``meshllm node`` in each of the others."""

    def __init__(self, hosts: list[tuple[str, str]], n_nodes: int, model: Path, log_dir: Path, *,
                 mesh: str, compute_scale: float, verbose: bool, broker_persistence: bool,
                 secret: str | None = None) -> None:
        self.mesh, self.model, self.log_dir = mesh, model, log_dir
        self.secret = secret  # a closed mesh: Mosquitto with the node and app logins and the topic rules as ACL
        self.compute_scale, self.verbose, self.persistence = compute_scale, verbose, broker_persistence
        self.broker_ns, self.broker_addr = hosts[0]
        self.node_hosts = {f"n{i + 1}": hosts[i + 1] for i in range(n_nodes)}
        tag = self.broker_ns[len("mlns"):-1]  # tests/netns.py names: mlns<tag><i>, mlbr<tag>, mlv<tag><i>
        self.bridge = f"mlbr{tag}"
        self.veth = {n: f"mlv{tag}{ns[-1]}" for n, (ns, _) in self.node_hosts.items()}
        self.app_addr = self.broker_addr.rsplit(".", 1)[0] + ".254"
        self.broker_url = f"mqtt://{self.broker_addr}:1883"  # what nodes are given (they log in by themselves)
        # what the app, the observer and the tool's own reads use: the app login on a closed mesh
        self.app_url = with_login(self.broker_url, app_login(secret)) if secret else self.broker_url
        self.node_url = with_login(self.broker_url, node_login(secret)) if secret else self.broker_url
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.netem_on: set[str] = set()
        self.netem_how = ""
        self._conf_dir = Path(tempfile.mkdtemp(prefix="chaos-broker-"))

    def open(self) -> None:
        _run("ip", "addr", "add", f"{self.app_addr}/24", "dev", self.bridge)
        for n, (ns, _) in self.node_hosts.items():
            _run("ip", "-n", ns, "link", "show", self.veth[n])  # the naming assumption holds

    def close(self) -> None:
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            self.procs.pop(name, None)
        for n in list(self.netem_on):
            self.netem(n, None)
        shutil.rmtree(self._conf_dir, ignore_errors=True)

    # broker

    def start_broker(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = [f"listener 1883 {self.broker_addr}", "user root", *MOSQUITTO_OPTIONS]
        if self.secret is None:
            conf.append("allow_anonymous true")
        else:
            conf += ["allow_anonymous false", f"password_file {self._conf_dir}/passwd",
                     f"acl_file {self._conf_dir}/acl"]
            self._write_logins()
        if self.persistence:
            conf += ["persistence true", f"persistence_location {self._conf_dir}/", "autosave_interval 1"]
        else:
            conf.append("persistence false")
        (self._conf_dir / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        log = open(self.log_dir / "mosquitto.log", "a")
        self.procs["broker"] = subprocess.Popen(
            ["ip", "netns", "exec", self.broker_ns, exe, "-v", "-c", str(self._conf_dir / "mosquitto.conf")],
            stdout=log, stderr=log)
        log.close()

    def _write_logins(self) -> None:
        """Mosquitto's password and ACL files for a closed mesh: the two logins derived from the secret, and the
        topic rule of :mod:`meshllm.mesh.access` written as ACL lines (docs/security.md)."""
        assert self.secret is not None
        passwd = self._conf_dir / "passwd"
        for i, (user, password) in enumerate((node_login(self.secret), app_login(self.secret))):
            _run("mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password)
        root = "meshllm/v1/+"
        acl = ["user meshllm-node", "topic readwrite #", "", "user meshllm-app"]
        acl += [f"topic write {root}/{t}" for t in ("requests", "cancel", "replay")]
        acl += [f"topic read {root}/{t}" for t in ("replies/#", "members/+", "planner", "plan", "ready/+", "stats/+")]
        (self._conf_dir / "acl").write_text("\n".join(acl) + "\n")

    def stop_broker(self) -> None:
        p = self.procs.pop("broker")
        p.terminate()
        p.wait(10)

    # nodes

    def start_node(self, node_id: str) -> subprocess.Popen[str]:
        ns, addr = self.node_hosts[node_id]
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "meshllm", *(["-v"] if self.verbose else []),
               "node", "--mesh", self.mesh, "--node-id", node_id, "--interface", addr, "--quick-profile",
               "--broker", self.broker_url, "--model", str(self.model)]
        if self.secret is None:
            cmd.append("--open")
        if self.compute_scale > 1:
            cmd += ["--emulate-compute-scale", str(self.compute_scale)]
        log = open(self.log_dir / f"{node_id}.log", "a")
        log.write(f"\n===== chaos: starting {node_id} at {time.strftime('%H:%M:%S')} =====\n")
        log.flush()
        env = {**os.environ, SECRET_ENV: self.secret} if self.secret else None
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
        log.close()
        self.procs[node_id] = p
        return p

    async def wait_started(self, node_id: str, timeout: float = 60.0) -> None:
        p = self.procs[node_id]
        assert p.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await asyncio.to_thread(p.stdout.readline)
                if not line:
                    raise RuntimeError(f"node {node_id} exited at start; see {self.log_dir / node_id}.log")
                if '"started"' in line:
                    return

    def kill_node(self, node_id: str) -> None:
        p = self.procs.pop(node_id)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    # links

    def link(self, node_id: str, up: bool) -> None:
        ns, _ = self.node_hosts[node_id]
        _run("ip", "-n", ns, "link", "set", self.veth[node_id], "up" if up else "down")
        if up:  # a link going down drops the routes through it: put back bridged_hosts' multicast route (mDNS)
            _run("ip", "-n", ns, "route", "replace", "224.0.0.0/4", "dev", self.veth[node_id], check=False)

    def netem(self, node_id: str, spec: tuple[float, float] | None) -> None:
        """Degrades a node's link: ``tc netem`` loss and delay where the kernel has it; otherwise (no
        sch_netem, as on the development machine) nftables random drops on the veth, both ways, and a
        ``tbf`` rate limit whose queue holds packets up to the delay (so: loss, and delay under load)."""
        ns, _ = self.node_hosts[node_id]
        veth = self.veth[node_id]
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        nft = ["ip", "netns", "exec", ns, "nft"]
        if spec is None:
            _run(*tc, "del", "dev", veth, "root", check=False)
            _run(*nft, "delete", "table", "inet", "chaos", check=False)
            self.netem_on.discard(node_id)
            return
        loss, delay = spec
        self.netem_on.add(node_id)
        if _run(*tc, "add", "dev", veth, "root", "netem", "loss", f"{loss:g}%", "delay", f"{delay:g}ms",
                check=False).returncode == 0:
            self.netem_how = "tc netem"
            return
        if shutil.which("nft") is None:
            raise RuntimeError("this kernel has no tc netem and nft (nftables) is missing: apt-get install nftables")
        _run(*nft, "add", "table", "inet", "chaos")
        for chain, hook, dev in (("out", "output", "oifname"), ("in", "input", "iifname")):
            _run(*nft, "add", "chain", "inet", "chaos", chain, f"{{ type filter hook {hook} priority 0 ; }}")
            _run(*nft, "add", "rule", "inet", "chaos", chain, dev, veth, "numgen", "random", "mod", "100", "lt",
                 f"{int(loss)}", "drop")
        _run(*tc, "add", "dev", veth, "root", "tbf", "rate", "2mbit", "burst", "32kbit", "latency", f"{delay:g}ms")
        self.netem_how = "nftables random drop (both ways) + tbf 2 Mbit/s (no sch_netem in this kernel)"

    # state

    async def whole(self, n: int) -> tuple[bool, str]:
        """Every node a member, a plan out, and every node of it ready for it."""
        try:
            st = await read_state(self.mesh, self.app_url, quiet_s=0.3)
            ready = await _retained(self.app_url, f"{Topics(self.mesh).root}/ready/+")
        except (aiomqtt.MqttError, OSError, MeshError) as e:
            return False, f"broker: {e}"
        plan = st.get("plan")
        if len(st.get("members") or {}) < n:
            return False, f"members {sorted(st.get('members') or {})}"
        if not plan:
            return False, "no plan"
        nodes = {s["node_id"] for r in plan["replicas"] for s in r["stages"]}
        unready = sorted(x for x in nodes if json.loads(ready.get(x, b"{}")).get("pv") != plan["version"])
        return (not unready), f"plan v{plan['version']}, not ready: {unready}"


async def _retained(broker: str, topic: str, quiet_s: float = 0.3) -> dict[str, bytes]:
    """The retained messages under ``topic`` (by leaf), read until the broker is quiet for ``quiet_s``."""
    from meshllm.mesh.broker import BrokerURL

    out: dict[str, bytes] = {}
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs(), timeout=5) as c:
        await c.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(quiet_s):
                    m = await anext(aiter(c.messages))
                if isinstance(m.payload, bytes) and m.payload:
                    out[str(m.topic).rsplit("/", 1)[-1]] = m.payload
    return out


# --- the app side -----------------------------------------------------------------


@dataclass
class Outcome:
    id: str
    prompt: str
    max_tokens: int
    t_sent: float  # monotonic
    status: str = "pending"  # completed | failed | lost
    accepted: bool = False
    code: str | None = None
    message: str | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    resumed: int = 0
    app_duplicates: int = 0
    app_gaps: int = 0
    t_end: float = 0.0


@dataclass
class Wire:
    """What the raw subscription saw for one request."""

    tokens: dict[int, list[int]] = field(default_factory=dict)  # index -> token ids of every copy
    finals: list[int] = field(default_factory=list)  # index of every final message
    errors: list[str] = field(default_factory=list)


class Load:
    """A seeded Poisson request stream through :class:`Client`, and a raw observer of the reply topics."""

    def __init__(self, broker: str, mesh: str, *, seed: int, rate: float, duration: float, deadline: float,
                 max_tokens: tuple[int, int], say: Any) -> None:
        self.broker, self.mesh, self.topics = broker, mesh, Topics(mesh)
        self.rng = random.Random(seed ^ 0x5EED)
        self.rate, self.duration, self.deadline, self.max_tokens = rate, duration, deadline, max_tokens
        self.say = say
        self.run_tag = secrets.token_hex(2)
        self.outcomes: list[Outcome] = []
        self.wire: dict[str, Wire] = {}
        self.observer_down_s = 0.0
        self.client_reconnects = 0
        self._client: Client | None = None
        self._client_ok = asyncio.Event()
        self._broken = asyncio.Event()
        self._observer_up = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            owner = tg.create_task(self._own_client())
            observer = tg.create_task(self._observe())
            async with asyncio.timeout(30):
                await self._observer_up.wait()
                await self._client_ok.wait()
            await self._send_all()
            self._stop.set()
            self._broken.set()
            owner.cancel()
            observer.cancel()

    async def _send_all(self) -> None:
        t0 = time.monotonic()
        limit = math.ceil(self.duration * self.rate * 2) + 10  # Poisson arrivals: bounded in count as well
        async with asyncio.TaskGroup() as tg:
            for i in range(limit):
                now = time.monotonic() - t0
                if now >= self.duration:
                    break
                prompt = self.rng.choice(PROMPTS)
                o = Outcome(f"chaos-{self.run_tag}-{i}", prompt, self.rng.randint(*self.max_tokens), time.monotonic())
                self.outcomes.append(o)
                tg.create_task(self._one(o))
                await asyncio.sleep(min(self.rng.expovariate(self.rate), self.duration))

    async def _one(self, o: Outcome) -> None:
        try:
            async with asyncio.timeout(10):
                await self._client_ok.wait()
        except TimeoutError:
            o.status, o.code, o.message = "failed", "unsent", "no broker connection for 10 s"
            return
        client = self._client
        assert client is not None
        expect = 0
        try:
            async with asyncio.timeout(self.deadline):
                stream = client.stream(o.prompt, max_tokens=o.max_tokens, temperature=0, request_id=o.id)
                async with contextlib.aclosing(stream) as chunks:
                    async for ch in chunks:
                        o.accepted = True
                        if ch.index < expect:
                            o.app_duplicates += 1
                            continue
                        o.app_gaps += ch.index - expect
                        expect = ch.index + 1
                        if ch.token_id is not None:
                            o.token_ids.append(ch.token_id)
                        if ch.done:
                            o.status, o.finish_reason = "completed", ch.finish_reason
                            o.resumed = int((ch.timings or {}).get("resumed", 0))
        except (TimeoutError, RequestTimeout) as e:
            o.status, o.code, o.message = "lost", "timeout", str(e) or f"no final within {self.deadline} s"
        except RequestFailed as e:
            o.status, o.code, o.message = "failed", e.code, e.message
            o.accepted = o.accepted or e.code in MESH_CODES
        except BrokerError as e:
            o.status, o.code, o.message = "failed", "broker_lost", str(e)
            if client.lost:  # the client reconnects by itself; reopen it only once it has given up
                self._broken.set()
        except (MeshError, RuntimeError) as e:  # RuntimeError: the client was closed (reopened) meanwhile
            o.status, o.code, o.message = "failed", "client_error", str(e)
        o.t_end = time.monotonic()

    async def _own_client(self) -> None:
        """Keeps one Client open; reopens it when the broker connection broke (as an app would)."""
        for attempt in range(10_000):
            if self._stop.is_set():
                return
            try:
                async with Client(mesh=self.mesh, broker=self.broker, first_token_timeout=self.deadline,
                                  idle_timeout=self.deadline, gap_timeout=self.deadline) as c:
                    self._client = c
                    self._broken.clear()
                    self._client_ok.set()
                    if attempt:
                        self.client_reconnects += 1
                        self.say("app: client reconnected")
                    await self._broken.wait()
            except (BrokerError, MeshError) as e:
                self.say(f"app: client cannot connect: {e}")
            finally:
                self._client_ok.clear()
                self._client = None
            await asyncio.sleep(0.5)

    async def _observe(self) -> None:
        from meshllm.mesh.broker import BrokerURL

        down_since: float | None = None
        for _ in range(100_000):
            try:
                async with aiomqtt.Client(**BrokerURL.parse(self.broker).client_kwargs(), keepalive=3, timeout=5,
                                          identifier=f"chaos-wire-{self.run_tag}") as c:
                    await c.subscribe(f"{self.topics.replies}/#", qos=1)
                    if down_since is not None:
                        self.observer_down_s += time.monotonic() - down_since
                        down_since = None
                    self._observer_up.set()
                    async for m in c.messages:
                        self._record(str(m.topic), m.payload if isinstance(m.payload, bytes) else b"")
            except aiomqtt.MqttError:
                if down_since is None:
                    down_since = time.monotonic()
                    self.say("wire: lost the broker connection")
                await asyncio.sleep(0.3)  # (the app's Client reconnects by itself)

    def _record(self, topic: str, payload: bytes) -> None:
        try:
            d = json.loads(payload)
            rid = str(d.get("id") or topic.rsplit("/", 1)[-1])
        except (ValueError, AttributeError):
            return
        w = self.wire.setdefault(rid, Wire())
        if "error" in d:
            w.errors.append(str(d["error"].get("code") if isinstance(d["error"], dict) else d["error"]))
        elif d.get("done"):
            w.finals.append(int(d["index"]))
        elif "index" in d:
            w.tokens.setdefault(int(d["index"]), []).append(int(d.get("token_id", -1)))


# --- the report ---------------------------------------------------------------------


def reference(model: Path, max_tokens: int) -> dict[str, list[int]]:
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    lm = LocalModel(model)
    return {p: list(lm.generate(p, SamplingParams(max_tokens=max_tokens, temperature=0)).token_ids) for p in PROMPTS}


def make_report(load: Load, ref: dict[str, list[int]], faults: list[dict[str, Any]], journal_left: list[str],
                meta: dict[str, Any]) -> dict[str, Any]:
    outs = load.outcomes
    status = Counter(o.status for o in outs)
    failed = Counter(o.code for o in outs if o.status == "failed")
    mismatched = [o.id for o in outs if o.status == "completed" and o.token_ids != ref[o.prompt][: o.max_tokens]]
    wire_dups = wire_conflicts = wire_missing = 0
    missing_ids: list[str] = []
    for o in outs:
        w = load.wire.get(o.id)
        if w is None:
            continue
        wire_dups += sum(len(v) - 1 for v in w.tokens.values()) + max(0, len(w.finals) - 1)
        wire_conflicts += sum(1 for v in w.tokens.values() if len(set(v)) > 1) + (len(set(w.finals)) > 1)
        if w.finals:
            gone = [i for i in range(min(w.finals)) if i not in w.tokens]
            wire_missing += len(gone)
            if gone:
                missing_ids.append(o.id)
    app_missing = sum(o.app_gaps for o in outs) + sum(1 for o in outs if o.code == "protocol_error")
    report = {
        **meta,
        "requests": {
            "sent": len(outs), "accepted": sum(o.accepted for o in outs), "completed": status["completed"],
            "failed": dict(sorted(failed.items())), "lost": status["lost"],
            "resumed": sum(1 for o in outs if o.resumed), "pending": status["pending"],
        },
        "tokens": {
            "completed_tokens": sum(len(o.token_ids) for o in outs if o.status == "completed"),
            "app_duplicates": sum(o.app_duplicates for o in outs), "app_missing": app_missing,
            "wire_duplicate_indices": wire_dups, "wire_conflicting_duplicates": wire_conflicts,
            "wire_missing": wire_missing, "mismatched_requests": len(mismatched),
        },
        "latency_s": _quantiles([o.t_end - o.t_sent for o in outs if o.status == "completed"]),
        "wire_observer_down_s": round(load.observer_down_s, 1),
        "client_reconnects": load.client_reconnects,
        "journal_left": journal_left,
        "faults": faults,
        "lost_ids": [o.id for o in outs if o.status == "lost"],
        "mismatched_ids": mismatched,
        "wire_missing_ids": missing_ids,
        "failures": [{"id": o.id, "code": o.code, "message": (o.message or "")[:300]}
                     for o in outs if o.status == "failed"][:50],
    }
    t = report["tokens"]
    adv = meta.get("adversary") or {}
    dup_ok = all(d.startswith("exit 2:") for d in adv.get("duplicate_node", []))
    report["ok"] = (not adv.get("node_exits") and dup_ok and status["lost"] == 0 and status["pending"] == 0
                    and not mismatched and t["app_duplicates"] == 0 and app_missing == 0 and wire_conflicts == 0)
    return report


def _adversary_rows(adv: dict[str, Any] | None) -> list[tuple[str, Any]]:
    if not adv:
        return []
    counts = ", ".join(f"{k} {v}" for k, v in adv["attacks"].items()) or "none"
    refused = ", ".join(f"{k} {v}" for k, v in adv["refused"].items()) or "none"
    return [("adversary: attacks sent", counts), ("adversary: refused at connect", refused),
            ("nodes that exited under attack", len(adv["node_exits"])),
            ("duplicate node ids started", "; ".join(adv["duplicate_node"]) or "none")]


def _quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs) or [0.0]
    return {k: round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) for k, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}


def render(r: dict[str, Any]) -> str:
    q, t = r["requests"], r["tokens"]
    failed = ", ".join(f"{k} {v}" for k, v in q["failed"].items()) or "none"
    kinds = Counter(f["kind"] for f in r["faults"])
    rows = [
        ("duration / nodes / seed", f"{r['duration_s']} s / {r['nodes']} / {r['seed']}"),
        ("faults injected", f"{len(r['faults'])} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})"),
        ("requests sent", q["sent"]),
        ("accepted (got a reply)", q["accepted"]),
        ("completed", f"{q['completed']} (resumes logged by the planner: {r['resumes_logged']})"),
        ("completion time p50 / p99 / max", " / ".join(f"{r['latency_s'][k]:.1f} s" for k in ("p50", "p99", "max"))),
        ("failed with an error", f"{sum(q['failed'].values())} ({failed})"),
        ("lost", q["lost"]),
        ("tokens in completed answers", t["completed_tokens"]),
        ("duplicated tokens delivered to the app", t["app_duplicates"]),
        ("duplicate indices on the wire", f"{t['wire_duplicate_indices']} "
                                          f"({t['wire_conflicting_duplicates']} with a different token)"),
        ("missing tokens (app / wire)", f"{t['app_missing']} / {t['wire_missing']}"),
        ("completed answers != reference", t["mismatched_requests"]),
        ("journal records left on the broker", len(r["journal_left"])),
        *_adversary_rows(r.get("adversary")),
        ("result", "OK" if r["ok"] else "FAILED"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


# --- the run --------------------------------------------------------------------------


async def wait_whole(bed: Testbed, n: int, timeout: float, say: Any) -> bool:
    deadline = time.monotonic() + timeout
    why = ""
    while time.monotonic() < deadline:
        ok, why = await bed.whole(n)
        if ok:
            return True
        await asyncio.sleep(0.5)
    say(f"mesh not whole after {timeout:.0f} s ({why})")
    return False


async def inject(bed: Testbed, schedule: list[Fault], n: int, t0: float, stop_at: float, say: Any
                 ) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = []
    for f in schedule:
        while time.monotonic() - t0 < f.at:
            await asyncio.sleep(0.1)
        if time.monotonic() - t0 + f.hold > stop_at:
            break
        whole = await wait_whole(bed, n, 40, say)
        start = time.monotonic() - t0
        say(f"FAULT {f.describe()}")
        if f.kind == "kill":
            assert f.target is not None
            bed.kill_node(f.target)
            await asyncio.sleep(f.hold)
            bed.start_node(f.target)
            await bed.wait_started(f.target)
            say(f"  {f.target} restarted")
        elif f.kind == "cut":
            assert f.target is not None
            bed.link(f.target, False)
            await asyncio.sleep(f.hold)
            bed.link(f.target, True)
            say(f"  link of {f.target} up")
        elif f.kind == "netem":
            assert f.target is not None
            bed.netem(f.target, (f.loss_pct, f.delay_ms))
            await asyncio.sleep(f.hold)
            bed.netem(f.target, None)
            say(f"  netem on {f.target} removed")
        elif f.kind == "broker":
            bed.stop_broker()
            await asyncio.sleep(f.hold)
            bed.start_broker()
            say("  broker started again")
        done.append({**asdict(f), "at": round(start, 1), "mesh_whole_before": whole})
    return done


async def run(args: argparse.Namespace, hosts: list[tuple[str, str]], schedule: list[Fault],
              ref: dict[str, list[int]], log_dir: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    from meshllm.cli import quiet_lost_mqtt_futures

    quiet_lost_mqtt_futures(asyncio.get_running_loop())

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    mesh = f"chaos-{secrets.token_hex(3)}"
    bed = Testbed(hosts, args.nodes, Path(args.model), log_dir, mesh=mesh, compute_scale=args.slow,
                  verbose=args.verbose_nodes, broker_persistence=args.broker_persistence,
                  secret=generate_secret() if args.secret else None)
    try:
        bed.open()
        bed.start_broker()
        ids = list(bed.node_hosts)
        for i in ids:
            bed.start_node(i)
        for i in ids:
            await bed.wait_started(i)
        if not await wait_whole(bed, args.nodes, 90, say):
            raise RuntimeError(f"the mesh never became ready; logs in {log_dir}")
        say(f"mesh {mesh} ready: {args.nodes} nodes, broker {bed.broker_url}, app at {bed.app_addr}")
        plan = (await read_state(mesh, bed.app_url, quiet_s=0.3)).get("plan") or {}
        for r in plan.get("replicas", []):
            say(f"  replica {r['id']} {r['role']:<7} " + " -> ".join(
                f"{s['node_id']}[{s['start']}-{s['stop'] - 1}]" for s in r["stages"]))
        load = Load(bed.app_url, mesh, seed=args.seed, rate=args.rate, duration=args.duration,
                    deadline=args.deadline, max_tokens=(args.min_tokens, args.max_tokens), say=say)
        adversary = None
        if args.adversary:
            from tools.chaos_adversary import Adversary

            adversary = Adversary(broker=bed.broker_url, mesh=mesh,
                                  app_login=app_login(bed.secret) if bed.secret else None, nodes={},
                                  seed=args.seed, say=say, interface=bed.app_addr,
                                  secret_env={SECRET_ENV: bed.secret} if bed.secret else None,
                                  alive=lambda: {n: p.poll() is None for n, p in bed.procs.items() if n != "broker"})
        async with asyncio.TaskGroup() as tg:
            lt = tg.create_task(load.run())
            t0 = time.monotonic()
            if adversary is not None:
                tg.create_task(_track_nodes(bed, adversary, t0 + args.duration))
                tg.create_task(adversary.run(t0 + args.duration))
            faults = await inject(bed, schedule, args.nodes, t0, args.duration, say)
            say(f"faults over; waiting for {sum(o.status == 'pending' for o in load.outcomes)} "
                "request(s) still in flight")
            await lt
        await asyncio.sleep(1.0)  # let the last journal clears reach the broker
        journal = await _retained(bed.node_url, f"{Topics(mesh).root}/jobs/+")
        meta = {"command": " ".join(["python", "tools/chaos.py", *sys.argv[1:]]), "seed": args.seed,
                "duration_s": args.duration, "nodes": args.nodes, "fault_kinds": args.faults,
                "rate": args.rate, "broker_persistence": args.broker_persistence, "log_dir": str(log_dir),
                "wall_s": round(time.monotonic() - t_start, 1), "netem_how": bed.netem_how or None,
                "closed_mesh": bed.secret is not None,
                "adversary": adversary.report() if adversary is not None else None}
        resumes = sum(p.read_text(errors="replace").count("resuming ") for p in log_dir.glob("n*.log"))
        return make_report(load, ref, faults, sorted(journal), {**meta, "resumes_logged": resumes})
    finally:
        bed.close()


async def _track_nodes(bed: Testbed, adversary: Any, until: float) -> None:
    """Keeps the adversary's list of data-plane addresses current (a restarted node has a new port)."""
    while time.monotonic() < until:
        with contextlib.suppress(aiomqtt.MqttError, OSError, MeshError):
            st = await read_state(bed.mesh, bed.app_url, quiet_s=0.2)
            adversary.nodes = {n: (str(m["host"]), int(m["port"])) for n, m in st["members"].items()
                               if m.get("host") and m.get("port")}
        await asyncio.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of request stream and faults")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", default="kill,cut,netem", help=f"comma-separated, of {','.join(FAULT_KINDS)}")
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--deadline", type=float, default=120.0, help="a request without a final or error "
                    "this long after it was sent is lost")
    ap.add_argument("--slow", type=float, default=15.0, help="--emulate-compute-scale for every node, so that "
                    "requests are in flight when faults strike")
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-austen"))
    ap.add_argument("--broker-persistence", action="store_true", help="Mosquitto keeps retained messages "
                    "across its restart (persistence true)")
    ap.add_argument("--log-dir", help="node and broker logs (default: a new temporary directory)")
    ap.add_argument("--verbose-nodes", action="store_true", help="debug logs from the nodes (-v)")
    ap.add_argument("--json", help="write the report as JSON to this file")
    ap.add_argument("--secret", action="store_true", help="a closed mesh: Mosquitto with the node and app logins "
                    "and the topic rules as ACL; the app logs in")
    ap.add_argument("--adversary", action="store_true", help="a hostile app and a stranger send malformed and "
                    "forbidden messages at random meanwhile (tools/chaos_adversary.py); a node that exits fails "
                    "the run")
    args = ap.parse_args(argv)
    kinds = [k for k in args.faults.split(",") if k]
    if not kinds or any(k not in FAULT_KINDS for k in kinds):
        ap.error(f"--faults: choose from {', '.join(FAULT_KINDS)}")
    if args.nodes < 2:
        ap.error("--nodes: at least 2, so that the mesh can serve while one is down")
    args.faults = kinds
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="chaos-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    schedule = plan_faults(args.seed, args.duration, kinds, [f"n{i + 1}" for i in range(args.nodes)])
    print(f"chaos: {len(schedule)} faults planned over {args.duration:g} s (seed {args.seed}); logs in {log_dir}",
          flush=True)
    ref = reference(Path(args.model), args.max_tokens)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with bridged_hosts(args.nodes + 1, subnet=SUBNET) as hosts:
        report = asyncio.run(run(args, hosts, schedule, ref, log_dir))
    print("\nchaos report\n" + render(report), flush=True)
    if report["lost_ids"] or report["mismatched_ids"]:
        print(f"  lost: {report['lost_ids'][:10]}  mismatched: {report['mismatched_ids'][:10]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    print("chaos: interrupted; namespaces and processes removed", file=sys.stderr)
    sys.exit(130)
