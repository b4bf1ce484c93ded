"""Who may use a mesh's broker and what each may do there, when the mesh has a secret.

The mesh secret (``--secret-file`` / ``MESHLLM_SECRET``) is turned into:

- **two broker logins**: ``meshllm-node`` (what every node presents) and
  ``meshllm-app`` (what an operator hands to apps: ``meshllm credentials``).
  Each password is an HMAC of the secret under its own label, so an app's
  password reveals neither the secret nor the node password;
- **the topic rule** the embedded broker enforces (:func:`permitted`): nodes
  may do anything; apps may publish only ``requests``, ``cancel`` and ``replay``, and
  subscribe only to ``replies/#`` and to the read-only mesh state (``members``,
  ``planner``, ``plan``, ``ready``, ``stats``);
- **a signature on mDNS records** (:func:`record_signature`), so that nodes
  only follow peers and hosted brokers that hold the secret.

Everything here is pure: values in, values out. The amqtt glue lives in
:mod:`meshllm.mesh.broker`, the mDNS glue in :mod:`meshllm.mesh.discovery`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal
from urllib.parse import quote

from meshllm.mesh.topics import PROTOCOL_VERSION
from meshllm.secret import subkey

NODE_USER = "meshllm-node"
APP_USER = "meshllm-app"

Role = Literal["node", "app"]
Action = Literal["publish", "subscribe", "receive"]

_ROOT = f"meshllm/v{PROTOCOL_VERSION}/+"  # any mesh: a broker serves the meshes whose nodes share one secret
_APP_PUBLISH = (f"{_ROOT}/requests", f"{_ROOT}/cancel", f"{_ROOT}/replay")
_APP_READ = (f"{_ROOT}/replies/#", f"{_ROOT}/members/+", f"{_ROOT}/planner", f"{_ROOT}/plan", f"{_ROOT}/ready/+",
             f"{_ROOT}/stats/+")


def _derive(secret: str, label: bytes) -> str:
    return hmac.new(subkey(secret, "broker"), b"meshllm-broker-v2\x00" + label, hashlib.sha256).hexdigest()


def node_login(secret: str) -> tuple[str, str]:
    """The username and password every node presents to the broker."""
    return NODE_USER, _derive(secret, b"node")


def app_login(secret: str) -> tuple[str, str]:
    """The username and password for apps (``meshllm ask``, the gateway, your MQTT clients)."""
    return APP_USER, _derive(secret, b"app")


# --- one-time node logins for a broker a node hosts ---------------------------------

TOKEN_PREFIX = "t1."


def node_token(secret: str, epoch: str) -> str:
    """A node password good once, and only at the embedded broker of ``epoch`` (a random value each broker
    draws when it starts). A node sends it only to a broker whose host proved, over the data plane, that
    it runs that very broker (:func:`broker_proof`): a rogue broker reached through a replayed mDNS record
    learns nothing it can use, and a password seen on the wire cannot be used again."""
    nonce = secrets.token_hex(12)
    return f"{TOKEN_PREFIX}{epoch}.{nonce}.{_token_mac(secret, epoch, nonce)}"


def _token_mac(secret: str, epoch: str, nonce: str) -> str:
    msg = b"meshllm-node-token-v1\x00" + epoch.encode() + b"\x00" + nonce.encode()
    return hmac.new(subkey(secret, "broker"), msg, hashlib.sha256).hexdigest()[:40]


def token_nonce(secret: str, epoch: str, token: str) -> str | None:
    """The token's nonce if ``token`` is a valid node token for the broker of ``epoch`` (the caller refuses a
    nonce it has seen), else None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    parts = token[len(TOKEN_PREFIX):].split(".")
    if len(parts) != 3 or parts[0] != epoch:
        return None
    _, nonce, mac = parts
    return nonce if hmac.compare_digest(_token_mac(secret, epoch, nonce), mac) else None


def broker_proof(key: bytes, asker_nonce: bytes, url: str, epoch: str) -> bytes:
    """What a node that hosts a broker answers to a peer's fresh ``asker_nonce`` over the data plane: a MAC
    binding the broker's URL and epoch to this very question (no replay, no tampering on the way)."""
    msg = b"meshllm-broker-proof-v1\x00" + asker_nonce + url.encode() + b"\x00" + epoch.encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def broker_logins(secret: str) -> dict[str, tuple[str, Role]]:
    """username -> (password, role): what the embedded broker accepts."""
    (nu, npw), (au, apw) = node_login(secret), app_login(secret)
    return {nu: (npw, "node"), au: (apw, "app")}


def parse_login(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` (as ``meshllm credentials`` prints it) -> (user, password)."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user:
        raise ValueError("a broker login is USER:PASSWORD")
    return user, password


def with_login(url: str, login: tuple[str, str] | None) -> str:
    """``url`` with ``login`` as its user and password, unless it already names a user (or there is no login)."""
    if login is None:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "mqtt", url
    if "@" in rest.split("/", 1)[0]:
        return url
    user, password = login
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"


# --- the topic rule -----------------------------------------------------------


def _covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic that ``topic_filter`` matches also matches ``pattern`` (both MQTT filters)."""
    p, f = pattern.split("/"), topic_filter.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(f):
            return False
        if f[i] == "#":
            return False  # the filter reaches deeper (or wider) than a single level of the pattern
        if level != "+" and level != f[i]:
            return False
    return len(f) == len(p)


def permitted(role: Role | None, action: Action, topic: str) -> bool:
    """Whether a client of ``role`` (None: not logged in) may publish to / subscribe to / receive ``topic``.

    For ``subscribe``, ``topic`` is a filter and must be covered by an allowed one:
    an app's ``meshllm/v1/+/#`` is refused even though it includes ``replies/#``.
    """
    if role == "node":
        return True
    if role != "app" or topic.startswith("$"):
        return False
    allowed = _APP_PUBLISH if action == "publish" else _APP_READ
    return any(_covers(p, topic) for p in allowed)


# --- mDNS ------------------------------------------------------------------------


def record_signature(secret_key_bytes: bytes, fields: list[str]) -> str:
    """The ``sig`` TXT value of an mDNS record: an HMAC over its fields (id, mesh, address, port, broker...)."""
    msg = b"meshllm-mdns-v1\x00" + "\x00".join(fields).encode()
    return hmac.new(secret_key_bytes, msg, hashlib.sha256).hexdigest()[:32]


def signature_ok(secret_key_bytes: bytes, fields: list[str], sig: str | None) -> bool:
    return sig is not None and hmac.compare_digest(record_signature(secret_key_bytes, fields), sig)
