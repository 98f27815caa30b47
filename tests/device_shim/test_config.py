"""Shim settings and the device-local policy file."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.device_shim.config import DevicePolicy, ShimConfig, load_policy, load_trusted_keys
from setpoint.device_shim.errors import ConfigError
from setpoint.proto import envelopes


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    path = tmp_path / "signing.pub"
    path.write_bytes(envelopes.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    return path


def config(tmp_path: Path, pub: Path, **kw: object) -> ShimConfig:
    base: dict[str, object] = {"device": "dev1", "root": tmp_path, "trust_files": (pub,)}
    base.update(kw)
    return ShimConfig(**base)  # type: ignore[arg-type]


def test_valid_config_returns_the_trusted_keys(tmp_path: Path, pub: Path) -> None:
    trusted = config(tmp_path, pub).check()
    assert len(trusted) == 1
    # Never under the root (an application's account may own it): docs/security.md.
    state = config(tmp_path, pub).state_path
    assert tmp_path not in state.parents
    assert state.name == "dev1"


@pytest.mark.parametrize("device", ["Dev1", "dev/1", "", "-dev", "x" * 65, "dev 1", "dev+"])
def test_bad_device_id_is_a_clear_error(tmp_path: Path, pub: Path, device: str) -> None:
    with pytest.raises(ConfigError, match="--device"):
        config(tmp_path, pub, device=device).check()


def test_threshold_above_the_number_of_keys(tmp_path: Path, pub: Path) -> None:
    with pytest.raises(ConfigError, match="--threshold 2"):
        config(tmp_path, pub, threshold=2).check()


def test_the_same_key_twice_counts_once(tmp_path: Path, pub: Path) -> None:
    with pytest.raises(ConfigError, match="distinct"):
        config(tmp_path, pub, trust_files=(pub, pub), threshold=2).check()


def test_missing_root(tmp_path: Path, pub: Path) -> None:
    with pytest.raises(ConfigError, match="--root"):
        config(tmp_path, pub, root=tmp_path / "nope").check()


def test_bad_prefix(tmp_path: Path, pub: Path) -> None:
    with pytest.raises(ConfigError, match="--prefix"):
        config(tmp_path, pub, prefix="a/+/b").check()


def test_trusted_key_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no trusted key"):
        load_trusted_keys([])
    with pytest.raises(ConfigError, match=r"nope\.pub"):
        load_trusted_keys([tmp_path / "nope.pub"])
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match=r"garbage\.pub"):
        load_trusted_keys([garbage])
    private = tmp_path / "signing.key"
    private.write_bytes(envelopes.private_key_pem(Ed25519PrivateKey.generate()))
    with pytest.raises(ConfigError, match="private key"):
        load_trusted_keys([private])


def test_policy_defaults_forbid_commands() -> None:
    assert DevicePolicy().refuses_command("true", "true")


def test_policy_from_ini(tmp_path: Path) -> None:
    path = tmp_path / "device.conf"
    path.write_text(
        "[device]\nallow_commands = yes\ncommand_timeout_cap = 20\n"
        "allowed_commands =\n    systemctl is-active kiosk\n    systemctl restart kiosk\n"
    )
    policy = load_policy(path)
    assert policy.allow_commands and policy.command_timeout_cap == 20
    assert policy.allowed_commands == {"systemctl is-active kiosk", "systemctl restart kiosk"}
    assert policy.refuses_command("systemctl is-active kiosk", "systemctl restart kiosk") is None
    assert policy.refuses_command("true", "systemctl restart kiosk")
    assert policy.timeout(600) == 20


def test_policy_from_json(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    path.write_text('{"allow_commands": true, "command_check_interval": 60}')
    policy = load_policy(path)
    assert policy.allow_commands and policy.allowed_commands is None
    assert policy.command_check_interval == 60


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.conf", "[device]\nallow_comands = true\n", "unknown key"),
        ("d.conf", "[device]\nallow_commands = maybe\n", "true or false"),
        ("d.conf", "[device]\ncommand_timeout_cap = 0\n", "command_timeout_cap"),
        ("d.conf", "[other]\n", "exactly one section"),
        ("d.conf", "allow_commands = true\n", "not valid INI"),
        ("d.json", "{", "not valid JSON"),
        ("d.json", "[]", "JSON object"),
        ("d.json", '{"allowed_commands": [1]}', "list of command strings"),
    ],
)
def test_bad_policy_files_say_what_is_wrong(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_policy(path)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "nope.conf")
