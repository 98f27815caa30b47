"""Sealed values: a secret encrypted with age to the devices that may read it.

A ``file`` or ``setting`` resource may carry a sealed value in place of its content or
value. On the wire (inside a bundle's resource map) it is a map::

    {"age": "-----BEGIN AGE ENCRYPTED FILE-----\\n...\\n-----END AGE ENCRYPTED FILE-----\\n",
     "recipients": ["<key id>", ...]}

``age`` is an age v1 file (https://age-encryption.org/v1) in its ASCII armour, encrypted to
the X25519 recipients (``age1...``) of the devices that may read it. ``recipients`` names
them by key id, the lowercase hex SHA-256 of the recipient's text (``age1...``, ASCII),
sorted: advisory only (what decides is whether a device's identity opens the file), so that
``setpoint validate`` can tell that a group's value was not sealed for one of its devices
without decrypting anything.

Nothing but the intended device ever holds the plaintext. What a device reports about a
sealed resource is derived from the ciphertext (:meth:`Sealed.digest`), never from the
plaintext: a short secret's unkeyed hash could be brute-forced.

This module describes the format; it never encrypts or decrypts (the controller's side
and the shim do, with an age library). Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from .errors import SchemaError

ARMOR_BEGIN: Final = "-----BEGIN AGE ENCRYPTED FILE-----"
ARMOR_END: Final = "-----END AGE ENCRYPTED FILE-----"
# A sealed file may hold up to 512 KiB of plaintext; armour adds a third, age a little.
MAX_ARMOR_BYTES: Final = 768 * 1024
MAX_RECIPIENTS: Final = 10_000
# An age X25519 recipient: Bech32, human-readable part "age", 32 bytes of data (52
# characters) and a 6-character checksum; lowercase only.
_RECIPIENT: Final = re.compile(r"age1[02-9ac-hj-np-z]{58}")
_KEYID: Final = re.compile(r"[0-9a-f]{64}")
_ARMOR_LINE: Final = re.compile(r"[A-Za-z0-9+/=]{1,64}")


@dataclass(frozen=True, slots=True)
class Sealed:
    """An age-encrypted value and the key ids of the recipients it was sealed for."""

    armor: str
    recipients: tuple[str, ...] = ()

    def digest(self) -> str:
        """The ciphertext's digest: what a device reports, what drift compares."""
        return hashlib.sha256(self.armor.encode("ascii")).hexdigest()

    def sealed_for(self, keyid: str) -> bool:
        return keyid in self.recipients

    def to_map(self) -> dict[str, Any]:
        return {"age": self.armor, "recipients": list(self.recipients)}


def recipient_keyid(recipient: str) -> str:
    """The key id of an ``age1...`` recipient: lowercase hex SHA-256 of its text."""
    return hashlib.sha256(check_recipient(recipient).encode("ascii")).hexdigest()


def check_recipient(recipient: object, where: str = "recipient") -> str:
    """An age X25519 recipient's syntax (``age1`` and 58 Bech32 characters)."""
    if not isinstance(recipient, str) or _RECIPIENT.fullmatch(recipient) is None:
        shown = recipient[:80] if isinstance(recipient, str) else type(recipient).__name__
        raise SchemaError(
            f"{where}: {shown!r} is not an age X25519 recipient ('age1' and 58 lowercase"
            " Bech32 characters, as printed by `setpoint shim keygen`)"
        )
    return recipient


def check_armor(armor: object, where: str = "sealed") -> str:
    """The shape of an age ASCII armour (the age library checks the rest when decrypting)."""
    if not isinstance(armor, str):
        raise SchemaError(f"{where}: 'age' must be the ASCII-armoured age file (text)")
    if len(armor) > MAX_ARMOR_BYTES:
        raise SchemaError(f"{where}: 'age' is over {MAX_ARMOR_BYTES} bytes")
    lines = armor.strip().split("\n")
    if len(lines) < 3 or lines[0].strip() != ARMOR_BEGIN or lines[-1].strip() != ARMOR_END:
        raise SchemaError(
            f"{where}: 'age' must start with {ARMOR_BEGIN!r} and end with {ARMOR_END!r}"
            " (seal it with `setpoint secrets seal`)"
        )
    if not all(_ARMOR_LINE.fullmatch(line.strip()) for line in lines[1:-1]):
        raise SchemaError(f"{where}: 'age' has a line that is not Base64 armour")
    return armor


def normal_armor(armor: str) -> str:
    """The armour as sealed: lines without surrounding blanks, one final newline."""
    return "\n".join(line.strip() for line in armor.strip().split("\n")) + "\n"


def keyids(recipients: Iterable[str]) -> tuple[str, ...]:
    """Sorted, unique key ids of ``recipients``."""
    return tuple(sorted({recipient_keyid(r) for r in recipients}))


def from_map(raw: object, where: str) -> Sealed:
    """Decode and check a sealed value from a bundle's resource map."""
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: 'sealed' must be a map with 'age' and 'recipients'")
    extra = set(raw) - {"age", "recipients"}
    if extra:
        raise SchemaError(f"{where}: 'sealed' has unknown field(s) {sorted(extra)}")
    armor = check_armor(raw.get("age"), where)
    recipients = raw.get("recipients")
    if not isinstance(recipients, list) or len(recipients) > MAX_RECIPIENTS:
        raise SchemaError(f"{where}: 'sealed.recipients' must be a list of key ids")
    for keyid in recipients:
        if not isinstance(keyid, str) or _KEYID.fullmatch(keyid) is None:
            raise SchemaError(
                f"{where}: 'sealed.recipients' holds {str(keyid)[:80]!r}, not a key id"
                " (64 lowercase hex digits)"
            )
    return Sealed(armor, tuple(recipients))
