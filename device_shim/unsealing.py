"""Unsealing: the device's age identity, opening sealed values at apply, and the keyed MAC.

Three files in the state directory, each 0600 and never sent anywhere:

* ``age-identity``: the device's X25519 identity in age's own format (comment lines with
  the creation time and the public key, then ``AGE-SECRET-KEY-1...``), made on the device
  by :func:`generate` (``setpoint shim keygen``); its public part, the recipient
  ``age1...``, is what the operator commits as ``recipient:`` in the device's file;
* ``sealed-mac.key``: 32 random bytes, the key of the MAC below (made at the first apply
  of a sealed value);
* ``sealed.json``: the ledger: for each ciphertext this device opened (by its digest), the
  HMAC-SHA256 of the plaintext it wrote.

:meth:`Unsealer.open` decrypts a :class:`~setpoint.proto.sealed.Sealed` value; it is the
only place that imports ``pyrage``, on first use, so a device whose bundles carry no sealed
value never loads it. It raises :class:`~setpoint.proto.errors.NotARecipient` (not sealed
for this identity, or no identity) or :class:`~setpoint.proto.errors.SealedInvalid` (the
ciphertext does not decrypt: tampered or truncated).

Drift on a sealed resource is seen without the plaintext: the observer computes
:meth:`Unsealer.mac` of what is on disk and the planner compares it with the ledger. A MAC
under a key that never leaves the device says nothing about a short secret to anyone who
reads the state directory's neighbours, the reports or the logs; an unkeyed hash would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from setpoint.proto import sealed
from setpoint.proto.errors import NotARecipient, SchemaError, SealedInvalid
from setpoint.proto.sealed import Sealed

from .errors import ConfigError
from .state import atomic_write

IDENTITY_FILE: Final = "age-identity"
MAC_KEY_FILE: Final = "sealed-mac.key"
LEDGER_FILE: Final = "sealed.json"
_SECRET_PREFIX: Final = "AGE-SECRET-KEY-1"
_PUBLIC_PREFIX: Final = "# public key: "


def _recipient_of(text: str, path: Path) -> str:
    for line in text.splitlines():
        if line.startswith(_PUBLIC_PREFIX):
            try:
                return sealed.check_recipient(line.removeprefix(_PUBLIC_PREFIX).strip())
            except SchemaError:
                break
    raise ConfigError(f"{path}: no '# public key: age1...' line; is it an age identity file?")


def generate(state_dir: Path) -> tuple[str, bool]:
    """Make the device's identity in ``state_dir`` unless one exists; its recipient, and
    whether it was created now (an existing identity is kept: losing it loses every secret
    sealed for it)."""
    import pyrage

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / IDENTITY_FILE
    if path.exists():
        return _recipient_of(path.read_text(encoding="ascii"), path), False
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = f"# created: {stamp}\n{_PUBLIC_PREFIX}{recipient}\n{identity}\n"
    # O_EXCL and 0600 from the first byte: never readable by anyone else, never replaced.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return recipient, True


class Unsealer:
    """Opens sealed values with the identity in ``state_dir``; keeps the MAC key and ledger."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self._identity: Any = None
        self._keyid: str | None = None
        self._mac_key: bytes | None = None
        self._ledger: dict[str, str] | None = None

    # Decrypting.

    def _load_identity(self, resource_id: str | None) -> Any:
        if self._identity is not None:
            return self._identity
        import pyrage  # only here: a device without sealed values never loads it

        path = self.dir / IDENTITY_FILE
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise NotARecipient(
                f"this device has no age identity ({path}): run `setpoint shim keygen"
                f" --state-dir {self.dir}` and commit the printed recipient in its file",
                resource_id,
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise NotARecipient(f"cannot read the age identity {path}: {exc}", resource_id) from exc
        keys = [line.strip() for line in text.splitlines() if line.startswith(_SECRET_PREFIX)]
        try:
            self._identity = pyrage.x25519.Identity.from_str(keys[0])
        except (IndexError, pyrage.IdentityError):
            raise NotARecipient(
                f"{path} holds no valid age identity (AGE-SECRET-KEY-1...)", resource_id
            ) from None
        self._keyid = sealed.recipient_keyid(str(self._identity.to_public()))
        return self._identity

    def open(self, value: Sealed, resource_id: str | None = None) -> bytes:
        """The plaintext of ``value``; never logged, never kept."""
        import pyrage

        identity = self._load_identity(resource_id)
        try:
            return bytes(pyrage.decrypt(value.armor.encode("ascii"), [identity]))
        except pyrage.DecryptError as exc:
            # Sealed for this identity (by the key ids beside it) yet not opening: the
            # ciphertext was changed. Otherwise this device is simply not a recipient.
            if self._keyid not in value.recipients:
                raise NotARecipient(
                    f"not sealed for this device (its recipient's key id is"
                    f" {self._keyid}); reseal the value with this device among its recipients",
                    resource_id,
                ) from None
            raise SealedInvalid(
                f"the sealed value does not decrypt ({exc}): tampered or truncated; seal it again",
                resource_id,
            ) from None

    # The keyed MAC and the ledger.

    def _key(self, *, create: bool) -> bytes | None:
        if self._mac_key is not None:
            return self._mac_key
        path = self.dir / MAC_KEY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
            data = secrets.token_bytes(32)
            atomic_write(path, data, mode=0o600)
        if len(data) != 32:
            raise ConfigError(f"{path} is not a 32-byte key; remove it to make a new one")
        self._mac_key = data
        return data

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` under the device-local key ("" before the first apply)."""
        key = self._key(create=False)
        return "" if key is None else hmac.new(key, data, hashlib.sha256).hexdigest()

    def mac_new(self, data: bytes) -> str:
        """The same MAC, making the key if this is the first sealed value applied here."""
        key = self._key(create=True)
        assert key is not None
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    def ledger(self) -> Mapping[str, str]:
        """Ciphertext digest -> MAC of the plaintext written for it."""
        if self._ledger is None:
            try:
                raw = json.loads((self.dir / LEDGER_FILE).read_bytes())
            except (OSError, ValueError):
                raw = {}
            ok = isinstance(raw, dict)
            self._ledger = {k: v for k, v in (raw.items() if ok else ()) if isinstance(v, str)}
        return self._ledger

    def record(self, macs: Mapping[str, str], keep: set[str]) -> None:
        """Add ``macs`` to the ledger and keep only the digests in ``keep``."""
        current = dict(self.ledger())
        merged = {k: v for k, v in {**current, **macs}.items() if k in keep}
        if merged != current:
            atomic_write(
                self.dir / LEDGER_FILE, json.dumps(merged, sort_keys=True).encode(), mode=0o600
            )
            self._ledger = merged


def setting_bytes(value: str) -> bytes:
    """What the MAC of a sealed setting covers: its JSON text, as the settings file holds it."""
    return json.dumps(value).encode("utf-8")
