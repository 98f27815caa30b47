"""The fleet signing key: loading it carefully, and signing bundles and commands with it.

Every signed message the controller emits goes through its one :class:`Signer`.

The key file is read once at start. If its permissions let the group or others read it, a
loud warning is logged (the file is still used: refusing would take a fleet down over a
chmod, but it must not go unnoticed). Key material never appears in a log line or an error.

Reads one file; otherwise pure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from setpoint.proto import bundles, commands, envelopes, leader
from setpoint.proto.bundles import Bundle
from setpoint.proto.commands import Command
from setpoint.proto.errors import SchemaError
from setpoint.proto.leader import LeaderRecord
from setpoint.proto.trust import PAYLOAD_TYPES

from .errors import ConfigError

log = logging.getLogger(__name__)
MAX_KEY_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed bundle: the envelope bytes to publish and their digest (for the audit)."""

    bundle: Bundle
    envelope: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.envelope).hexdigest()


class Signer:
    """Signs bundles with the fleet key (or keys); knows the public keys for verifying.

    More than one key is the overlap period of a key rotation (docs/security.md): every
    envelope carries one signature per key, so devices that trust only the old key and
    devices that already trust only the new one both accept it.
    """

    def __init__(self, key: Ed25519PrivateKey, *more: Ed25519PrivateKey) -> None:
        self._keys = (key, *more)
        self.public_key: Ed25519PublicKey = key.public_key()
        self.key_id = envelopes.key_id(self.public_key)
        self.key_ids = tuple(envelopes.key_id(k) for k in self._keys)
        if len(set(self.key_ids)) != len(self.key_ids):
            raise ConfigError("the same signing key is given twice")
        self.trusted = envelopes.trusted_keys([k.public_key() for k in self._keys])

    def __repr__(self) -> str:
        return f"Signer(key_ids={[k[:12] for k in self.key_ids]})"

    def sign(self, bundle: Bundle) -> Signed:
        payload = bundles.encode(bundle)
        return Signed(bundle, envelopes.sign(PAYLOAD_TYPES[bundle.kind], payload, self._keys))

    def sign_command(self, command: Command) -> bytes:
        """The envelope of a device command, signed with every key like a bundle (a device
        with ``threshold: 2``, or one that trusts only the new key mid-rotation, accepts it)."""
        return commands.sign(command, list(self._keys))

    def sign_leader(self, record: LeaderRecord, payload_type: str | None = None) -> bytes:
        """The envelope of a controller replica's leader record (``proto.leader``), or of
        a record of its form: a shard lease or a membership record (``payload_type``)."""
        return leader.sign(record, list(self._keys), payload_type or envelopes.LEADER_TYPE)


def load_signer(path: Path, *more: Path) -> Signer:
    """Load the signing key at ``path`` (and ``more`` keys to sign with as well)."""
    return Signer(*(_load_key(p) for p in (path, *more)))


def _load_key(path: Path) -> Ed25519PrivateKey:
    """Load the PEM PKCS#8 Ed25519 key at ``path``; warn if others can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"signing key {path} does not exist; create one with"
            f" `setpoint keys generate --out {path.parent}`"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot open signing key {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"signing key {path} is not a regular file")
        if info.st_mode & 0o077:
            log.warning(
                "WARNING: signing key %s has mode %04o: group or others can read the fleet's"
                " signing key; run `chmod 600 %s`",
                path,
                stat.S_IMODE(info.st_mode),
                path,
            )
        data = fh.read(MAX_KEY_BYTES + 1)
    if len(data) > MAX_KEY_BYTES:
        raise ConfigError(f"signing key {path} is too large to be a PEM Ed25519 key")
    try:
        key = envelopes.load_private_key(data)
    except SchemaError as exc:
        raise ConfigError(f"signing key {path}: {exc}") from None
    return key
