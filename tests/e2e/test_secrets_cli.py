"""``setpoint shim keygen`` and ``setpoint secrets``: the real command, its files and its
messages (the end-to-end story with a controller and shims is in tests/security)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pyrage

from setpoint.proto import sealed


def setpoint(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "setpoint", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_keygen_writes_a_private_identity_once_and_prints_its_recipient(tmp_path: Path) -> None:
    first = setpoint("shim", "keygen", "--state-dir", str(tmp_path / "state"))
    assert first.returncode == 0, first.stderr
    recipient = first.stdout.strip()
    assert sealed.check_recipient(recipient) == recipient
    identity = tmp_path / "state" / "age-identity"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    secret = [x for x in identity.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-1")]
    assert str(pyrage.x25519.Identity.from_str(secret[0]).to_public()) == recipient
    assert secret[0] not in first.stdout + first.stderr
    again = setpoint("shim", "keygen", "--state-dir", str(tmp_path / "other"))
    assert (tmp_path / "other" / "age-identity").exists()
    kept = setpoint("shim", "keygen", "--state-dir", str(tmp_path / "state"))
    assert kept.stdout.strip() == recipient and "exists: kept it" in kept.stderr
    assert again.stdout.strip() != recipient


def test_keygen_and_the_shim_say_what_they_need(tmp_path: Path) -> None:
    bare = setpoint("shim", "keygen")
    assert bare.returncode == 2
    assert bare.stderr == (
        "setpoint shim keygen: pass --state-dir DIR, or --device ID for the default state"
        " directory (never under the root)\n"
    )
    run = setpoint("shim", "--root", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr == (
        "setpoint shim: the following arguments are required: --device, --broker, --trust\n"
    )


def fleet(tmp_path: Path) -> Path:
    repo = tmp_path / "fleet"
    (repo / "groups").mkdir(parents=True)
    (repo / "devices").mkdir()
    (repo / "groups" / "kiosks.yaml").write_text(
        "resources:\n  - id: token\n    kind: setting\n    key: token\n    value: plain\n"
    )
    recipient = setpoint("shim", "keygen", "--state-dir", str(tmp_path / "k1")).stdout.strip()
    (repo / "devices" / "k1.yaml").write_text(f"group: kiosks\nrecipient: {recipient}\n")
    (repo / "devices" / "k2.yaml").write_text("group: kiosks\n")
    return repo


def test_seal_refuses_a_group_with_a_device_that_has_no_recipient(tmp_path: Path) -> None:
    repo = fleet(tmp_path)
    done = setpoint(
        "secrets", "seal", "--group", "kiosks", "--repo", str(repo), "--from-stdin", stdin=b"x"
    )
    assert done.returncode == 1
    assert done.stderr == (
        "setpoint secrets seal: no 'recipient:' in devices/k2.yaml: run `setpoint shim keygen"
        " --state-dir DIR` on each device and add the age1... line it prints as 'recipient:'\n"
    )


def test_seal_prints_a_value_only_its_device_opens_and_reseal_needs_a_sealed_resource(
    tmp_path: Path,
) -> None:
    repo = fleet(tmp_path)
    printed = setpoint(
        "secrets", "seal", "--device", "k1", "--repo", str(repo), "--from-stdin", stdin=b"s3\n"
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("sealed:\n  recipients:\n    - ")
    armor = "\n".join(x.strip() for x in printed.stdout.split("age: |\n")[1].splitlines())
    lines = (tmp_path / "k1" / "age-identity").read_text().splitlines()
    identity = pyrage.x25519.Identity.from_str(lines[-1])
    assert pyrage.decrypt(armor.encode(), [identity]) == b"s3\n"  # printed: no resource kind
    refused = setpoint(
        "secrets", "reseal", "--group", "kiosks", "--resource", "token", "--repo", str(repo),
        "--from-stdin", stdin=b"x",
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr == (
        "setpoint secrets reseal: groups/kiosks.yaml: resource 'token' is not sealed; seal it"
        " first: setpoint secrets seal --group kiosks --resource token --write\n"
    )
    assert "value: plain" in (repo / "groups" / "kiosks.yaml").read_text()  # untouched
