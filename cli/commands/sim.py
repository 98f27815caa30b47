"""``setpoint sim``: simulated devices for load tests, benchmarks and demos.

    setpoint sim --broker mqtt://127.0.0.1:1883 --devices 10000 --trust signing.pub

Each device has its own MQTT connection and client id and behaves like ``setpoint shim``
on the wire: it verifies bundles with the fleet's public key, applies them to memory,
reports its state and keeps its presence with a will. Devices are named
``<id-prefix><index>`` (``sim-00000``, ``sim-00001``, ...): the fleet repository lists them
under ``devices/``. Runs until SIGTERM or Ctrl-C (or ``--duration`` seconds), then says
offline and disconnects every device.
"""

from __future__ import annotations

import argparse
import sys

from ._common import (
    CommandError,
    add_broker_arguments,
    add_trust_argument,
    broker_from_args,
)


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if rate < 0 or rate != rate:
        raise argparse.ArgumentTypeError(f"{value!r}: a rate must be 0 or more")
    return rate


def _count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: at least 1")
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser, one_node=True)
    parser.add_argument("--devices", type=_count, required=True, help="how many devices")
    add_trust_argument(
        parser, "the fleet's public key (PEM); repeat for several (needed unless --echo)"
    )
    parser.add_argument("--id-prefix", default="sim-", help="device ids: PREFIX + index")
    parser.add_argument("--first", type=int, default=0, help="index of the first device")
    parser.add_argument("--width", type=int, default=5, help="digits of the index (default 5)")
    parser.add_argument(
        "--drift-rate", type=_rate, default=0.0, metavar="R",
        help="hand-made drifts per second across the fleet (enforce mode heals them)",
    )  # fmt: skip
    parser.add_argument(
        "--fail-rate", type=_rate, default=0.0, metavar="P",
        help="probability (0-1) that applying a new bundle fails",
    )  # fmt: skip
    parser.add_argument(
        "--refuse-rate", type=_rate, default=0.0, metavar="P",
        help="probability (0-1) that a device refuses a new bundle",
    )  # fmt: skip
    parser.add_argument(
        "--churn-rate", type=_rate, default=0.0, metavar="R",
        help="devices per second that drop offline (will) and come back 1-5 s later",
    )  # fmt: skip
    parser.add_argument(
        "--connect-rate", type=_rate, default=2000.0, metavar="R",
        help="new connections per second at start (default 2000; 0: no pacing)",
    )  # fmt: skip
    parser.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive seconds")
    parser.add_argument(
        "--max-per-process", type=_count, default=None,
        help="devices per process (default: the file-descriptor limit, raised first)",
    )  # fmt: skip
    parser.add_argument(
        "--max-per-address", type=_count, default=None,
        help="connections per source address (default: the local port range less 1,024);"
        " more devices use 127.0.0.2, 127.0.0.3, ... (a broker on loopback only)",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=None, help="stop after SECONDS")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the faults")
    parser.add_argument(
        "--echo", action="store_true",
        help="bare reference for benchmarks: answer each desired message, no setpoint logic",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def config_from_args(args: argparse.Namespace) -> object:
    from setpoint.sim.devices import Faults
    from setpoint.sim.running import SimConfig

    url = broker_from_args(args)
    if url.tls:
        raise CommandError("setpoint sim speaks plain MQTT only; use an mqtt:// listener")
    if not args.echo and not args.trust:
        raise CommandError("pass --trust PUBFILE (the fleet's signing.pub) so devices verify")
    for path in args.trust:
        if not path.is_file():
            raise CommandError(f"--trust {path}: no such file")
    for name in ("fail_rate", "refuse_rate"):
        if getattr(args, name) > 1:
            raise CommandError(f"--{name.replace('_', '-')} is a probability: 0 to 1")
    if args.first < 0 or not 1 <= args.width <= 12:
        raise CommandError("--first must be >= 0 and --width 1-12")
    from setpoint.proto.errors import InvalidId
    from setpoint.proto.topics import Topics, validate_id

    try:
        Topics(args.prefix)
        validate_id(f"{args.id_prefix}{args.first:0{args.width}d}", "device id")
    except InvalidId as exc:
        raise CommandError(str(exc)) from None
    return SimConfig(
        host=url.host,
        port=url.port,
        devices=args.devices,
        prefix=args.prefix,
        first=args.first,
        id_prefix=args.id_prefix,
        width=args.width,
        trust=tuple(args.trust),
        faults=Faults(
            drift=args.drift_rate,
            fail=args.fail_rate,
            refuse=args.refuse_rate,
            churn=args.churn_rate,
        ),
        connect_rate=args.connect_rate,
        keepalive=args.keepalive,
        echo=args.echo,
        username=url.username,
        password=url.password,
        duration=args.duration,
        max_per_process=args.max_per_process,
        max_per_address=args.max_per_address,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from setpoint.proto.errors import ProtocolError
    from setpoint.sim import running

    try:
        config = config_from_args(args)
    except (CommandError, ProtocolError) as exc:
        print(f"setpoint sim: {exc}", file=sys.stderr)
        return 2
    try:
        return running.run(config, running.printer(args.json))  # type: ignore[arg-type]
    except running.TooManyDevices as exc:
        print(f"setpoint sim: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"setpoint sim: {exc}", file=sys.stderr)
        return 1
