"""Helpers shared by the verb modules: broker URLs, credentials, the controller extra."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from setpoint.kit import brokers
from setpoint.kit.brokers import BrokerURL

DEFAULT_PREFIX = "setpoint/v1"
CONTROLLER_EXTRA_HINT = (
    "this verb needs the controller's dependencies: pip install 'setpoint[controller]'"
)


class CommandError(Exception):
    """A user error with a message that says what to do; printed without a traceback."""


def require_controller(module: str = "setpoint.controller") -> ModuleType:
    """Import a controller module, or exit with the exact install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {
            "gmqtt", "pydantic", "dulwich", "yaml", "prometheus_client",
        }:  # fmt: skip
            print(f"setpoint: {CONTROLLER_EXTRA_HINT} (missing: {exc.name})", file=sys.stderr)
            raise SystemExit(2) from None
        raise


def parse_broker_list(value: str) -> list[BrokerURL]:
    """The entries of ``--broker`` (not resolved: a ``+srv`` entry stays a name)."""
    try:
        return brokers.parse_broker_list(value)
    except brokers.BrokerURLError as exc:
        raise CommandError(str(exc)) from None


def add_broker_arguments(parser: argparse.ArgumentParser, *, one_node: bool = False) -> None:
    """The broker flags every verb that talks to a broker takes.

    The defaults are left empty here: :func:`setpoint.commands._contexts.apply` fills what
    no flag gave from the environment, then from the operator's config file (the context),
    then the built-in default, once the command line is parsed.
    """
    parser.add_argument(
        "--broker",
        help="mqtt://host:port or mqtts://host:port (env SETPOINT_BROKER, or the context's);"
        + (
            " one node: this command takes no list and no mqtt+srv:// name yet"
            if one_node
            else " the nodes of a cluster comma-separated: mqtt://a:1883,mqtt://b:1883, or"
            " found in DNS: mqtt+srv://DOMAIN (SRV records of _mqtt._tcp.DOMAIN;"
            " mqtts+srv:// asks _secure-mqtt._tcp.DOMAIN; env SETPOINT_DNS_SERVER=IP[:PORT]"
            " picks the resolver, default the system's)"
        ),
    )
    parser.add_argument(
        "--username",
        help="MQTT user name (env SETPOINT_MQTT_USERNAME)",
    )
    parser.add_argument(
        "--password-file",
        help="file holding the MQTT password (or env SETPOINT_MQTT_PASSWORD)",
    )
    parser.add_argument("--ca", help="CA certificate for mqtts")
    parser.add_argument("--cert", help="client certificate for mqtts")
    parser.add_argument("--client-key", help="client certificate key for mqtts")
    parser.add_argument(
        "--prefix", help=f"topic prefix (env SETPOINT_PREFIX; default {DEFAULT_PREFIX})"
    )
    add_context_argument(parser)


def add_context_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context",
        help="use this context of the config file (env SETPOINT_CONTEXT;"
        " default: the file's current-context; see `setpoint config`)",
    )
    parser.set_defaults(_settings=True)


def add_trust_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--trust PUBFILE``, repeatable (read with :func:`load_trust`)."""
    parser.add_argument(
        "--trust", type=Path, action="append", default=[], metavar="PUBFILE", help=help_text
    )


def load_trust(paths: list[Path]) -> dict[str, Any] | None:
    """The trusted keys of ``--trust PUBFILE`` flags (None for none), or a CommandError."""
    if not paths:
        return None
    from setpoint.proto import envelopes
    from setpoint.proto.errors import ProtocolError

    try:
        return envelopes.trusted_keys(envelopes.load_public_key(p.read_bytes()) for p in paths)
    except (OSError, ProtocolError) as exc:
        raise CommandError(f"--trust: {exc}") from None


def brokers_from_args(args: argparse.Namespace) -> list[BrokerURL]:
    """Every node of ``--broker`` (comma-separated: the nodes of one cluster, tried in
    turn; a ``mqtt+srv://`` entry resolved in DNS into the nodes its SRV records name, in
    RFC 2782 order), each with the credentials of the flags."""
    if not args.broker:
        raise CommandError(
            "no broker: pass --broker mqtt://host:port, set SETPOINT_BROKER, or make a"
            " context once: setpoint config set-context NAME --broker mqtt://host:port"
        )
    password = os.environ.get("SETPOINT_MQTT_PASSWORD")
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise CommandError(
                f"password file {args.password_file}: {exc.strerror or exc}"
            ) from None
    try:
        urls = brokers.resolve_brokers(parse_broker_list(args.broker), random.SystemRandom())
    except brokers.BrokerURLError as exc:
        raise CommandError(str(exc)) from None
    return [dataclasses.replace(u, username=args.username, password=password) for u in urls]


def broker_from_args(args: argparse.Namespace) -> BrokerURL:
    """The one broker URL of ``--broker``, for commands that do not rotate over a list."""
    urls = parse_broker_list(args.broker) if args.broker else []
    if any(url.srv for url in urls):
        raise CommandError(
            f"--broker {args.broker!r}: this command takes one node's URL"
            " (mqtt://host:port), not an mqtt+srv:// name"
        )
    urls = brokers_from_args(args)
    if len(urls) > 1:
        raise CommandError(
            f"--broker {args.broker!r}: this command takes one broker URL, not a list"
        )
    return urls[0]
