"""Operator contexts: the config file that spares ``--broker`` and three TLS flags each time.

The file is ``$SETPOINT_CONFIG``, else ``$XDG_CONFIG_HOME/setpoint/config.toml`` (by default
``~/.config/setpoint/config.toml``)::

    current-context = "lab"

    [contexts.lab]
    broker = "mqtts://broker.lab:8883"
    ca = "/etc/setpoint/ca.pem"
    cert = "/etc/setpoint/operator.pem"
    client-key = "/etc/setpoint/operator.key"
    username = "ops"
    password-file = "~/.config/setpoint/lab.password"
    prefix = "setpoint/v1"
    state-dir = "/var/lib/setpoint/lab"

Each setting comes from the first of: its command-line flag, its environment variable, the
context (``--context``, else ``$SETPOINT_CONTEXT``, else ``current-context``), the built-in
default. The current context is not consulted when the broker itself came from a flag or
the environment (its prefix and TLS files belong to its own broker); a context named with
``--context`` or ``$SETPOINT_CONTEXT`` always is. Relative paths in the file are relative
to the file's folder; ``~`` is expanded. The file holds no secret: a ``password`` key is
refused (use ``password-file`` or ``$SETPOINT_MQTT_PASSWORD``).

Reading needs only the standard library (``tomllib``); writing (``setpoint config``) uses
``tomli-w`` from the controller extra. :func:`apply` is the one place that fills the
parsed arguments; the verbs never look at the file themselves.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._common import DEFAULT_PREFIX, CommandError

# key in the file -> (attribute of the parsed arguments, environment variable, is a path)
SETTINGS: Final[dict[str, tuple[str, str | None, bool]]] = {
    "broker": ("broker", "SETPOINT_BROKER", False),
    "username": ("username", "SETPOINT_MQTT_USERNAME", False),
    # The password itself may come from the environment: it then wins over the file's path.
    "password-file": ("password_file", "SETPOINT_MQTT_PASSWORD", True),
    "ca": ("ca", None, True),
    "cert": ("cert", None, True),
    "client-key": ("client_key", None, True),
    "prefix": ("prefix", "SETPOINT_PREFIX", False),
    "state-dir": ("state_dir", "SETPOINT_STATE_DIR", True),
}
SECRET_KEYS: Final = frozenset({"password", "secret", "token"})
DEFAULTS: Final[dict[str, Any]] = {"prefix": DEFAULT_PREFIX}


def config_path() -> Path:
    explicit = os.environ.get("SETPOINT_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "setpoint" / "config.toml"


@dataclass
class ConfigFile:
    """The parsed file: the current context's name and every context's settings."""

    path: Path
    current: str | None = None
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    exists: bool = False

    def context(self, name: str) -> dict[str, str]:
        if name not in self.contexts:
            raise CommandError(self.unknown(name))
        return self.contexts[name]

    def unknown(self, name: str) -> str:
        import difflib

        if not self.contexts:
            return (
                f"no context {name!r}: {self.path} has no contexts; create one with"
                f" `setpoint config set-context {name} --broker URL`"
            )
        close = difflib.get_close_matches(name, list(self.contexts), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"no context {name!r} in {self.path}{hint}"
            f" (contexts: {', '.join(sorted(self.contexts))})"
        )

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.current is not None:
            body["current-context"] = self.current
        body["contexts"] = {name: dict(values) for name, values in sorted(self.contexts.items())}
        return body


def parse(text: str, path: Path) -> ConfigFile:
    """The config file's text, checked: known keys, strings only, no secrets. Pure."""
    import tomllib

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"current-context", "contexts"})
    if unknown:
        raise CommandError(f"{path}: unknown key {unknown[0]!r} (known: current-context, contexts)")
    current = raw.get("current-context")
    if current is not None and not isinstance(current, str):
        raise CommandError(f"{path}: current-context must be a string (a context's name)")
    contexts_raw = raw.get("contexts", {})
    if not isinstance(contexts_raw, dict):
        raise CommandError(f"{path}: contexts must be a table: [contexts.NAME]")
    contexts: dict[str, dict[str, str]] = {}
    for name, values in contexts_raw.items():
        where = f"{path}: context {name!r}"
        if not isinstance(values, dict):
            raise CommandError(f"{where}: must be a table of settings")
        for key, value in values.items():
            if key in SECRET_KEYS:
                raise CommandError(
                    f"{where}: {key!r} is not allowed in the config file (it holds no"
                    " secrets): use password-file = PATH, or set SETPOINT_MQTT_PASSWORD"
                )
            if key not in SETTINGS:
                raise CommandError(
                    f"{where}: unknown setting {key!r} (known: {', '.join(SETTINGS)})"
                )
            if not isinstance(value, str):
                raise CommandError(f"{where}: {key} must be a string, not {value!r}")
        contexts[name] = dict(values)
    if current is not None and current not in contexts:
        raise CommandError(
            f"{path}: current-context {current!r} is not a context of the file;"
            f" fix it with `setpoint config use NAME`"
        )
    return ConfigFile(path, current, contexts, exists=True)


def load(path: Path | None = None) -> ConfigFile:
    """The config file (an empty one when the default file does not exist)."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if os.environ.get("SETPOINT_CONFIG"):
            raise CommandError(
                f"SETPOINT_CONFIG={path}: no such file; create it with"
                " `setpoint config set-context NAME --broker URL`"
            ) from None
        return ConfigFile(path)
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror or exc}") from None
    return parse(text, path)


def save(config: ConfigFile) -> None:
    """Write the file atomically (temp file, fsync, rename), mode 0600."""
    import tempfile

    try:
        import tomli_w
    except ModuleNotFoundError:
        raise CommandError(
            "writing the config file needs tomli-w: pip install 'setpoint[controller]'"
            f" (or edit {config.path} by hand)"
        ) from None
    data = tomli_w.dumps(config.to_dict()).encode("utf-8")
    folder = config.path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, config.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CommandError(f"cannot write {config.path}: {exc.strerror or exc}") from None


def _path_value(value: str, config: ConfigFile) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = config.path.parent / path
    return str(path)


def apply(args: argparse.Namespace, environ: dict[str, str] | None = None) -> None:
    """Fill every setting no flag gave: environment, then context, then default.

    Reads the config file only when a setting is still missing or a context is asked for.
    """
    env = dict(os.environ) if environ is None else environ
    present = {key: spec for key, spec in SETTINGS.items() if hasattr(args, spec[0])}
    missing = {key for key, (attr, _e, _p) in present.items() if getattr(args, attr) is None}
    for key in list(missing):
        attr, variable, _is_path = present[key]
        if variable and env.get(variable):
            if attr != "password_file":  # the password itself: read by broker_from_args
                setattr(args, attr, Path(env[variable]) if key == "state-dir" else env[variable])
            missing.discard(key)
    wanted = getattr(args, "context", None) or env.get("SETPOINT_CONTEXT")
    # A broker named on the command line or in the environment is not mixed with the
    # current context's prefix and TLS files (they belong to another broker); a context
    # asked for by name always applies.
    broker_named = "broker" in present and "broker" not in missing
    if wanted or (missing and not broker_named):
        config = load()
        name = wanted or config.current
        context = config.context(name) if name else {}
        for key in sorted(missing):
            attr, _variable, is_path = present[key]
            if key in context:
                value: Any = context[key]
                if is_path:
                    value = _path_value(value, config)
                    if key == "state-dir":
                        value = Path(value)
                setattr(args, attr, value)
                missing.discard(key)
    for key in missing:
        if key in DEFAULTS:
            setattr(args, present[key][0], DEFAULTS[key])
