"""``setpoint shim``: run the device agent until SIGTERM or SIGINT.

    setpoint shim --device ID --broker URL --trust PUBFILE [--trust PUBFILE ...] --root DIR
                  [--state-dir DIR] [--config FILE] [--threshold N] [--heartbeat S]
                  [--observe-interval S] [--skew S] [--username U] [--password-file F]
                  [--prefix P] [--log-json] [--reset-floors]

The password comes from ``SETPOINT_MQTT_PASSWORD`` or ``--password-file``, never from the
command line. A clean stop publishes ``offline`` presence and exits 0; a bad setting exits 2
with a message that says what to fix. Imports only the shim's side.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ._common import CommandError, add_broker_arguments, broker_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", required=True, help="this device's id")
    add_broker_arguments(parser)
    parser.add_argument(
        "--trust",
        action="append",
        required=True,
        type=Path,
        metavar="PUBFILE",
        help="a trusted fleet public key (PEM); repeat to trust several (key rotation)",
    )
    parser.add_argument(
        "--threshold", type=int, default=1, help="valid signatures needed (default 1)"
    )
    parser.add_argument("--root", required=True, type=Path, help="the device root to manage")
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
        default=5.0,
        help="seconds between looks at the device's files and settings (drift detection)",
    )
    parser.add_argument(
        "--skew", type=float, default=300.0, help="clock skew tolerated on expiry (seconds)"
    )
    parser.add_argument(
        "--reconnect-min", type=float, default=1.0, help="first reconnect delay (seconds)"
    )
    parser.add_argument(
        "--reconnect-max", type=float, default=120.0, help="longest reconnect delay (seconds)"
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, sort_keys=True)


def _setup_logging(as_json: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
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
        url = broker_from_args(args)
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
            ),
            state_dir=args.state_dir,
            policy=policy,
            threshold=args.threshold,
            heartbeat=args.heartbeat,
            observe_interval=args.observe_interval,
            skew=args.skew,
            prefix=args.prefix,
            client_id=args.client_id,
            mqtt_version=args.mqtt_version,
            reconnect_min=args.reconnect_min,
            reconnect_max=args.reconnect_max,
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
