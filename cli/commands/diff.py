"""``setpoint diff DEVICE``: what is desired against what the device reports, per resource.

    setpoint diff kiosk-01 --broker mqtt://host:1883 [--trust signing.pub] [--json]

Reads the retained device bundle, its group's bundle and the device's report, merges the
bundles exactly as the device does (``bundles.effective``) and prints one line per
resource: what is desired (path and mode, setting key and value, command check) with its
digest, and what the device reports (status, observed digest, detail). With ``--trust``
the bundles' signatures are verified; without it they are decoded unverified and the
output says so. Secret setting values are never printed.

Exit 0: the device reports exactly what is desired; 1: it differs (like ``diff``);
2: cannot tell (no bundle, no report yet, broker unreachable, bad signature). A device
that never reported still gets its desired side printed (and ``"reported": null``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from setpoint.proto import diffs, reports
from setpoint.proto.errors import ProtocolError
from setpoint.proto.topics import Topics, validate_id

from . import _fleetview as view
from ._common import CommandError, add_broker_arguments, load_trust


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", help="the device id")
    add_broker_arguments(parser)
    parser.add_argument(
        "--trust", type=Path, action="append", default=[], help="verify with this public key"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-color", action="store_true", help="no colour even on a terminal")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CommandError as exc:
        print(f"setpoint diff: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    try:
        device = validate_id(args.device, "device id")
    except ProtocolError as exc:
        raise CommandError(str(exc)) from None
    trusted = load_trust(args.trust)
    topics = Topics(args.prefix)
    reader = view.Reader(args, diffs.topics_for(device, topics), "diff")
    try:
        messages = reader.snapshot()
    finally:
        reader.close()
    try:
        found = diffs.from_retained(device, messages, topics, trusted)
    except diffs.Unavailable as exc:
        raise CommandError(str(exc)) from None
    except ProtocolError as exc:
        raise CommandError(f"{device}: {exc}") from None
    group_id, group_bundle, device_bundle = found.group, found.group_bundle, found.device_bundle
    report, rows, differs = found.report, found.rows, found.differs
    applied_g = report.applied_group if report else None
    applied_d = report.applied_device if report else None
    if args.json:
        print(
            json.dumps(
                {
                    "device": device,
                    "group": group_id,
                    "mode": group_bundle.mode,
                    "verified": trusted is not None,
                    "desired": {"group_version": group_bundle.version,
                                "device_version": device_bundle.version,
                                "commit": device_bundle.commit},
                    "reported": None if report is None else {
                        "group_version": applied_g.version if applied_g else None,
                        "device_version": applied_d.version if applied_d else None,
                        "seq": report.seq, "time": report.time},
                    "resources": rows,
                    "differs": differs,
                },
                indent=2,
                sort_keys=True,
            )
        )  # fmt: skip
        return _verdict(report, differs)
    colour = view.use_colour(args)
    note = "" if trusted is not None else "  (signatures not verified: pass --trust signing.pub)"
    print(
        f"{device} in {group_id} ({group_bundle.mode}): desired group v{group_bundle.version},"
        f" device v{device_bundle.version} @ {device_bundle.commit[:12]}{note}"
    )
    if report is None:
        print(view.paint(colour, "31", "the device has not reported yet"))
    else:
        print(
            f"reported: group v{applied_g.version if applied_g else '-'},"
            f" device v{applied_d.version if applied_d else '-'}, report #{report.seq}"
            f" from {view.ago(report.time)}"
        )
    header = ["RESOURCE", "KIND", "DESIRED", "REPORTED", "VERDICT"]
    plain, lines = [header], [[view.paint(colour, "1", h) for h in header]]
    for r in rows:
        reported = (
            "-"
            if r["reported_status"] is None
            else f"{r['reported_status']} {(r['reported_digest'] or '')[:8]}".strip()
        )
        if r["detail"]:
            reported += f" ({r['detail']})"
        desired_text = "-" if r["desired"] is None else f"{r['desired']} {r['desired_digest'][:8]}"
        cells = [r["id"], r["kind"], desired_text, reported]
        good = r["verdict"] == "same"
        plain.append([*cells, r["verdict"]])
        lines.append([*cells, view.paint(colour, "32" if good else "31", r["verdict"])])
    print("\n".join(view.table(lines, plain)))
    return _verdict(report, differs)


def _verdict(report: reports.Report | None, differs: bool) -> int:
    """2 when there is no report to compare with (cannot tell), else like ``diff``."""
    if report is None:
        return 2
    return 1 if differs else 0
