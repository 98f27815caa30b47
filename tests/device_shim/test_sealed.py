"""Sealed values on a real shim against a real mosquitto: opened only at apply, written with
the resource's mode, watched with a keyed MAC, refused (changing nothing) when this device
cannot open them."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pyrage
import pytest
from shimkit import Fleet, Shims, on_versions, snapshot, statuses

from setpoint.device_shim import unsealing
from setpoint.proto import bundles, reports, sealed
from setpoint.proto.bundles import FileResource, SettingResource
from setpoint.proto.sealed import Sealed

pytestmark = pytest.mark.broker

SECRET = b"correct horse battery staple\n"
MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)


def keygen(shims: Shims, device: str) -> str:
    recipient, created = unsealing.generate(shims.config(device).state_path)
    assert created
    return recipient


def seal_to(plaintext: bytes, *recipients: str) -> Sealed:
    parsed = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    armor = pyrage.encrypt(plaintext, parsed, armored=True).decode()
    return Sealed(sealed.normal_armor(armor), sealed.keyids(recipients))


def flip_in_payload(armor: str) -> str:
    """The armor with one base64 character of the encrypted payload changed: 20 characters
    from the end of the body, inside the payload whatever the length of the header (rage
    adds grease stanzas of random length, so the last line's length varies)."""
    lines = armor.split("\n")
    begin = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN"))
    end = next(i for i, line in enumerate(lines) if line.startswith("-----END"))
    body = "".join(lines[begin + 1 : end])
    at = len(body.rstrip("=")) - 20
    body = body[:at] + ("A" if body[at] != "A" else "B") + body[at + 1 :]
    wrapped = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([*lines[: begin + 1], *wrapped, *lines[end:]])


def sealed_file(value: Sealed, mode: int = 0o600) -> FileResource:
    return FileResource("token", "etc/token", b"", mode, value)


def leaks(data: bytes, plaintext: bytes = SECRET) -> list[str]:
    """What of the plaintext, or of its unkeyed SHA-256, ``data`` contains."""
    found = []
    for name, needle in (
        ("plaintext", plaintext.strip()),
        ("sha256", hashlib.sha256(plaintext).hexdigest().encode()),
        ("sha256-raw", hashlib.sha256(plaintext).digest()),
    ):
        if needle in data:
            found.append(name)
    return found


def test_sealed_file_converges_with_mode_0600_and_reports_only_the_ciphertext_digest(
    fleet: Fleet, shims: Shims
) -> None:
    value = seal_to(SECRET, keygen(shims, "dev1"))
    resource = sealed_file(value)
    fleet.publish_bundle(fleet.group("kiosk", 1, [resource]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"))
    shim = shims.start("dev1")
    report = fleet.wait_report("dev1", on_versions(1, 1))
    path = shim.config.root / "etc" / "token"
    assert path.read_bytes() == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (status,) = report.resources
    assert status.status == "ok"
    assert status.digest == bundles.resource_digest(resource)
    assert leaks(reports.encode(report)) == []
    state = shim.config.state_path
    assert stat.S_IMODE((state / unsealing.IDENTITY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / unsealing.MAC_KEY_FILE).stat().st_mode) == 0o600
    ledger = json.loads((state / unsealing.LEDGER_FILE).read_text())
    assert list(ledger) == [value.digest()]
    assert leaks((state / unsealing.LEDGER_FILE).read_bytes()) == []


def test_hand_edit_of_a_sealed_file_is_drift_and_enforce_heals_it(
    fleet: Fleet, shims: Shims
) -> None:
    value = seal_to(SECRET, keygen(shims, "dev1"))
    fleet.publish_bundle(fleet.group("kiosk", 1, [sealed_file(value)]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    path = shim.config.root / "etc" / "token"
    mark = shim.mark()
    path.write_bytes(b"edited by hand\n")
    drift = shim.wait_event("drift", after=mark)
    assert [s.resource_id for s in drift["steps"]] == ["token"]
    shim.wait_event("healed", after=mark)
    assert path.read_bytes() == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    healed = fleet.wait_report("dev1", lambda r: statuses(r) == {"token": "healed"})
    assert leaks(reports.encode(healed)) == []


def test_observe_mode_reports_a_drifted_sealed_setting_without_its_digest(
    fleet: Fleet, shims: Shims
) -> None:
    value = seal_to(b"s3cret-token", keygen(shims, "dev1"))
    resource = SettingResource("api", "api_token", None, True, value)
    fleet.publish_bundle(fleet.group("kiosk", 1, [resource], mode="observe"))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    settings = shim.config.root / ".setpoint" / "settings.json"
    assert json.loads(settings.read_text()) == {"api_token": "s3cret-token"}
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    settings.write_text(json.dumps({"api_token": "guessed"}))
    report = fleet.wait_report("dev1", lambda r: statuses(r) == {"api": "drifted"})
    assert report.resources[0].digest == ""
    assert leaks(reports.encode(report), b"s3cret-token") == []
    assert json.loads(settings.read_text()) == {"api_token": "guessed"}  # observe: left alone


def test_a_device_that_is_not_a_recipient_refuses_and_changes_nothing(
    fleet: Fleet, shims: Shims
) -> None:
    keygen(shims, "dev1")
    other = str(pyrage.x25519.Identity.generate().to_public())
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD, sealed_file(seal_to(SECRET, other))]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", vars={"name": "dev1"}))
    shim = shims.start("dev1")
    report = fleet.wait_report(
        "dev1", lambda r: any(x.reason == "not-a-recipient" for x in r.refusals)
    )
    (refusal,) = report.refusals
    assert (refusal.kind, refusal.target, refusal.version) == ("group", "kiosk", 1)
    assert "not sealed for this device" in refusal.error
    assert report.applied_group is None
    assert set(snapshot(shim.config.root)) == {".setpoint"}  # not even the plaintext motd


def test_a_device_without_identity_says_how_to_make_one(fleet: Fleet, shims: Shims) -> None:
    other = str(pyrage.x25519.Identity.generate().to_public())
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", [sealed_file(seal_to(SECRET, other))]))
    shim = shims.start("dev1")
    report = fleet.wait_report("dev1", lambda r: bool(r.refusals))
    (refusal,) = report.refusals
    assert (refusal.kind, refusal.reason) == ("device", "not-a-recipient")
    assert "setpoint shim keygen" in refusal.error
    assert set(snapshot(shim.config.root)) == {".setpoint"}


def test_tampered_ciphertext_in_a_validly_signed_bundle_is_refused_without_writing(
    fleet: Fleet, shims: Shims
) -> None:
    value = seal_to(SECRET, keygen(shims, "dev1"))
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", vars={"name": "dev1"}))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    before = snapshot(shim.config.root)
    tampered = Sealed(flip_in_payload(value.armor), value.recipients)
    changed = FileResource("motd", "etc/motd", b"changed\n", 0o644)
    fleet.publish_bundle(fleet.group("kiosk", 2, [changed, sealed_file(tampered)]))
    report = fleet.wait_report("dev1", lambda r: bool(r.refusals))
    (refusal,) = report.refusals
    assert (refusal.kind, refusal.version, refusal.reason) == ("group", 2, "sealed-invalid")
    assert "does not decrypt" in refusal.error
    assert snapshot(shim.config.root) == before
    assert report.applied_group is not None and report.applied_group.version == 1


def test_the_shim_loads_pyrage_only_once_a_bundle_carries_a_sealed_value(
    fleet: Fleet, shims: Shims
) -> None:
    """A real ``setpoint shim`` process: its memory maps show whether pyrage was loaded."""
    import subprocess
    import sys

    config = shims.config("dev1")
    recipient = keygen(shims, "dev1")
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", vars={"name": "dev1"}))
    args = [
        sys.executable, "-m", "setpoint", "shim", "--device", "dev1",
        "--broker", f"mqtt://{fleet.host}:{fleet.port}", "--prefix", fleet.topics.prefix,
        "--trust", str(fleet.pub), "--root", str(config.root), "--observe-interval", "0.2",
        "--state-dir", str(config.state_path),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fleet.wait_report("dev1", on_versions(1, 1), timeout=30)
        maps = Path(f"/proc/{proc.pid}/maps")
        assert "pyrage" not in maps.read_text()
        fleet.publish_bundle(
            fleet.group("kiosk", 2, [MOTD, sealed_file(seal_to(SECRET, recipient))])
        )
        fleet.wait_report("dev1", on_versions(2, 1), timeout=30)
        assert "pyrage" in maps.read_text()
        assert (config.root / "etc" / "token").read_bytes() == SECRET
    finally:
        proc.terminate()
        proc.wait(timeout=30)
