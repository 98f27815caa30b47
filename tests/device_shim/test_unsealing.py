"""The device's age identity, opening sealed values, the keyed MAC and its ledger (real age)."""

from __future__ import annotations

import stat
from pathlib import Path

import pyrage
import pytest

from setpoint.device_shim import unsealing
from setpoint.device_shim.unsealing import Unsealer
from setpoint.proto import sealed
from setpoint.proto.errors import NotARecipient, SealedInvalid
from setpoint.proto.sealed import Sealed


def seal(plaintext: bytes, *recipients: str, listed: tuple[str, ...] | None = None) -> Sealed:
    parsed = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    armor = sealed.normal_armor(pyrage.encrypt(plaintext, parsed, armored=True).decode())
    return Sealed(armor, sealed.keyids(listed if listed is not None else recipients))


def test_generate_keeps_an_existing_identity(tmp_path: Path) -> None:
    recipient, created = unsealing.generate(tmp_path / "state")
    again, created_again = unsealing.generate(tmp_path / "state")
    assert (created, created_again, again) == (True, False, recipient)
    assert stat.S_IMODE((tmp_path / "state" / unsealing.IDENTITY_FILE).stat().st_mode) == 0o600


def test_open_gives_the_plaintext_to_a_recipient(tmp_path: Path) -> None:
    recipient, _ = unsealing.generate(tmp_path)
    assert Unsealer(tmp_path).open(seal(b"s3cret", recipient), "token") == b"s3cret"


def test_a_value_for_someone_else_is_not_a_recipient(tmp_path: Path) -> None:
    unsealing.generate(tmp_path)
    other = str(pyrage.x25519.Identity.generate().to_public())
    with pytest.raises(NotARecipient, match="not sealed for this device") as caught:
        Unsealer(tmp_path).open(seal(b"s", other), "token")
    assert caught.value.resource_id == "token"


def test_a_changed_header_of_a_value_sealed_for_this_device_is_invalid(tmp_path: Path) -> None:
    recipient, _ = unsealing.generate(tmp_path)
    other = str(pyrage.x25519.Identity.generate().to_public())
    # Sealed for someone else, but claiming (in its key ids) to be sealed for this device.
    forged = seal(b"s", other, listed=(recipient,))
    with pytest.raises(SealedInvalid, match="does not decrypt"):
        Unsealer(tmp_path).open(forged, "token")


def test_no_identity_says_how_to_make_one(tmp_path: Path) -> None:
    other = str(pyrage.x25519.Identity.generate().to_public())
    with pytest.raises(NotARecipient, match="setpoint shim keygen --state-dir"):
        Unsealer(tmp_path).open(seal(b"s", other))


def test_the_mac_needs_the_local_key_and_the_ledger_keeps_only_what_is_desired(
    tmp_path: Path,
) -> None:
    unsealer = Unsealer(tmp_path)
    (tmp_path / "other").mkdir()
    assert unsealer.mac(b"x") == ""  # no key before the first sealed apply
    mac = unsealer.mac_new(b"x")
    assert len(mac) == 64 and unsealer.mac(b"x") == mac != Unsealer(tmp_path / "other").mac_new(
        b"x"
    )
    assert stat.S_IMODE((tmp_path / unsealing.MAC_KEY_FILE).stat().st_mode) == 0o600
    unsealer.record({"d1": mac, "d2": mac}, keep={"d1", "d2"})
    unsealer.record({}, keep={"d2"})
    assert Unsealer(tmp_path).ledger() == {"d2": mac}
