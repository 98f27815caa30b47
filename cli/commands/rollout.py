"""``setpoint rollout status [GROUP] | pause GROUP | resume GROUP``: rollouts by group.

``status`` reads the controller's retained ``groups/+/rollout`` and ``rings/+/gate``
statuses (state, why, what is missing, batches). ``pause`` and ``resume`` send a command
signed with an operator key listed in ``fleet.yaml`` and print the controller's reply.
"""

from __future__ import annotations

import argparse
import json
import sys

from setpoint.proto import rollout_status

from . import _operating
from ._common import CommandError, add_broker_arguments
from ._fleetview import add_protocol_argument, printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("status", "pause", "resume"))
    parser.add_argument("group", nargs="?", help="a group id (all groups for status)")
    parser.add_argument("--key", help="operator private key (PEM) for pause/resume")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_broker_arguments(parser)
    add_protocol_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "status":
            return _status(args)
        if not args.group or not args.key:
            raise CommandError(f"rollout {args.action} needs a GROUP and --key OPERATOR_KEY")
        reply = _operating.send(args, _operating.new_command(args.action, group=args.group))
    except CommandError as exc:
        print(f"setpoint rollout: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    else:
        print(f"{reply.get('action')}: {reply.get('group', '')} {reply.get('reason', '')}".strip())
    return 0 if reply.get("action") in ("paused", "resumed") else 1


def _status(args: argparse.Namespace) -> int:
    groups, rings = _operating.views(args)
    if args.group:
        if args.group not in groups:
            raise CommandError(f"no rollout status for group {args.group!r}")
        groups = {args.group: groups[args.group]}
    if args.json:
        body = {
            "groups": {g: rollout_status.rollout_to_dict(v) for g, v in groups.items()},
            "rings": {r: rollout_status.gate_to_dict(v) for r, v in rings.items()},
        }
        print(json.dumps(body, sort_keys=True))
        return 0
    for ring, gate in sorted(rings.items()):
        print(
            f"ring {printable(ring)} (from {printable(gate.source)}): {gate.state}:"
            f" {printable(gate.reason)}"
        )
    for gid, group in sorted(groups.items()):
        head = f"group {printable(gid)} [{printable(group.branch)}] v{group.version}: {group.state}"
        print(f"{head}{': ' + printable(group.reason) if group.reason else ''}")
        for batch in group.batches:
            released = "released" if batch.released_at else "not released (pending)"
            print(
                f"  batch {batch.batch}: {printable(', '.join(batch.devices))}: {released};"
                f" in sync {len(batch.in_sync)}/{len(batch.devices)}"
                + (f"; failed {printable(', '.join(batch.failed))}" if batch.failed else "")
                + (f"; offline {printable(', '.join(batch.offline))}" if batch.offline else "")
            )
    return 0
    for ring, gate in sorted(rings.items()):
        print(f"ring {ring} (from {gate['from']}): {gate['state']}: {gate['reason']}")
    for gid, body in sorted(groups.items()):
        head = f"group {gid} [{body['branch']}] v{body.get('version')}: {body['state']}"
        print(f"{head}{': ' + body['reason'] if body.get('reason') else ''}")
        for batch in body.get("batches", []):
            released = "released" if batch["released_at"] else "not released (pending)"
            print(
                f"  batch {batch['batch']}: {', '.join(batch['devices'])}: {released};"
                f" in sync {len(batch['in_sync'])}/{len(batch['devices'])}"
                + (f"; failed {', '.join(batch['failed'])}" if batch["failed"] else "")
                + (f"; offline {', '.join(batch['offline'])}" if batch["offline"] else "")
            )
    return 0
