"""Choosing the one planner, and fencing stale ones with a term number.

Rule: the accepted planner stays while it is alive (no churn when a node
joins); when it is gone, the live member with the smallest node id claims
``term + 1`` (a retained message). Two claims of one term resolve to the
smaller node id; every node accepts a claim only if its term
is at least the highest term seen. Plans carry the term of the planner that
made them, so a planner that was partitioned away and comes back with an old
term is ignored until it learns the new term. Pure logic: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Election:
    self_id: str
    term: int = 0
    leader: str | None = None

    def on_claim(self, node_id: str, term: int) -> bool:
        """A claim was observed; returns True if it is now the accepted one."""
        if term > self.term or (term == self.term and (self.leader is None or node_id <= self.leader)):
            self.term, self.leader = term, node_id
            return True
        return False

    def should_claim(self, alive: list[str]) -> int | None:
        """The term to claim when the accepted planner is gone and this node is next in line."""
        if self.leader_alive(alive):
            return None
        if alive and min(alive) == self.self_id:
            return self.term + 1
        return None

    def leader_alive(self, alive: list[str]) -> bool:
        return self.leader is not None and self.leader in alive

    def accepts_plan(self, term: int, planner: str) -> bool:
        """Only the accepted planner's plans of its term count. A plan of a later term waits for its claim
        (:meth:`plan_awaits_claim`): a plan stamped with a huge term by a node that never claimed it (a
        forged one) must not replace the plan the mesh serves."""
        return term == self.term and planner == self.leader

    def plan_awaits_claim(self, term: int) -> bool:
        """A plan of a term not yet claimed (its claim may still be on its way): held, not applied."""
        return term > self.term
