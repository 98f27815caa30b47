"""``setpoint config``: the operator's contexts (broker, TLS files, prefix, state directory).

    setpoint config set-context lab --broker mqtts://broker.lab:8883 --ca ca.pem \\
        --cert operator.pem --client-key operator.key [--use]
    setpoint config use lab
    setpoint config view [--json]
    setpoint config delete-context lab

The file (``~/.config/setpoint/config.toml``, or ``$SETPOINT_CONFIG``) and how its settings
mix with flags and environment variables: :mod:`setpoint.commands._contexts` and
docs/cli.md. It never holds a secret: ``--password-file`` stores a path. Paths are stored
absolute. Exit 0, or 2 with what to fix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import _contexts
from ._common import CommandError, parse_broker_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_verb", metavar="ACTION")
    sub.required = True
    view = sub.add_parser("view", help="print the config file and which context is current")
    view.add_argument("--json", action="store_true", help="print JSON for scripts")
    use = sub.add_parser("use", help="make CONTEXT the current context")
    use.add_argument("name", metavar="CONTEXT")
    use.add_argument("--json", action="store_true", help="print JSON for scripts")
    setc = sub.add_parser("set-context", help="create a context, or change some of its settings")
    setc.add_argument("name", metavar="CONTEXT")
    setc.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    setc.add_argument("--ca", type=Path, help="CA certificate for mqtts")
    setc.add_argument("--cert", type=Path, help="client certificate for mqtts")
    setc.add_argument("--client-key", type=Path, help="client certificate key for mqtts")
    setc.add_argument("--username", help="MQTT user name")
    setc.add_argument(
        "--password-file", type=Path, help="file holding the MQTT password (the path is stored)"
    )
    setc.add_argument("--prefix", help="topic prefix")
    setc.add_argument("--state-dir", type=Path, help="the controller's state directory")
    setc.add_argument("--use", action="store_true", help="also make it the current context")
    setc.add_argument("--json", action="store_true", help="print JSON for scripts")
    delete = sub.add_parser("delete-context", help="remove a context")
    delete.add_argument("name", metavar="CONTEXT")
    delete.add_argument("--json", action="store_true", help="print JSON for scripts")


def _settings_of(args: argparse.Namespace) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, (attr, _env, is_path) in _contexts.SETTINGS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        if is_path:
            value = str(Path(value).expanduser().absolute())
        elif key == "broker":
            parse_broker_list(value)  # refuse a bad URL now, not at the next `status`
        elif key == "prefix":
            from setpoint.proto.errors import ProtocolError
            from setpoint.proto.topics import validate_prefix

            try:
                validate_prefix(value)
            except ProtocolError as exc:
                raise CommandError(f"--prefix: {exc}") from None
        values[key] = str(value)
    return values


def run(args: argparse.Namespace) -> int:
    config = _contexts.load()
    verb = args.config_verb
    if verb == "view":
        body = {"path": str(config.path), "exists": config.exists, **config.to_dict()}
        if args.json:
            print(json.dumps(body, indent=2, sort_keys=True))
        elif not config.contexts:
            print(f"# {config.path}: no contexts yet")
            print("# create one: setpoint config set-context NAME --broker URL")
        else:
            print(f"# {config.path}")
            for name, values in sorted(config.contexts.items()):
                mark = "*" if name == config.current else " "
                print(f"{mark} {name}")
                for key, value in values.items():
                    print(f"    {key} = {value}")
        return 0
    if verb == "use":
        config.context(args.name)  # refuses an unknown name, with the known ones
        config.current = args.name
        _contexts.save(config)
        _say(args, {"current-context": args.name}, f"now using context {args.name!r}")
        return 0
    if verb == "set-context":
        values = _settings_of(args)
        created = args.name not in config.contexts
        if created and "broker" not in values:
            raise CommandError(f"a new context needs --broker: context {args.name!r} is new")
        config.contexts.setdefault(args.name, {}).update(values)
        if args.use or config.current is None:
            config.current = args.name
        _contexts.save(config)
        what = "created" if created else "updated"
        extra = " (current)" if config.current == args.name else ""
        _say(
            args,
            {"context": args.name, "created": created, "settings": config.contexts[args.name],
             "current-context": config.current},
            f"context {args.name!r} {what} in {config.path}{extra}",
        )  # fmt: skip
        return 0
    config.context(args.name)
    del config.contexts[args.name]
    if config.current == args.name:
        config.current = None
    _contexts.save(config)
    _say(args, {"deleted": args.name}, f"context {args.name!r} deleted")
    return 0


def _say(args: argparse.Namespace, body: dict[str, object], text: str) -> None:
    print(json.dumps(body, sort_keys=True) if args.json else text)
