"""The mesh's record of accepted requests, kept on the broker so that losing any one node loses none.

Two retained topics per request (:mod:`meshllm.mesh.topics`):

- ``jobs/<id>``: written by the scheduler when it accepts a request (prompt
  token ids, metadata with a fixed sampling seed) and again, *before* it sends
  the prompt anywhere, with the route (plan version, replicas and their nodes)
  and the attempt number;
- ``progress/<id>``: written by the node streaming the request, after the
  token replies it covers (through the same ordered publisher), every
  :data:`PROGRESS_EVERY_S`: the tokens streamed so far and the sampler state.

Both are cleared (an empty retained payload) by the node that streams the
final reply. Every serving node follows both topics, so whichever node is the
planner knows every request in flight, where it runs, and how far it got.

A request whose route lost a node *resumes*: its prompt plus the checkpointed
tokens are prefilled on a healthy replica, the sampler continues from its
checkpointed state, and streaming continues at the next index. Tokens streamed
after the last checkpoint are produced again with the same index and the same
value (greedy, or seeded sampling: every request has a seed); the client
drops an index it already has (:class:`meshllm.serve.client._Reorder`), as it
must anyway under MQTT's at-least-once delivery.

On a mesh with a secret both records are sealed (:class:`meshllm.secret.Sealer`):
prompts and outputs rest on the broker, which apps share, so they are readable
and writable by nodes only, whatever the broker delivers. Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from meshllm.secret import Sealer

PROGRESS_EVERY_S = 0.25
MAX_RECORD_BYTES = 4 << 20


def frame_key(request_id: str, attempt: int) -> str:
    """The id a request's frames carry: a new one per attempt, so that stages never mix two attempts'
    state (``@`` cannot occur in a request id)."""
    return request_id if attempt == 0 else f"{request_id}@{attempt}"


def request_of(key: str) -> str:
    """The request id of a frame key."""
    return key.split("@", 1)[0]


def attempt_of(key: str) -> int:
    """The attempt of a frame key (0 for a key without ``@``; -1 for one that is not a number)."""
    _, at, n = key.partition("@")
    if not at:
        return 0
    return int(n) if n.isdigit() else -1


@dataclass
class Route:
    pv: int  # plan version
    prefill_r: int
    decode_r: int
    prefill_nodes: list[str]
    decode_nodes: list[str]

    @property
    def nodes(self) -> set[str]:
        return set(self.prefill_nodes) | set(self.decode_nodes)

    def to_json(self) -> dict[str, Any]:
        return {"pv": self.pv, "pr": self.prefill_r, "dr": self.decode_r, "prefill_nodes": self.prefill_nodes,
                "decode_nodes": self.decode_nodes}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Route:
        return cls(int(d["pv"]), int(d["pr"]), int(d["dr"]), [str(n) for n in d["prefill_nodes"]],
                   [str(n) for n in d["decode_nodes"]])


@dataclass
class JobRecord:
    id: str
    prompt: list[int]  # the prompt's token ids
    meta: dict[str, Any]  # what stages carry: reply topic, sampling (seeded), prompt length, arrival time
    route: Route | None = None  # None: accepted, waiting in the scheduler's queue
    attempt: int = 0  # how many times it was resumed

    @property
    def key(self) -> str:
        return frame_key(self.id, self.attempt)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "prompt": self.prompt, "meta": self.meta, "attempt": self.attempt,
                           "route": self.route.to_json() if self.route else None})

    @classmethod
    def from_json(cls, payload: bytes) -> JobRecord:
        d = json.loads(payload)
        return cls(str(d["id"]), [int(t) for t in d["prompt"]], dict(d["meta"]),
                   Route.from_json(d["route"]) if d.get("route") else None, int(d.get("attempt", 0)))


@dataclass
class Progress:
    tokens: list[int] = field(default_factory=list)  # streamed, in order
    sampler: str | None = None  # the sampler's state after drawing them (None: greedy)
    attempt: int = 0

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens, "sampler": self.sampler, "attempt": self.attempt})

    @classmethod
    def from_json(cls, payload: bytes) -> Progress:
        d = json.loads(payload)
        return cls([int(t) for t in d["tokens"]], d.get("sampler"), int(d.get("attempt", 0)))


class Journal:
    """One node's copy of the journal, fed by the retained topics."""

    def __init__(self, sealer: Sealer | None = None) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.progress: dict[str, Progress] = {}
        self.sealer = sealer  # None: an open mesh, records in clear

    # --- the wire form (sealed on a mesh with a secret) ---------------------

    def encode_job(self, rec: JobRecord) -> str:
        return self._seal("jobs", rec.id, rec.to_json())

    def encode_progress(self, request_id: str, progress: Progress) -> str:
        return self._seal("progress", request_id, progress.to_json())

    def _seal(self, kind: str, request_id: str, text: str) -> str:
        return self.sealer.seal(text.encode(), f"{kind}/{request_id}".encode()) if self.sealer else text

    def _open(self, kind: str, request_id: str, payload: bytes) -> bytes:
        """The record's JSON; raises ValueError for one this mesh did not seal (a forgery, or clear text)."""
        if self.sealer is None:
            return payload
        from meshllm.errors import SecretError

        try:
            return self.sealer.open(payload, f"{kind}/{request_id}".encode())
        except SecretError as e:
            raise ValueError(str(e)) from None

    # --- following the retained topics ---------------------------------------

    def on_job(self, request_id: str, payload: bytes) -> JobRecord | None:
        """Applies a ``jobs/<id>`` message; returns the record it removed when the payload is empty."""
        if not payload:
            self.progress.pop(request_id, None)
            return self.jobs.pop(request_id, None)
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"job record of {len(payload)} bytes is too large")
        rec = JobRecord.from_json(self._open("jobs", request_id, payload))
        if rec.id != request_id:
            raise ValueError(f"job record {rec.id!r} published under {request_id!r}")
        old = self.jobs.get(request_id)
        if old is None or rec.attempt >= old.attempt:
            self.jobs[request_id] = rec
        return None

    def on_progress(self, request_id: str, payload: bytes) -> None:
        if not payload:
            self.progress.pop(request_id, None)
            return
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"progress record of {len(payload)} bytes is too large")
        p = Progress.from_json(self._open("progress", request_id, payload))
        old = self.progress.get(request_id)
        if old is None or (p.attempt, len(p.tokens)) >= (old.attempt, len(old.tokens)):
            self.progress[request_id] = p

    def progress_of(self, rec: JobRecord) -> Progress:
        """The checkpoint to resume ``rec`` from: only a checkpoint of its current attempt or an earlier one
        (a later attempt never checkpoints before its record is written)."""
        p = self.progress.get(rec.id)
        return p if p is not None and p.attempt <= rec.attempt else Progress()

    def stranded(self, alive: set[str]) -> list[JobRecord]:
        """Routed jobs one of whose nodes is gone, oldest first."""
        out = [r for r in self.jobs.values() if r.route is not None and not r.route.nodes <= alive]
        return sorted(out, key=lambda r: r.meta.get("t_received", 0.0))

    def routed_through(self, version: int, replica: int) -> bool:
        """Whether a request in flight is routed through replica ``replica`` of plan ``version``."""
        return any(r.route is not None and r.route.pv == version and replica in (r.route.prefill_r, r.route.decode_r)
                   for r in self.jobs.values())

    def unrouted(self) -> list[JobRecord]:
        """Accepted jobs not yet dispatched, oldest first."""
        return sorted((r for r in self.jobs.values() if r.route is None), key=lambda r: r.meta.get("t_received", 0.0))
