"""``setpoint conformance``: check a running device agent against proto/SPEC.md over MQTT.

Plays the controller's side for one device: publishes signed bundles and commands, valid
and invalid, and checks the agent's reports and presence, one line per requirement. Exit
status 0 when every MUST is met, 1 when one is not, 2 when the kit cannot run.

Imports the kit (proto and paho-mqtt) only when the verb runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import CommandError, add_broker_arguments, broker_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", required=True, help="the id of the device under test")
    add_broker_arguments(parser, one_node=True)
    parser.add_argument(
        "--trust-key",
        required=True,
        type=Path,
        metavar="KEY",
        help="the private signing key (PEM PKCS#8 Ed25519) whose public key the agent trusts",
    )
    parser.add_argument(
        "--edit-cmd",
        metavar="CMD",
        help="a shell command that changes the device's file $SETPOINT_EDIT_PATH (relative to"
        ' the device root) by hand, e.g. "echo x >> /srv/root/$SETPOINT_EDIT_PATH"',
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each answer of the device (default 30)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    from setpoint.conformance import Broker, KitError, Options, passed, summary, to_json
    from setpoint.conformance import run as run_kit
    from setpoint.proto import envelopes, topics
    from setpoint.proto.errors import InvalidId, SchemaError

    try:
        url = broker_from_args(args)
        topics.validate_id(args.device, "--device")
        topics.validate_prefix(args.prefix)
        try:
            pem = args.trust_key.read_bytes()
        except OSError as exc:
            raise CommandError(
                f"--trust-key {args.trust_key}: cannot read it: {exc.strerror}"
            ) from exc
        try:
            key = envelopes.load_private_key(pem)
        except SchemaError as exc:
            raise CommandError(
                f"--trust-key {args.trust_key}: {exc} (give the private signing key, PEM"
                " PKCS#8 Ed25519, whose public key the agent trusts)"
            ) from exc
        if args.timeout <= 0:
            raise CommandError("--timeout must be a positive number of seconds")
    except (CommandError, InvalidId) as exc:
        print(f"setpoint conformance: {exc}", file=sys.stderr)
        return 2
    options = Options(
        broker=Broker(
            url.host,
            url.port,
            url.tls,
            url.username,
            url.password,
            args.ca,
            args.cert,
            args.client_key,
        ),
        device=args.device,
        key=key,
        prefix=args.prefix,
        edit_cmd=args.edit_cmd,
        timeout=args.timeout,
    )

    def show(outcome: object) -> None:
        if not args.json:
            print(outcome.line(), flush=True)  # type: ignore[attr-defined]

    try:
        outcomes = run_kit(options, on_outcome=show)
    except KitError as exc:
        print(f"setpoint conformance: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(args.device, outcomes))
    else:
        print(summary(outcomes))
    return 0 if passed(outcomes) else 1
