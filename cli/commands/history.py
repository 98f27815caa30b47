"""``setpoint history [TARGET]``: the controller's audit log of publications.

Exit 0 with the entries (or "no publications recorded" for a state directory whose
controller has published nothing yet); 1 when TARGET has no publication in the log (the
targets that have are listed); 2 when the state directory does not exist (a typo, or the
controller keeps its state elsewhere: pass ``--state-dir``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path

from ._common import CommandError, add_context_argument, require_controller


def state_base() -> Path:
    """Where the controllers' default state directories live, one per fleet."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "setpoint" / "controller"


def explicit_state_dir() -> Path | None:
    value = os.environ.get("SETPOINT_STATE_DIR")
    return Path(value) if value else None


def default_state_dir() -> Path:
    """``SETPOINT_STATE_DIR``, or the only fleet's directory under :func:`state_base`."""
    explicit = explicit_state_dir()
    if explicit is not None:
        return explicit
    base = state_base()
    fleets = sorted(p.parent for p in base.glob("*/fleet.json"))
    if len(fleets) > 1:
        names = "\n".join(f"  {p}: {_fleet_of(p)}" for p in fleets)
        raise CommandError(
            f"several fleets have a state directory here; pass --state-dir:\n{names}"
        )
    return fleets[0] if fleets else base


def _fleet_of(directory: Path) -> str:
    try:
        raw = json.loads((directory / "fleet.json").read_bytes())
        return f"repository {raw['repository']}, broker {raw['broker']}, prefix {raw['prefix']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown fleet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", nargs="?", help="a group or device id, or group/<id> or device/<id>"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the controller's state directory (env SETPOINT_STATE_DIR)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, default=0, help="only the last N entries")
    add_context_argument(parser)


def run(args: argparse.Namespace) -> int:
    audit = require_controller("setpoint.controller.audit")
    try:
        state_dir = args.state_dir or default_state_dir()
    except CommandError as exc:
        print(f"setpoint history: {exc}", file=sys.stderr)
        return 2
    if not state_dir.is_dir():
        print(
            f"setpoint history: no controller state directory {state_dir}: pass the"
            " controller's --state-dir (or set SETPOINT_STATE_DIR)",
            file=sys.stderr,
        )
        return 2
    entries = list(audit.read(state_dir / audit.AUDIT_FILE, args.target))
    if args.target and not entries:
        known = sorted({str(e.get("target")) for e in audit.read(state_dir / audit.AUDIT_FILE)})
        ids = sorted({str(e.get("id")) for e in audit.read(state_dir / audit.AUDIT_FILE)})
        close = difflib.get_close_matches(args.target, known + ids, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        more = f" and {len(known) - 10} more" if len(known) > 10 else ""
        listing = f" (targets: {', '.join(known[:10])}{more})" if known else " (the log is empty)"
        print(
            f"setpoint history: no publication of {args.target!r} in {state_dir}{hint}{listing}",
            file=sys.stderr,
        )
        return 1
    if args.limit > 0:
        entries = entries[-args.limit :]
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    if not entries:
        print(f"no publications recorded in {state_dir}")
        return 0
    print(f"{'TIME':19}  {'TARGET':32}  {'VERSION':>7}  {'REASON':8}  {'COMMIT':12}  AUTHOR")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e.get("time", 0))))
        version = "" if e.get("version") is None else str(e["version"])
        commit = (e.get("commit") or "")[:12]
        print(
            f"{when:19}  {e.get('target', ''):32}  {version:>7}  {e.get('reason', ''):8}"
            f"  {commit:12}  {e.get('author', '')}"
        )
    return 0
