"""Fixtures of the attack suite: a fleet PKI (made once), a secure broker per test
(mutual TLS, ACL, CRL; from mosquitto/secure.conf) and a shim converged on it."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "device_shim"))
sys.path.insert(0, str(Path(__file__).parent))

from kit import Converged, SecureFleet, shim_broker
from shimkit import Shims, on_versions, snapshot

from setpoint.controller import pki as pki_mod
from setpoint.mosquitto import SecureBroker
from setpoint.proto.bundles import FileResource, SettingResource

MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)
TZ = SettingResource("tz", "tz", "UTC")


@dataclass(frozen=True)
class Pkis:
    fleet: pki_mod.Pki  # devices dev1, dev2; "stale" expired; "gone" revoked
    foreign: pki_mod.Pki  # another fleet's CA, with its own dev1


@pytest.fixture(scope="session")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Pkis:
    base = tmp_path_factory.mktemp("pki")
    fleet = pki_mod.secure_fleet(base / "fleet", ["dev1", "dev2", "gone"])
    now = dt.datetime.now(dt.UTC)
    fleet.issue_device(
        "stale", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    fleet.revoke("gone")
    foreign = pki_mod.secure_fleet(base / "foreign", ["dev1"])
    return Pkis(fleet, foreign)


@pytest.fixture
def pki(pkis: Pkis) -> pki_mod.Pki:
    return pkis.fleet


@pytest.fixture
def secure_broker(pki: pki_mod.Pki, unique_prefix: str, tmp_path: Path) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path / "broker", pki.root, prefix=unique_prefix) as broker:
        yield broker


@pytest.fixture
def secure_fleet(
    secure_broker: SecureBroker, pki: pki_mod.Pki, unique_prefix: str, tmp_path: Path
) -> Iterator[SecureFleet]:
    fleet = SecureFleet(secure_broker, pki.controller, unique_prefix, tmp_path / "fleet")
    yield fleet
    fleet.close()


@pytest.fixture
def secure_shims(secure_fleet: SecureFleet, tmp_path: Path) -> Iterator[Shims]:
    shims = Shims(secure_fleet, tmp_path)
    yield shims
    shims.close()


@pytest.fixture
def converged(
    secure_broker: SecureBroker, secure_fleet: SecureFleet, secure_shims: Shims, pki: pki_mod.Pki
) -> Converged:
    """dev1's shim, over mutual TLS, having applied group kiosk v2 and device dev1 v2."""
    fleet = secure_fleet
    fleet.publish_bundle(fleet.group("kiosk", 2, [MOTD, TZ]))
    fleet.publish_bundle(fleet.device("dev1", 2, "kiosk", vars={"name": "dev1"}))
    shim = secure_shims.start("dev1", broker=shim_broker(secure_broker, pki.device("dev1")))
    fleet.wait_report("dev1", on_versions(2, 2))
    root = shim.config.root
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    c = Converged(shim, fleet, root, snapshot(root), {})
    c.trust = c.state_trust()
    return c
