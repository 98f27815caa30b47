"""``setpoint approve RING [--tree TREE] --key OPERATOR_KEY``: approve content for a ring.

Signs an approval of the content (git tree) waiting at the gate of RING (by default the
tree the gate reports) with an operator key listed under ``operators:`` in ``fleet.yaml``,
and prints the controller's reply. An unsigned or foreign approval changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import _operating
from ._common import CommandError, add_broker_arguments
from ._fleetview import add_protocol_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ring", help="the gated ring (branch), e.g. production")
    parser.add_argument("--tree", help="the content to approve (default: what waits)")
    parser.add_argument("--key", required=True, help="operator private key (PEM)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_broker_arguments(parser)
    add_protocol_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        tree = args.tree
        if not tree:
            _groups, rings = _operating.views(args)
            if args.ring not in rings:
                raise CommandError(f"ring {args.ring!r} has no gate status (is it gated?)")
            tree = rings[args.ring].tree
        command = _operating.new_command("approve", ring=args.ring, tree=tree)
        reply = _operating.send(args, command)
    except CommandError as exc:
        print(f"setpoint approve: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    elif reply.get("action") == "approved":
        print(f"approved {tree[:12]} for {args.ring} (by {reply.get('by')})")
    else:
        print(f"refused: {reply.get('reason')}")
    return 0 if reply.get("action") == "approved" else 1
