"""``setpoint shim``: run the device agent until SIGTERM or SIGINT.

    setpoint shim --device ID --broker URL[,URL...] --trust PUBFILE [--trust PUBFILE ...]
                  --root DIR [--state-dir DIR] [--config FILE] [--threshold N] [--heartbeat S]
                  [--observe-interval S] [--no-watch] [--skew S] [--username U]
                  [--password-file F] [--prefix P] [--reconnect-min S] [--reconnect-max S]
                  [--connect-timeout S] [--keepalive S] [--log-json] [--reset-floors]
    setpoint shim keygen (--state-dir DIR | --device ID)

``--broker`` may list the nodes of one cluster, comma-separated (also in
``SETPOINT_BROKER`` or a context's ``broker``): the shim tries them in turn, moving on when
a node refuses, drops at once or sends no CONNACK within ``--connect-timeout``
(docs/scale-out.md). ``mqtt+srv://DOMAIN`` takes the nodes from DNS SRV records
(:mod:`setpoint.kit.brokers`), asked again when every node has failed.

``keygen`` makes the device's age identity for sealed secrets (0600, in the state
directory, kept if it exists) and prints its recipient (``age1...``) for the operator to
commit as ``recipient:`` in the device's file (docs/secrets.md).

The password comes from ``SETPOINT_MQTT_PASSWORD`` or ``--password-file``, never from the
command line. A clean stop publishes ``offline`` presence and exits 0; a bad setting exits 2
with a message that says what to fix. Imports only the shim's side.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from setpoint.kit.brokers import discovery_of

from ._common import CommandError, add_broker_arguments, brokers_from_args

_RUN_NEEDS = ("device", "broker", "trust", "root")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Several --broker URLs are the nodes of one cluster: the shim tries them in turn,"
        " moving on from a node that is unreachable, refuses the connection, drops it before"
        " 30 s or sends no CONNACK within --connect-timeout; the delay grows once per round"
        " of the list, up to --reconnect-max. A subscription the broker refuses is logged"
        " with its cause and retried on the same connection. --broker mqtt+srv://DOMAIN takes"
        " the nodes from DNS SRV records (_mqtt._tcp.DOMAIN; needs pip install"
        " 'setpoint[srv]') and asks DNS again when every node failed. See docs/scale-out.md."
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "keygen"),
        default="run",
        help="run the agent (default), or keygen: make this device's age identity for sealed"
        " secrets and print its recipient",
    )
    # Required for `run` (checked in run(): `keygen` needs none of them).
    parser.add_argument("--device", help="this device's id")
    add_broker_arguments(parser)
    parser.add_argument(
        "--trust",
        action="append",
        type=Path,
        metavar="PUBFILE",
        help="a trusted fleet public key (PEM); repeat to trust several (key rotation)",
    )
    parser.add_argument(
        "--threshold", type=int, default=1, help="valid signatures needed (default 1)"
    )
    parser.add_argument("--root", type=Path, help="the device root to manage")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the shim keeps its state, private to it and outside the root (default"
        " /var/lib/setpoint/DEVICE as root, else ~/.local/state/setpoint/shim/DEVICE)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="device-local policy file, JSON or INI (e.g. allow_commands = true)",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=900.0, help="seconds between unchanged reports"
    )
    parser.add_argument(
        "--observe-interval",
        type=float,
        default=60.0,
        help="seconds between full looks at the device's files and settings (default 60);"
        " inotify reports a change at once, this is the safety net, and the only way where"
        " inotify is unavailable",
    )
    parser.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not use inotify; poll every --observe-interval (a root on a network file"
        " system, where inotify misses other hosts' writes)",
    )
    parser.add_argument(
        "--skew", type=float, default=300.0, help="clock skew tolerated on expiry (seconds)"
    )
    parser.add_argument(
        "--reconnect-min", type=float, default=1.0, help="first reconnect delay (seconds)"
    )
    parser.add_argument(
        "--reconnect-max",
        type=float,
        default=30.0,
        help="longest reconnect delay (seconds, default 30); with several --broker nodes the"
        " delay grows once per round of the list",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=15.0,
        help="seconds to wait for a node's TCP/TLS connection and CONNACK before trying the"
        " next (default 15, above a clustered engine's election stall)",
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        default=60,
        help="MQTT keepalive (seconds, default 60): a broker (or a clustered engine's node)"
        " that stops answering is noticed after 1.5 keepalives, and the broker publishes"
        " this device's will as long after it went silent; lower it where a frozen node"
        " must not hold the device for minutes, at the cost of a ping per keepalive",
    )
    parser.add_argument(
        "--retry-base",
        type=float,
        default=10.0,
        help="first delay before a failed apply is retried",
    )
    parser.add_argument("--client-id", help="MQTT client id (default setpoint-shim-DEVICE)")
    parser.add_argument(
        "--mqtt-version",
        choices=("5", "3.1.1"),
        default="5",
        help="MQTT protocol (default 5, falling back to 3.1.1 if the broker refuses it)",
    )
    parser.add_argument(
        "--reset-floors",
        action="store_true",
        help="forget version floors once (recovery after a compromised signing key)",
    )
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def _setup_logging(as_json: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        from setpoint.kit.logjson import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)


def defer_urllib_request() -> None:
    """Import ``urllib.request`` when it is first used, not when paho imports it.

    paho imports it for one purpose, finding an ``mqtt_proxy`` when PySocks is installed;
    with it come ``http.client`` and ``email``: about 2 MB of a device's memory, for nothing
    on most devices. A placeholder module stands in for it until an attribute is asked for,
    then the real module replaces it (``importlib.util.LazyLoader`` cannot do this: the
    ``import`` statement itself makes it load). Only in the shim's own process; a module
    already imported is left as it is.
    """
    import importlib
    import importlib.util
    import types

    name = "urllib.request"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)

    class Deferred(types.ModuleType):
        def __getattr__(self, attr: str) -> Any:
            if sys.modules.get(name) is self:
                del sys.modules[name]
            return getattr(importlib.import_module(name), attr)

    placeholder = Deferred(name)
    placeholder.__spec__ = spec
    sys.modules[name] = placeholder
    import urllib

    urllib.request = placeholder  # type: ignore[attr-defined]


def hide_dnspython_from_paho(broker: str) -> None:
    """Keep paho from importing dnspython when ``--broker`` names no ``+srv`` domain.

    paho imports ``dns.resolver`` whenever dnspython is installed, for its own
    ``connect_srv``, which the shim does not use (it resolves ``mqtt+srv://`` itself, in
    :mod:`setpoint.kit.brokers`); with it come ``email`` and ``csv``, memory a device
    spends for nothing. Only in the shim's own process, and only when no ``+srv`` URL
    needs dnspython.
    """
    if "+srv://" not in broker:
        sys.modules.setdefault("dns", None)  # type: ignore[arg-type]


def keygen(args: argparse.Namespace) -> int:
    """Make (or keep) the device's age identity; print its recipient on stdout."""
    from setpoint.device_shim import ConfigError, unsealing
    from setpoint.device_shim.config import default_state_dir

    if args.state_dir is None and args.device is None:
        print(
            "setpoint shim keygen: pass --state-dir DIR, or --device ID for the default"
            " state directory (never under the root)",
            file=sys.stderr,
        )
        return 2
    state_dir = args.state_dir if args.state_dir is not None else default_state_dir(args.device)
    try:
        recipient, created = unsealing.generate(state_dir)
    except (OSError, ConfigError) as exc:
        print(f"setpoint shim keygen: {exc}", file=sys.stderr)
        return 1
    path = state_dir / unsealing.IDENTITY_FILE
    if created:
        print(f"wrote {path} (mode 0600, never leaves this device)", file=sys.stderr)
    else:
        print(f"{path} exists: kept it (its recipient follows)", file=sys.stderr)
    print("commit the recipient as 'recipient:' in the device's file:", file=sys.stderr)
    print(recipient)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "keygen":
        return keygen(args)
    defer_urllib_request()
    hide_dnspython_from_paho(args.broker or "")
    missing = [f"--{name}" for name in _RUN_NEEDS if not getattr(args, name)]
    if missing:
        print(f"setpoint shim: the following arguments are required: {', '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 2
    from setpoint.device_shim import (
        Agent,
        BrokerSettings,
        DevicePolicy,
        ShimConfig,
        ShimError,
        load_policy,
    )

    _setup_logging(args.log_json, args.log_level)
    try:
        url, *others = brokers_from_args(args)
        if any(other.tls != url.tls for other in others):
            raise CommandError(
                f"--broker {args.broker!r}: the nodes of one cluster share their TLS settings;"
                " use mqtts:// for every node or for none"
            )
        policy = load_policy(args.config) if args.config else DevicePolicy()
        config = ShimConfig(
            device=args.device,
            root=args.root,
            trust_files=tuple(args.trust),
            broker=BrokerSettings(
                host=url.host,
                port=url.port,
                tls=url.tls,
                username=url.username,
                password=url.password,
                ca=args.ca,
                cert=args.cert,
                key=args.client_key,
                others=tuple((other.host, other.port) for other in others),
                discovery=discovery_of(args.broker),
            ),
            state_dir=args.state_dir,
            policy=policy,
            threshold=args.threshold,
            heartbeat=args.heartbeat,
            observe_interval=args.observe_interval,
            watch=args.watch,
            skew=args.skew,
            prefix=args.prefix,
            client_id=args.client_id,
            mqtt_version=args.mqtt_version,
            reconnect_min=args.reconnect_min,
            reconnect_max=args.reconnect_max,
            connect_timeout=args.connect_timeout,
            keepalive=args.keepalive,
            retry_base=args.retry_base,
            reset_floors=args.reset_floors,
        )
        agent = Agent(config)
    except (CommandError, ShimError, OSError) as exc:
        print(f"setpoint shim: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("setpoint.shim").info("signal %d: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.run()
    except ShimError as exc:
        print(f"setpoint shim: {exc}", file=sys.stderr)
        return 2
    return 0
