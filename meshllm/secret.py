"""The mesh secret: where it comes from, what makes it acceptable, and the keys stretched from it.

A mesh is closed by default: every node, the embedded broker and every app
login derive their keys from one secret that its owner creates once (the
first ``meshllm node`` of a mesh makes one and stores it) and hands to each new
device as an **invite token** (``meshllm invite`` prints it, ``meshllm node
--join TOKEN`` takes it). A mesh without a secret exists only when its owner
says ``--open``.

Keys are stretched with scrypt (memory-hard, 32 MiB, ~0.1 s on a laptop, once
per process): every node multicasts an HMAC made with them (the signed mDNS
record), so a guessable secret must not be cheap to test offline. Secrets
shorter than :data:`MIN_SECRET_CHARS` are refused; generated ones carry 192 bits.

This module is pure apart from reading and writing the secret files; it must
not know about brokers, sockets or nodes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from meshllm.errors import SecretError

MIN_SECRET_CHARS = 16
SECRET_ENV = "MESHLLM_SECRET"
INVITE_PREFIX = "meshllm-invite"
# scrypt cost: N=2^15, r=8 -> 32 MiB and ~0.1 s per derivation (the OWASP interactive setting)
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 15, 8, 1
_SALT = b"meshllm-mesh-secret-v2"
_MESH_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


def check_secret(secret: str, source: str = "the mesh secret") -> str:
    """``secret`` stripped, or a :class:`SecretError` saying why it is not acceptable."""
    text = secret.strip()
    if not text:
        raise SecretError(f"{source} is empty: a mesh secret must have at least {MIN_SECRET_CHARS} characters "
                          "(`meshllm node` creates one for a new mesh; `--open` runs a mesh without one)")
    if len(text) < MIN_SECRET_CHARS:
        raise SecretError(f"{source} has {len(text)} characters; a mesh secret needs at least {MIN_SECRET_CHARS} "
                          "(a short one is guessed offline from any node's signed mDNS record)")
    return text


@functools.lru_cache(maxsize=16)
def root_key(secret: str) -> bytes:
    """The 32-byte key every other key of the mesh is derived from (scrypt of the secret)."""
    return hashlib.scrypt(secret.encode(), salt=_SALT, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                          maxmem=64 << 20, dklen=32)


def subkey(secret: str, label: str) -> bytes:
    """A key for one purpose (``dataplane``, ``broker``, ``journal``...), independent of the others."""
    return hmac.new(root_key(secret), b"meshllm-subkey-v2\x00" + label.encode(), hashlib.sha256).digest()


def generate_secret() -> str:
    """A fresh secret: 32 URL-safe characters, 192 random bits."""
    return secrets.token_urlsafe(24)


# --- where a secret comes from -------------------------------------------------


def read_secret_file(path: str | Path) -> str:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SecretError(f"secret file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cannot read secret file {p}: {e}") from None
    return check_secret(text, f"secret file {p}")


def config_dir() -> Path:
    """Where this device keeps the secrets of the meshes it belongs to (``$MESHLLM_HOME`` overrides)."""
    if os.environ.get("MESHLLM_HOME"):
        return Path(os.environ["MESHLLM_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshllm"


def stored_secret_path(mesh: str) -> Path:
    if not _MESH_NAME.match(mesh):
        raise SecretError(f"mesh name {mesh!r}: use 1-64 letters, digits, '_', '.', '-'")
    return config_dir() / f"{mesh}.secret"


def load_stored_secret(mesh: str) -> str | None:
    path = stored_secret_path(mesh)
    return read_secret_file(path) if path.exists() else None


def store_secret(mesh: str, secret: str) -> Path:
    """Writes the mesh's secret for this device, readable by its owner only."""
    path = stored_secret_path(mesh)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(check_secret(secret) + "\n")
    return path


# --- invites --------------------------------------------------------------------


def invite_token(mesh: str, secret: str) -> str:
    """What a new device needs to join: the mesh name and its secret, in one pasteable word."""
    return f"{INVITE_PREFIX}:{mesh}:{secret}"


def parse_invite(token: str) -> tuple[str, str]:
    """(mesh, secret) from an invite token."""
    prefix, sep, rest = token.strip().partition(":")
    mesh, sep2, secret = rest.partition(":")
    if prefix != INVITE_PREFIX or not sep or not sep2 or not _MESH_NAME.match(mesh):
        raise SecretError(f"not an invite token (expected {INVITE_PREFIX}:MESH:SECRET, as `meshllm invite` prints)")
    return mesh, check_secret(secret, "the invite's secret")


# --- sealing records that only nodes may read ------------------------------------


class Sealer:
    """Authenticated encryption (ChaCha20-Poly1305) of records that rest on the broker for nodes only.

    The journal keeps prompts on the broker so that any node can resume a request; the broker's topic
    rules keep apps away from it, but a broker that slips (amqtt once sent retained messages across
    subscriptions) or a mis-written ACL must not hand prompts out. Sealed records are unreadable and
    unforgeable without the mesh secret; ``aad`` binds a record to its topic, so one cannot be moved to
    another request's. ChaCha20 because boards without AES instructions (Raspberry Pi) run it fast.
    """

    PREFIX = "sealed1:"

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._aead = ChaCha20Poly1305(key)

    @classmethod
    def for_secret(cls, secret: str | None, purpose: str) -> Sealer | None:
        return cls(subkey(secret, purpose)) if secret is not None else None

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        import base64

        nonce = os.urandom(12)
        return self.PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, aad)).decode()

    def open(self, sealed: bytes | str, aad: bytes) -> bytes:
        """The plaintext, or :class:`SecretError` if the record is not sealed, or not by this mesh for ``aad``."""
        import base64
        import binascii

        from cryptography.exceptions import InvalidTag

        text = sealed.decode("ascii", "replace") if isinstance(sealed, (bytes, bytearray)) else sealed
        if not text.startswith(self.PREFIX):
            raise SecretError("record is not sealed (written without the mesh secret)")
        try:
            raw = base64.b64decode(text[len(self.PREFIX):], validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], aad)
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretError("record is not sealed with this mesh's secret") from None
