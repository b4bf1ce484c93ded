"""MQTT topic names of a mesh: everything lives under ``meshllm/v1/<mesh>/``.

One place for the names, so that nodes, the status command, apps and docs
agree. Retained topics hold state (members, planner claim, plan); the others
carry events (heartbeats, requests, replies).
"""

from __future__ import annotations

import re

PROTOCOL_VERSION = 1
_MESH_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_mesh_name(mesh: str) -> str:
    if not _MESH_NAME.match(mesh):
        raise ValueError(f"mesh name {mesh!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return mesh


class Topics:
    def __init__(self, mesh: str) -> None:
        self.mesh = check_mesh_name(mesh)
        self.root = f"meshllm/v{PROTOCOL_VERSION}/{mesh}"

    def member(self, node_id: str) -> str:
        """Retained: a member's profile; an empty retained payload (its will) removes it."""
        return f"{self.root}/members/{node_id}"

    @property
    def members(self) -> str:
        return f"{self.root}/members/+"

    def heartbeat(self, node_id: str) -> str:
        return f"{self.root}/heartbeat/{node_id}"

    @property
    def heartbeats(self) -> str:
        return f"{self.root}/heartbeat/+"

    @property
    def planner(self) -> str:
        """Retained: the current planner's claim ``{"node", "term"}``."""
        return f"{self.root}/planner"

    @property
    def plan(self) -> str:
        """Retained: the current plan, stamped with the planner's term."""
        return f"{self.root}/plan"

    @property
    def requests(self) -> str:
        return f"{self.root}/requests"

    @property
    def replies(self) -> str:
        """Prefix of the default reply topics (``replies/<id>``); malformed requests without an id
        are answered on ``replies/_invalid``."""
        return f"{self.root}/replies"

    def reply(self, request_id: str) -> str:
        return f"{self.replies}/{request_id}"

    @property
    def cancel(self) -> str:
        """Apps publish ``{"id": ...}`` here to stop a request they no longer want."""
        return f"{self.root}/cancel"

    @property
    def replay(self) -> str:
        """Apps publish ``{"id": ..., "from": index}`` here after a broker outage to have the replies of a
        request from that index published again (docs/api.md)."""
        return f"{self.root}/replay"

    @property
    def readiness(self) -> str:
        """Retained per node: which plan version and stage it has loaded (``ready/<node_id>``)."""
        return f"{self.root}/ready/+"

    def ready(self, node_id: str) -> str:
        return f"{self.root}/ready/{node_id}"

    def job(self, request_id: str) -> str:
        """Retained: an accepted request, as the scheduler journaled it (cleared when it ends)."""
        return f"{self.root}/jobs/{request_id}"

    @property
    def jobs(self) -> str:
        return f"{self.root}/jobs/+"

    def progress(self, request_id: str) -> str:
        """Retained: the tokens a request has streamed so far, checkpointed by the node streaming them."""
        return f"{self.root}/progress/{request_id}"

    @property
    def all_progress(self) -> str:
        return f"{self.root}/progress/+"

    @property
    def all_stats(self) -> str:
        return f"{self.root}/stats/+"

    def stats(self, node_id: str) -> str:
        """Every second, per serving node: its stage's load and output rate (and the scheduler's queue)."""
        return f"{self.root}/stats/{node_id}"

    def leaf(self, topic: str) -> str:
        """The last level of a topic (a node id for members/heartbeats)."""
        return topic.rsplit("/", 1)[-1]
