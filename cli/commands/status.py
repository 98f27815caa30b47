"""``setpoint status``: fleet, group and device convergence, from the retained topics.

    setpoint status --broker mqtt://host:1883 [--prefix P] [--json] [--watch]

First the controller's verdict on each branch's head commit (accepted, or refused with
every problem and its file and line: ``branch main: HEAD 746209c5e1a2 refused:
groups/kiosks.yaml:5: resource 'motd': unknown kind 'fiel' ...``), then per group one line
(mode, version and commit, devices, convergence, counts per state), then every device that
is not in sync, with why and since when. ``--json`` prints ``{"repository": {...},
"groups": [...], "devices": [...]}`` (the retained JSON as it is); ``--watch`` redraws
whenever something changes, until Ctrl-C. Colour only on a terminal. Exit 0.

Reads only what the controller retains (``repository/status``, ``groups/+/status``,
``devices/+/drift``); needs nothing but paho-mqtt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from setpoint.proto import repository
from setpoint.proto import status as wire
from setpoint.proto.errors import ProtocolError

from . import _fleetview as view
from ._common import CommandError, add_broker_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--watch", action="store_true", help="redraw on every change (Ctrl-C)")
    parser.add_argument("--no-color", action="store_true", help="no colour even on a terminal")


def collect(messages: dict[str, bytes], prefix: str) -> tuple[list[Any], list[Any]]:
    from setpoint.proto.topics import Topics

    topics = Topics(prefix)
    groups, devices = [], []
    for topic, payload in sorted(messages.items()):
        if topic == topics.repository_status():
            continue
        try:
            ref = topics.parse(topic)
            if ref.kind == "group-status":
                groups.append(wire.group_status_from_json(payload))
            elif ref.kind == "device-drift":
                devices.append(wire.drift_from_json(payload))
        except ProtocolError as exc:
            print(f"setpoint status: ignoring {topic}: {exc}", file=sys.stderr)
    return groups, devices


def verdicts(messages: dict[str, bytes], prefix: str) -> repository.RepositoryStatus | None:
    """The controller's retained verdicts on each branch, if it published any."""
    from setpoint.proto.topics import Topics

    topic = Topics(prefix).repository_status()
    payload = messages.get(topic)
    if not payload:
        return None
    try:
        return repository.from_json(payload)
    except ProtocolError as exc:
        print(f"setpoint status: ignoring {topic}: {exc}", file=sys.stderr)
        return None


def verdict_lines(verdicts: repository.RepositoryStatus | None, colour: bool) -> list[str]:
    """``branch main: HEAD 746209c5e1a2 accepted``, or ``refused:`` and every problem."""
    lines: list[str] = []
    for name, branch in sorted((verdicts.branches if verdicts else {}).items()):
        head = f"branch {view.printable(name)}: HEAD {view.printable(branch.head[:12])}"
        if branch.accepted:
            lines.append(f"{head} {view.paint(colour, '32', 'accepted')}")
            continue
        problems = [view.printable(str(p)) for p in branch.problems] or ["(no detail)"]
        lines.append(f"{head} {view.paint(colour, '31;1', 'refused')}: {problems[0]}")
        lines += [f"    {p}" for p in problems[1:]]
    return lines


def render(
    groups: list[Any],
    devices: list[Any],
    colour: bool,
    verdicts: repository.RepositoryStatus | None = None,
) -> list[str]:
    now = time.time()
    total = len(devices)
    in_sync = sum(1 for d in devices if d.state == "in_sync")
    pct = 100.0 * in_sync / total if total else 100.0
    lines = [
        view.paint(colour, "1", f"fleet: {total} devices in {len(groups)} groups,"
                   f" {in_sync} in sync ({pct:.1f}%)")
    ]  # fmt: skip
    lines += verdict_lines(verdicts, colour)
    header = ["GROUP", "MODE", "VERSION", "COMMIT", "DEVICES", "CONVERGED", "STATES"]
    plain, rows = [header], [[view.paint(colour, "1", h) for h in header]]
    for g in groups:
        counts = [(s, n) for s, n in g.counts.items() if n]
        cells = [
            view.printable(g.group),
            view.printable(g.mode),
            f"v{g.version}" if g.version is not None else "-",
            view.printable((g.commit or "-")[:12]),
            str(g.devices),
            f"{g.converged_pct:.1f}%",
        ]
        plain.append([*cells, " ".join(f"{s} {n}" for s, n in counts)])
        rows.append([*cells, " ".join(f"{view.state(colour, s)} {n}" for s, n in counts)])
    lines += view.table(rows, plain)
    behind = [d for d in devices if d.state != "in_sync"]
    if behind:
        lines.append("")
        lines.append(view.paint(colour, "1", f"not in sync ({len(behind)}):"))
        plain, rows = [], []
        for d in sorted(behind, key=lambda d: (d.group or "", d.device)):
            why = view.printable("; ".join(f"{r.id}: {r.why}" for r in d.resources) or d.reason)
            cells = [view.printable(d.device), view.printable(d.group or "-")]
            tail = [f"since {view.ago(d.since, now)}", why]
            plain.append([*cells, d.state, *tail])
            rows.append([*cells, view.state(colour, d.state), *tail])
        lines += ["  " + line for line in view.table(rows, plain)]
    elif devices:
        lines.append(view.paint(colour, "32", "every device is in sync"))
    return lines


def as_json(
    groups: list[Any], devices: list[Any], verdicts: repository.RepositoryStatus | None = None
) -> str:
    return json.dumps(
        {
            "repository": repository.to_dict(verdicts) if verdicts is not None else None,
            "groups": [json.loads(g.to_json()) for g in groups],
            "devices": [wire.drift_to_dict(d) for d in devices],
        },
        indent=2,
        sort_keys=True,
    )


def run(args: argparse.Namespace) -> int:
    try:
        from setpoint.proto.topics import Topics

        topics = Topics(args.prefix)
        reader = view.Reader(
            args,
            [topics.repository_status(), topics.all_group_status(), topics.all_drift()],
            "status",
        )
    except CommandError as exc:
        print(f"setpoint status: {exc}", file=sys.stderr)
        return 2
    colour = view.use_colour(args) and not args.json
    try:
        messages = reader.snapshot()
        while True:
            groups, devices = collect(messages, args.prefix)
            found = verdicts(messages, args.prefix)
            if args.json:
                print(as_json(groups, devices, found), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")
                print("\n".join(render(groups, devices, colour, found)), flush=True)
            if not args.watch:
                return 0
            reader.wait_change(None)
            time.sleep(0.2)  # let a burst of changes land before redrawing (display only)
            messages = reader.snapshot()
            if not sys.stdout.isatty():
                print("", flush=True)
    except CommandError as exc:
        print(f"setpoint status: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        reader.close()
