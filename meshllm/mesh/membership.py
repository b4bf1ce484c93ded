"""Who is in the mesh: a pure state machine fed by gossip events and the clock.

Members appear with their retained profile message, stay while their
heartbeats arrive, and leave when their retained profile is cleared (a clean
leave, or the broker firing their last will) or when no heartbeat came for
``timeout`` seconds. No I/O and no clock of its own: the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Member:
    node_id: str
    info: dict[str, Any]  # the gossiped record: profile, data-plane address, flags
    last_seen: float


@dataclass
class Membership:
    self_id: str
    timeout: float = 1.5
    members: dict[str, Member] = field(default_factory=dict)

    def on_record(self, node_id: str, info: dict[str, Any] | None, now: float) -> bool:
        """A retained member record arrived (``None``: cleared). Returns True if the set changed."""
        if info is None:
            return self.members.pop(node_id, None) is not None
        known = node_id in self.members
        self.members[node_id] = Member(node_id, info, now)
        return not known

    def on_heartbeat(self, node_id: str, now: float) -> None:
        m = self.members.get(node_id)
        if m is not None:
            m.last_seen = now

    def grace(self, now: float, extra: float) -> None:
        """A new broker session: every member gets ``timeout + extra`` from now to be heard again (the silence
        was ours, not theirs, and they are reconnecting too)."""
        for m in self.members.values():
            m.last_seen = max(m.last_seen, now + extra)

    def expire(self, now: float) -> list[str]:
        """Drops members silent for longer than the timeout (never ourselves); returns their ids."""
        gone = [i for i, m in self.members.items() if i != self.self_id and now - m.last_seen > self.timeout]
        for i in gone:
            del self.members[i]
        return gone

    @property
    def ids(self) -> list[str]:
        return sorted(self.members)
