"""``setpoint drift``: the devices that are not in sync now, or the live stream of drift events.

    setpoint drift --broker mqtt://host:1883            # current drift (retained statuses)
    setpoint drift --broker mqtt://host:1883 --follow   # one line per drift event, until Ctrl-C
    setpoint drift ... --json                           # JSON (one object per line with --follow)

Exit 0 (also when there is drift: that is data, not an error); 2 if the broker cannot be
read. Colour only on a terminal. Needs nothing but paho-mqtt.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from setpoint.proto import status as wire
from setpoint.proto.errors import ProtocolError
from setpoint.proto.topics import Topics

from . import _fleetview as view
from ._common import CommandError, add_broker_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="stream drift events")
    parser.add_argument("--all", action="store_true", help="list in-sync devices too")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-color", action="store_true", help="no colour even on a terminal")


def event_line(event: dict[str, Any], colour: bool) -> str:
    """One drift event as a readable line."""
    resources = event.get("resources") or []
    why = "; ".join(f"{r.get('id')}: {r.get('why')}" for r in resources) or event.get("reason", "")
    why = view.printable(str(why))
    previous = view.printable(str(event.get("previous") or "-"))
    when = view.clock(float(event.get("time", 0.0)))
    change = view.printable(str(event.get("change", "?")))
    mark = {"opened": "31", "resolved": "32", "changed": "33"}.get(change, "")
    device = view.printable(str(event.get("device")))
    group = view.printable(str(event.get("group") or "-"))
    head = (
        f"{when}  {view.paint(colour, mark, change.ljust(8))}  {device} ({group})"
        f"  {view.state(colour, previous)} ->"
        f" {view.state(colour, view.printable(str(event.get('state'))))}"
    )
    return f"{head}  {why}" if why else head


def current(args: argparse.Namespace, reader: view.Reader, colour: bool) -> int:
    topics = Topics(args.prefix)
    statuses = []
    for topic, payload in sorted(reader.snapshot().items()):
        try:
            if topics.parse(topic).kind == "device-drift":
                statuses.append(wire.drift_from_json(payload))
        except ProtocolError as exc:
            print(f"setpoint drift: ignoring {topic}: {exc}", file=sys.stderr)
    shown = [s for s in statuses if args.all or s.state != "in_sync"]
    if args.json:
        print(json.dumps([wire.drift_to_dict(s) for s in shown], indent=2, sort_keys=True))
        return 0
    if not shown:
        print(f"no drift: {len(statuses)} devices, all in sync" if statuses else "no devices")
        return 0
    plain, rows = [], []
    for s in shown:
        why = view.printable("; ".join(f"{r.id}: {r.why}" for r in s.resources) or s.reason)
        cells = [view.printable(s.device), view.printable(s.group or "-")]
        tail = [f"since {view.ago(s.since)}", why]
        plain.append([*cells, s.state, *tail])
        rows.append([*cells, view.state(colour, s.state), *tail])
    print("\n".join(view.table(rows, plain)))
    return 0


def follow(args: argparse.Namespace, reader: view.Reader, colour: bool) -> int:
    def show(topic: str, payload: bytes) -> None:
        try:
            event = wire.event_from_json(payload)
        except ProtocolError as exc:
            print(f"setpoint drift: ignoring a message on {topic}: {exc}", file=sys.stderr)
            return
        if args.json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            print(event_line(event, colour), flush=True)

    reader.follow(show)
    reader.snapshot()  # subscribed and flowing
    if not args.json:
        print(f"following drift events on {args.broker} (Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            reader.wait_change(None)
    except KeyboardInterrupt:
        return 0


def run(args: argparse.Namespace) -> int:
    topics = Topics(args.prefix)
    filters = [topics.event("drift")] if args.follow else [topics.all_drift()]
    colour = view.use_colour(args) and not args.json
    try:
        reader = view.Reader(args, filters, "drift")
    except CommandError as exc:
        print(f"setpoint drift: {exc}", file=sys.stderr)
        return 2
    try:
        return follow(args, reader, colour) if args.follow else current(args, reader, colour)
    except CommandError as exc:
        print(f"setpoint drift: {exc}", file=sys.stderr)
        return 2
    finally:
        reader.close()
