"""The embedded broker's access control, as amqtt plugins: logins, topic rules, session guard.

The rule itself (which logins exist, what each role may do) is pure and lives in
:mod:`meshllm.mesh.access`; this module only plugs it into amqtt 0.12 and must not
decide anything on its own. :class:`~meshllm.mesh.broker.EmbeddedBroker` loads it
only when the mesh has a secret.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.events import MQTTEvents
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from meshllm.mesh.access import Role, broker_logins, permitted

log = logging.getLogger(__name__)

_ACTIONS: dict[Action, Any] = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "receive"}


def plugins_config(secret: str) -> dict[str, Any]:
    """The ``plugins`` section of an amqtt config that enforces the mesh's logins and topic rule."""
    logins = {user: [password, role] for user, (password, role) in broker_logins(secret).items()}
    return {f"{__name__}.LoginPlugin": {"logins": logins}, f"{__name__}.TopicPlugin": {}}


def _check(logins: dict[str, list[str]], username: str | None, password: str | None) -> Role | None:
    login = logins.get(username or "")
    if login is None or not hmac.compare_digest((password or "").encode(), login[0].encode()):
        return None
    return "node" if login[1] == "node" else "app"


class LoginPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accepts exactly the configured logins: no anonymous clients, no unknown users, no will
    message on a topic the client may not write."""

    @dataclass
    class Config:
        logins: dict[str, list[str]] = field(default_factory=dict)  # username -> [password, role]

    async def authenticate(self, *, session: Session) -> bool:
        role = _check(self.config.logins, session.username, session.password)
        if role is None:
            log.info("broker: refused client %r from %s: bad or missing login", session.client_id,
                     session.remote_address)
            return False
        # a last will is a publish the broker makes later on the client's behalf: it obeys the same rule
        if session.will_flag and not permitted(role, "publish", session.will_topic or ""):
            log.info("broker: refused client %r: its will topic %r is not its to write", session.client_id,
                     session.will_topic)
            return False
        session.meshllm_role = role
        return True


class TopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Applies :func:`meshllm.mesh.access.permitted` to every publish, subscribe and delivery."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        what = _ACTIONS.get(action) if action is not None else None
        role: Role | None = getattr(session, "meshllm_role", None)
        ok = what is not None and topic is not None and permitted(role, what, topic)
        if not ok and action != Action.RECEIVE:
            log.info("broker: client %r (%s) may not %s %r", getattr(session, "client_id", None), role, what, topic)
        return ok


def guard_sessions(broker: Broker, secret: str) -> None:
    """Keeps a client that fails to log in away from the session of the client id it claims.

    amqtt 0.12 acts on a CONNECT's client id before authenticating it: it deletes the existing
    session of that id (its subscriptions) for a clean session, or takes over its connection
    otherwise. Node ids are public, so anyone could silently unsubscribe or disconnect a node by
    connecting with its id and a wrong password. The broker announces every incoming CONNECT to
    its plugin manager before it looks at the id; a CONNECT with a bad login is renamed there to
    a fresh random id, so its refusal has no side effect on anyone else.
    """
    logins = {user: [password, role] for user, (password, role) in broker_logins(secret).items()}
    manager = broker.plugins_manager
    fire_event = manager.fire_event

    async def fire_event_guarded(event_name: Any, *, wait: bool = False, **kwargs: Any) -> None:
        packet = kwargs.get("packet")
        if event_name == MQTTEvents.PACKET_RECEIVED and isinstance(packet, ConnectPacket) \
                and packet.payload is not None and _check(logins, packet.username, packet.password) is None:
            packet.client_id = f"refused-{secrets.token_hex(8)}"
            packet.clean_session_flag = True
        await fire_event(event_name, wait=wait, **kwargs)

    manager.fire_event = fire_event_guarded
