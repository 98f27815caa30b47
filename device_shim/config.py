"""The shim's settings, and the device-local policy file that says what the device permits.

:class:`ShimConfig` is what ``setpoint shim`` builds from its flags; :meth:`ShimConfig.check`
validates it at start (device id, trust keys, threshold, directories) and raises
:class:`~setpoint.device_shim.errors.ConfigError` with a message that says what to fix.

The device-local policy file belongs to whoever owns the device, not to the fleet: signed
bundles cannot widen it. It is JSON (``*.json``) or INI (anything else, section
``[device]``)::

    [device]
    # may `command` resources run here at all? (default: no)
    allow_commands = true
    # a command's timeout is capped to this many seconds, whatever the bundle asks
    command_timeout_cap = 120
    # optional: only these exact command strings may run (one per line); a command
    # resource runs only if both its check and its apply are listed
    allowed_commands =
        systemctl is-active kiosk
        systemctl restart kiosk
    # how often command checks are re-run between applies (seconds)
    command_check_interval = 600

or the same as JSON: ``{"allow_commands": true, "command_timeout_cap": 120,
"allowed_commands": ["..."], "command_check_interval": 600}``. Unknown keys are an error
(a typo must not silently leave a device more open than meant).

Reads files only when asked (:func:`load_policy`, :func:`load_trusted_keys`); no network.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from setpoint.kit.brokers import BrokerSettings
from setpoint.proto import bundles, envelopes, topics
from setpoint.proto.errors import InvalidId, SchemaError

from .errors import ConfigError

RESERVED_DIR: Final = ".setpoint"
SETTINGS_FILE: Final = ".setpoint/settings.json"
SYSTEM_STATE_DIR: Final = Path("/var/lib/setpoint")
MAX_TIMEOUT_CAP: Final = 3600
_POLICY_KEYS: Final = frozenset(
    {
        "allow_commands",
        "command_timeout_cap",
        "allowed_commands",
        "command_check_interval",
        "allow_special_modes",
    }
)


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """What this device permits, from its own configuration (never from a bundle)."""

    allow_commands: bool = False
    command_timeout_cap: int = 300
    allowed_commands: frozenset[str] | None = None
    command_check_interval: float = 300.0
    allow_special_modes: bool = False  # setuid, setgid, sticky, world-writable files

    def refuses_mode(self, mode: int) -> str | None:
        """Why a file with ``mode`` may not be installed here, or None if it may."""
        risky = bundles.risky_mode(mode)
        if risky is None or self.allow_special_modes:
            return None
        return (
            f"mode {mode:04o} is {risky}; this device installs such files only with"
            " allow_special_modes = true in its own configuration"
        )

    def refuses_command(self, check: str, apply: str) -> str | None:
        """Why a command resource may not run here, or None if it may."""
        if not self.allow_commands:
            return (
                "device policy forbids commands (allow them with allow_commands = true in the"
                " shim's --config file)"
            )
        if self.allowed_commands is not None:
            missing = [c for c in (check, apply) if c not in self.allowed_commands]
            if missing:
                return "device policy forbids this command (not in its allowed_commands list)"
        return None

    def timeout(self, asked: int) -> int:
        return max(1, min(asked, self.command_timeout_cap))


DEFAULT_POLICY: Final = DevicePolicy()


def _bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _number(value: object, where: str, low: float, high: float) -> float:
    number = float("nan")
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not low <= number <= high:
        raise ConfigError(f"{where}: expected a number from {low:g} to {high:g}, got {value!r}")
    return number


def policy_from_mapping(raw: Mapping[str, Any], where: str) -> DevicePolicy:
    unknown = set(raw) - _POLICY_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(_POLICY_KEYS))})"
        )
    allowed_raw = raw.get("allowed_commands")
    allowed: frozenset[str] | None = None
    if allowed_raw is not None:
        if isinstance(allowed_raw, str):
            allowed = frozenset(line.strip() for line in allowed_raw.splitlines() if line.strip())
        elif isinstance(allowed_raw, list) and all(isinstance(c, str) for c in allowed_raw):
            allowed = frozenset(allowed_raw)
        else:
            raise ConfigError(f"{where}: allowed_commands must be a list of command strings")
    return DevicePolicy(
        allow_commands=_bool(raw.get("allow_commands", False), f"{where}: allow_commands"),
        command_timeout_cap=int(
            _number(
                raw.get("command_timeout_cap", 300),
                f"{where}: command_timeout_cap",
                1,
                MAX_TIMEOUT_CAP,
            )
        ),
        allowed_commands=allowed,
        command_check_interval=_number(
            raw.get("command_check_interval", 300),
            f"{where}: command_check_interval",
            1,
            7 * 86400,
        ),
        allow_special_modes=_bool(
            raw.get("allow_special_modes", False), f"{where}: allow_special_modes"
        ),
    )


def load_policy(path: Path) -> DevicePolicy:
    """Read the device-local policy file (JSON if it ends in ``.json``, else INI)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"device config {path}: cannot read it: {exc.strerror}") from exc
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"device config {path}: not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"device config {path}: expected a JSON object")
        return policy_from_mapping(raw, f"device config {path}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"device config {path}: not valid INI: {exc}") from exc
    sections = parser.sections()
    if sections != ["device"]:
        raise ConfigError(
            f"device config {path}: expected exactly one section [device], got {sections}"
        )
    return policy_from_mapping(dict(parser["device"]), f"device config {path}")


def load_trusted_keys(files: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    """Read PEM Ed25519 public keys; map key id to key."""
    if not files:
        raise ConfigError("no trusted key: pass --trust PUBFILE (the fleet's signing.pub)")
    keys: list[Ed25519PublicKey] = []
    for path in files:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"trusted key {path}: cannot read it: {exc.strerror}") from exc
        if b"PRIVATE KEY" in pem:
            raise ConfigError(
                f"trusted key {path} is a private key: give the device the public key"
                " (signing.pub), never the signing key"
            )
        try:
            keys.append(envelopes.load_public_key(pem))
        except SchemaError as exc:
            raise ConfigError(f"trusted key {path}: {exc}") from exc
    return envelopes.trusted_keys(keys)


def default_state_dir(device: str) -> Path:
    """Where a shim keeps its state unless told: never under the device root, which an
    application's account may own (it could plant an apply journal there). As root
    ``/var/lib/setpoint/DEVICE``; otherwise ``$XDG_STATE_HOME/setpoint/shim/DEVICE``
    (``~/.local/state/...``)."""
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR / device
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "setpoint" / "shim" / device


@dataclass(frozen=True, slots=True)
class ShimConfig:
    """Everything one shim needs to run. Intervals are seconds."""

    device: str
    root: Path
    trust_files: tuple[Path, ...]
    broker: BrokerSettings | None = None
    state_dir: Path | None = None
    policy: DevicePolicy = DEFAULT_POLICY
    threshold: int = 1
    heartbeat: float = 900.0
    observe_interval: float = 60.0  # the full look; changes are seen at once by inotify
    watch: bool = True  # False: poll only (a root where inotify misses writes, e.g. NFS)
    max_watches: int | None = None  # inotify watches at most (None: the kernel's limit)
    skew: float = 300.0
    prefix: str = topics.DEFAULT_PREFIX
    client_id: str | None = None
    keepalive: int = 60
    reconnect_min: float = 1.0
    reconnect_max: float = 30.0
    connect_timeout: float = 15.0  # TCP, TLS and CONNACK; above NATS's ~11 s election stall
    retry_base: float = 10.0
    retry_cap: float = 3600.0
    max_queued: int = 16
    mqtt_version: str = "5"  # "5" (falls back to 3.1.1 when refused) or "3.1.1"
    reset_floors: bool = False

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else default_state_dir(self.device)

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"setpoint-shim-{self.device}"

    def check(self) -> dict[str, Ed25519PublicKey]:
        """Validate the settings; return the trusted keys. Raises ConfigError."""
        try:
            topics.validate_id(self.device, "device id")
        except InvalidId as exc:
            raise ConfigError(f"--device: {exc}") from exc
        try:
            topics.validate_prefix(self.prefix)
        except InvalidId as exc:
            raise ConfigError(f"--prefix: {exc}") from exc
        if not self.root.is_dir():
            raise ConfigError(f"--root {self.root}: not a directory (create it first)")
        trusted = load_trusted_keys(self.trust_files)
        if not 1 <= self.threshold <= len(trusted):
            raise ConfigError(
                f"--threshold {self.threshold}: must be from 1 to the number of distinct"
                f" trusted keys ({len(trusted)})"
            )
        for name in ("heartbeat", "observe_interval", "reconnect_min", "retry_base"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError(
                f"--reconnect-max {self.reconnect_max:g}: must not be below --reconnect-min"
                f" ({self.reconnect_min:g})"
            )
        if self.connect_timeout <= 0:
            raise ConfigError(
                f"--connect-timeout {self.connect_timeout:g}: must be positive (seconds to wait"
                " for a node's CONNACK before trying the next; default 15)"
            )
        if not 5 <= self.keepalive <= 0xFFFF:
            raise ConfigError(
                f"--keepalive {self.keepalive}: must be from 5 to 65535 seconds (default 60;"
                " a dead broker is noticed after 1.5 keepalives)"
            )
        if self.mqtt_version not in ("5", "3.1.1"):
            raise ConfigError(f"--mqtt-version {self.mqtt_version!r}: use 5 or 3.1.1")
        if self.skew < 0:
            raise ConfigError("skew must not be negative")
        return trusted
