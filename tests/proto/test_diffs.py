"""``setpoint.proto.diffs``: desired against reported, per resource (setpoint diff and the
dashboard's device page). Pure."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.proto import bundles, diffs, envelopes, reports
from setpoint.proto.bundles import Bundle, FileResource, SettingResource
from setpoint.proto.errors import SignatureError
from setpoint.proto.reports import Applied, Report, ResourceReport
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES

T = Topics("setpoint/v1")
MOTD = FileResource("motd", "etc/motd", b"hello\n")
TOKEN = SettingResource("api-token", "api_token", "hunter2-secret", secret=True)
GROUP = Bundle("group", "kiosks", 3, "c0ffee", 0, 2**31, (MOTD, TOKEN))
DEVICE = Bundle("device", "kiosk-01", 1, "c0ffee", 0, 2**31, group="kiosks")


def signed(bundle: Bundle, key: Ed25519PrivateKey) -> bytes:
    return envelopes.sign(PAYLOAD_TYPES[bundle.kind], bundles.encode(bundle), [key])


def report(*resources: ResourceReport, device: str = "kiosk-01") -> bytes:
    return reports.encode(
        Report(device, 0, 7, "test", "enforce", "kiosks",
               Applied("kiosks", 3, "c0ffee", ""), Applied(device, 1, "c0ffee", ""), resources)
    )  # fmt: skip


def test_verdicts_per_resource_and_the_secret_never_shown() -> None:
    key = Ed25519PrivateKey.generate()
    messages = {
        T.device_desired("kiosk-01"): signed(DEVICE, key),
        T.group_desired("kiosks"): signed(GROUP, key),
        T.device_reported("kiosk-01"): report(
            ResourceReport("motd", "file", "drifted", "0" * 64, "content differs"),
            ResourceReport("api-token", "setting", "ok", bundles.resource_digest(TOKEN)),
            ResourceReport("extra", "file", "ok", "1" * 64),
        ),
    }
    trusted = envelopes.trusted_keys([key.public_key()])
    diff = diffs.from_retained("kiosk-01", messages, T, trusted)
    verdicts = {r["id"]: r["verdict"] for r in diff.rows}
    assert verdicts == {"motd": "drifted", "api-token": "same", "extra": "not desired"}
    assert diff.differs and diff.verified and diff.group == "kiosks"
    assert "hunter2" not in repr(diff.rows)
    assert diffs.describe(TOKEN) == "api_token = <secret>"


def test_missing_bundles_and_a_foreign_report_are_unavailable() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(diffs.Unavailable, match="no bundle is retained for device 'kiosk-01'"):
        diffs.from_retained("kiosk-01", {}, T)
    only_device = {T.device_desired("kiosk-01"): signed(DEVICE, key)}
    with pytest.raises(diffs.Unavailable, match="no bundle is retained for group 'kiosks'"):
        diffs.from_retained("kiosk-01", only_device, T)
    foreign = {
        **only_device,
        T.group_desired("kiosks"): signed(GROUP, key),
        T.device_reported("kiosk-01"): report(device="kiosk-02"),
    }
    with pytest.raises(diffs.Unavailable, match="claims to be from 'kiosk-02'"):
        diffs.from_retained("kiosk-01", foreign, T)


def test_a_bundle_signed_by_another_key_is_refused_when_trust_is_given() -> None:
    messages = {T.device_desired("kiosk-01"): signed(DEVICE, Ed25519PrivateKey.generate())}
    trusted = envelopes.trusted_keys([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(SignatureError):
        diffs.from_retained("kiosk-01", messages, T, trusted)
    unverified = diffs.from_retained(
        "kiosk-01",
        {**messages, T.group_desired("kiosks"): signed(GROUP, Ed25519PrivateKey.generate())},
        T,
    )
    assert not unverified.verified and unverified.report is None and unverified.differs
