"""The embedded broker's access control, as amqtt plugins: logins, topic rules, session guard.

The rule itself (which logins exist, what each role may do) is pure and lives in
:mod:`meshllm.mesh.access`; this module only plugs it into amqtt 0.12 and must not
decide anything on its own. :class:`~meshllm.mesh.broker.EmbeddedBroker` loads it
only when the mesh has a secret.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.events import MQTTEvents
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from meshllm.mesh.access import NODE_USER, TOKEN_PREFIX, Role, broker_logins, permitted, token_nonce

log = logging.getLogger(__name__)

_ACTIONS: dict[Action, Any] = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "receive"}


class Logins:
    """Which CONNECTs the embedded broker accepts, and as which role (pure, apart from the nonces it remembers).

    Apps present the app login (static: an app is any MQTT client). Nodes present a one-time token bound to
    this broker's ``epoch`` (:func:`meshllm.mesh.access.node_token`); a standalone ``meshllm broker``, which
    nodes reach by a configured URL and never through mDNS, also takes the static node login.
    """

    MAX_NONCES = 65536

    def __init__(self, secret: str, epoch: str, *, static_node_login: bool) -> None:
        self.secret, self.epoch = secret, epoch
        self.static = {user: (password, role) for user, (password, role) in broker_logins(secret).items()
                       if role == "app" or static_node_login}
        self._used: set[str] = set()
        self._order: deque[str] = deque()

    def check(self, username: str | None, password: str | None, *, consume: bool) -> Role | None:
        user, pw = username or "", password or ""
        if user == NODE_USER and pw.startswith(TOKEN_PREFIX):
            nonce = token_nonce(self.secret, self.epoch, pw)
            if nonce is None or nonce in self._used:
                return None
            if consume:
                self._used.add(nonce)
                self._order.append(nonce)
                if len(self._order) > self.MAX_NONCES:
                    self._used.discard(self._order.popleft())
            return "node"
        login = self.static.get(user)
        if login is None or not hmac.compare_digest(pw.encode(), login[0].encode()):
            return None
        return login[1]


def plugins_config(logins: Logins) -> dict[str, Any]:
    """The ``plugins`` section of an amqtt config that enforces the mesh's logins and topic rule."""
    return {f"{__name__}.LoginPlugin": {"logins": logins}, f"{__name__}.TopicPlugin": {}}


class LoginPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accepts exactly the mesh's logins (:class:`Logins`): no anonymous clients, no unknown users, no
    token used twice, no will message on a topic the client may not write."""

    @dataclass
    class Config:
        logins: Any = None  # a Logins

    async def authenticate(self, *, session: Session) -> bool:
        role = self.config.logins.check(session.username, session.password, consume=True)
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


def guard_sessions(broker: Broker, logins: Logins) -> None:
    """Keeps a client that fails to log in away from the session of the client id it claims.

    amqtt 0.12 acts on a CONNECT's client id before authenticating it: it deletes the existing
    session of that id (its subscriptions) for a clean session, or takes over its connection
    otherwise. Node ids are public, so anyone could silently unsubscribe or disconnect a node by
    connecting with its id and a wrong password. The broker announces every incoming CONNECT to
    its plugin manager before it looks at the id; a CONNECT with a bad login is renamed there to
    a fresh random id, so its refusal has no side effect on anyone else.
    """
    manager = broker.plugins_manager
    fire_event = manager.fire_event

    async def fire_event_guarded(event_name: Any, *, wait: bool = False, **kwargs: Any) -> None:
        packet = kwargs.get("packet")
        if event_name == MQTTEvents.PACKET_RECEIVED and isinstance(packet, ConnectPacket) \
                and packet.payload is not None \
                and logins.check(packet.username, packet.password, consume=False) is None:
            packet.client_id = f"refused-{secrets.token_hex(8)}"
            packet.clean_session_flag = True
        await fire_event(event_name, wait=wait, **kwargs)

    manager.fire_event = fire_event_guarded


def confine_retained(broker: Broker) -> None:
    """Retained messages reach a client only through its own subscriptions, and only where it may receive.

    amqtt 0.12.1 sends a client that connects the retained messages matching *every* subscription on the
    broker, anyone's, without asking the topic plugins: an app subscribed only to its replies was handed
    the nodes' retained journal (prompts included). This replaces that step with the MQTT rule: a retained
    message goes to a session for the filters that session holds, once the topic rule lets it receive it.
    """
    subscriptions = broker._subscriptions

    async def publish_retained(subscription: tuple[str, int], session: Session) -> None:
        topic_filter, qos = subscription
        if not any(s is session for s, _ in subscriptions.get(topic_filter, ())):
            return  # another client's filter: nothing of this session's
        handler = broker._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(broker.retained_messages.items()):
            if broker._matches(topic, topic_filter) and await broker._topic_filtering(session, topic, Action.RECEIVE):
                tasks.append(asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    broker._publish_retained_messages_for_subscription = publish_retained


def refuse_app_retain(broker: Broker) -> None:
    """Apps cannot leave retained messages: a retained request or cancel would be served again by every
    planner that subscribes later. The live message is still delivered; only its retention is refused."""
    retain_message = broker.retain_message

    async def retain_unless_app(source_session: Session | None, topic_name: str, data: bytes | bytearray,
                                qos: int | None = None) -> None:
        if getattr(source_session, "meshllm_role", None) == "app":
            log.info("broker: client %r (app) may not retain on %r", source_session.client_id, topic_name)
            return
        await retain_message(source_session, topic_name, data, qos)

    broker.retain_message = retain_unless_app
