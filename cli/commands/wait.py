"""``setpoint wait``: block until the fleet, a group or a device has converged.

    setpoint wait [--for in_sync] [--group G | --device D] [--commit SHA] [--timeout 5m]

What CI calls after a push (like ``argocd app wait`` or ``flux reconcile --with-source``).
Reads the controller's retained drift statuses (``devices/+/drift``) and group summaries
(``groups/+/status``) through the protocol's codecs and re-checks on every change:

* every device in scope is ``in_sync`` (for ``--commit``: on a commit that starts with SHA,
  so a short id from ``git rev-parse --short`` works);
* a group's summary counts as many devices as have a drift status (a device that has not
  been judged yet is waited for, not forgotten);
* with ``--commit``, a commit the controller refused (its retained repository status says
  so) ends the wait at once with the problems: it will never converge.

Exit 0 once converged; 1 on a refused commit, or on timeout with every device that is not
there, its state and why (stderr, or the ``--json`` object on stdout); 2 if the broker
cannot be read or an argument is wrong. Needs nothing but paho-mqtt.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from setpoint.proto import repository as repo_wire
from setpoint.proto import status as wire
from setpoint.proto.errors import ProtocolError
from setpoint.proto.repository import BranchStatus, RepositoryStatus
from setpoint.proto.status import DriftStatus, GroupStatus
from setpoint.proto.topics import Topics, validate_id

from . import _fleetview as view
from ._common import CommandError, add_broker_arguments

CONDITIONS = ("in_sync",)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """``300``, ``90s``, ``5m``, ``1h``, ``500ms`` -> seconds (argparse type)."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if not match or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use a duration such as 90s, 5m or 1h")
    return seconds


def commit_prefix(text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,40}", value):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a commit id, full or its first 4+ hex digits (git rev-parse HEAD)"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--for",
        dest="condition",
        choices=CONDITIONS,
        default="in_sync",
        help="the condition to wait for (default in_sync)",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--group", help="wait for this group only")
    scope.add_argument("--device", help="wait for this device only")
    parser.add_argument(
        "--commit",
        type=commit_prefix,
        help="each device in sync on a commit starting with SHA, the commit that last"
        " changed what it runs (a short id works: $(git rev-parse --short HEAD))",
        metavar="SHA",
    )
    parser.add_argument(
        "--timeout",
        type=duration,
        default=300.0,
        help="give up after this long: 90s, 5m, 1h (default 5m)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_broker_arguments(parser)


@dataclass(frozen=True)
class Missing:
    device: str
    group: str | None
    state: str
    why: str


@dataclass(frozen=True)
class Verdict:
    """Where the scope stands: converged or not, and who is not there yet."""

    scope: str
    commit: str | None
    devices: int
    ready: tuple[str, ...]
    missing: tuple[Missing, ...] = ()
    unjudged: tuple[str, ...] = field(default=())
    refused: tuple[BranchStatus, ...] = ()

    @property
    def converged(self) -> bool:
        return not self.missing and not self.unjudged and not self.refused and self.devices > 0

    @property
    def final(self) -> bool:
        """Nothing more can change the outcome: converged, or the commit was refused."""
        return self.converged or bool(self.refused)


def judge(
    groups: Iterable[GroupStatus],
    devices: Iterable[DriftStatus],
    *,
    group: str | None = None,
    device: str | None = None,
    commit: str | None = None,
    repository: RepositoryStatus | None = None,
) -> Verdict:
    """Pure: has the scope (the fleet, ``group`` or ``device``) converged on ``commit``?"""
    summaries = {g.group: g for g in groups}
    statuses = list(devices)
    if device is not None:
        scope = f"device {device}"
        chosen = [d for d in statuses if d.device == device]
    elif group is not None:
        scope = f"group {group}"
        chosen = [d for d in statuses if d.group == group]
        summaries = {group: summaries[group]} if group in summaries else {}
    else:
        scope = "the fleet"
        chosen = statuses
    ready, missing = [], []
    for d in sorted(chosen, key=lambda d: d.device):
        why = "; ".join(f"{r.id}: {r.why}" for r in d.resources) or d.reason
        if d.state != "in_sync":
            missing.append(Missing(d.device, d.group, d.state, why))
        elif commit is not None and not (d.commit or "").startswith(commit):
            on = (d.commit or "no commit")[:12]
            missing.append(Missing(d.device, d.group, d.state, f"in sync on {on}, not {commit}"))
        else:
            ready.append(d.device)
    unjudged = []
    if device is not None and not chosen:
        unjudged.append(f"device {device} has no drift status yet (is it in the fleet?)")
    if group is not None and group not in summaries and not chosen:
        unjudged.append(f"group {group} has no status yet (is it in the fleet?)")
    for name, summary in sorted(summaries.items()):
        if device is not None:
            break
        judged = sum(1 for d in chosen if d.group == name)
        if summary.devices > judged:
            unjudged.append(
                f"group {name}: {summary.devices - judged} of {summary.devices} devices"
                " have no drift status yet"
            )
    if device is None and group is None and not chosen and not summaries:
        unjudged.append("no group or device status on the broker (is the controller running?)")
    refused: tuple[BranchStatus, ...] = ()
    if commit is not None and repository is not None:
        refused = tuple(b for b in repository.refused if b.head.startswith(commit))
    return Verdict(
        scope, commit, len(chosen), tuple(ready), tuple(missing), tuple(unjudged), refused
    )


def read(
    messages: dict[str, bytes], topics: Topics
) -> tuple[list[GroupStatus], list[DriftStatus], RepositoryStatus | None]:
    groups, devices, repository = [], [], None
    for topic, payload in sorted(messages.items()):
        try:
            if topic == topics.repository_status():
                repository = repo_wire.from_json(payload)
                continue
            kind = topics.parse(topic).kind
            if kind == "group-status":
                groups.append(wire.group_status_from_json(payload))
            elif kind == "device-drift":
                devices.append(wire.drift_from_json(payload))
        except ProtocolError as exc:
            print(f"setpoint wait: ignoring {topic}: {exc}", file=sys.stderr)
    return groups, devices, repository


def as_dict(verdict: Verdict, condition: str, waited: float) -> dict[str, Any]:
    return {
        "converged": verdict.converged,
        "for": condition,
        "scope": verdict.scope,
        "commit": verdict.commit,
        "devices": verdict.devices,
        "ready": list(verdict.ready),
        "missing": [asdict(m) for m in verdict.missing],
        "unjudged": list(verdict.unjudged),
        "refused": [
            {"branch": b.branch, "head": b.head, "problems": [str(p) for p in b.problems]}
            for b in verdict.refused
        ],
        "waited": round(waited, 3),
    }


def report(verdict: Verdict, timeout: float) -> list[str]:
    """The lines printed on failure: the refused commit and its problems, or (on timeout)
    what is missing, one device per line."""
    if verdict.refused:
        lines = []
        for b in verdict.refused:
            lines.append(
                f"commit {b.head[:12]} on {b.branch} was refused by the controller; it will"
                " not converge: fix these and push again"
            )
            lines += [f"  {view.printable(str(p))}" for p in b.problems]
        return lines
    on = f" on {verdict.commit}" if verdict.commit else ""
    lines = [
        f"timed out after {timeout:g}s: {verdict.scope} has not converged{on}"
        f" ({len(verdict.ready)} of {verdict.devices} devices there)"
    ]
    rows = [[m.device, m.group or "-", m.state, view.printable(m.why)] for m in verdict.missing]
    lines += ["  " + line for line in view.table(rows)]
    lines += [f"  {view.printable(note)}" for note in verdict.unjudged]
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        for value, what in ((args.group, "group id"), (args.device, "device id")):
            if value is not None:
                validate_id(value, what)
    except ProtocolError as exc:
        print(f"setpoint wait: {exc}", file=sys.stderr)
        return 2
    topics = Topics(args.prefix)
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        reader = view.Reader(
            args,
            [topics.all_drift(), topics.all_group_status(), topics.repository_status()],
            "wait",
        )
    except CommandError as exc:
        print(f"setpoint wait: {exc}", file=sys.stderr)
        return 2
    try:
        messages = reader.snapshot()
        while True:
            groups, devices, repository = read(messages, topics)
            verdict = judge(
                groups,
                devices,
                group=args.group,
                device=args.device,
                commit=args.commit,
                repository=repository,
            )
            left = deadline - time.monotonic()
            if verdict.final or left <= 0:
                break
            reader.wait_change(min(left, 5.0))
            messages = reader.snapshot()
    except CommandError as exc:
        print(f"setpoint wait: {exc}", file=sys.stderr)
        return 2
    finally:
        reader.close()
    waited = time.monotonic() - started
    if args.json:
        print(json.dumps(as_dict(verdict, args.condition, waited), indent=2, sort_keys=True))
    elif verdict.converged:
        on = f" on {verdict.commit}" if verdict.commit else ""
        print(
            f"{verdict.scope} converged{on}: {verdict.devices} device(s) {args.condition}"
            f" after {waited:.1f}s"
        )
    else:
        lines = report(verdict, args.timeout)
        print("\n".join(line if line.startswith("  ") else f"setpoint wait: {line}"
                        for line in lines), file=sys.stderr)  # fmt: skip
    return 0 if verdict.converged else 1
