"""What ``rollout``, ``approve`` and ``promote`` share: the retained rollout views and
signed operator commands (see ``setpoint.proto.approvals``)."""

from __future__ import annotations

import argparse
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from setpoint.proto import approvals, envelopes, rollout_status, status

from ._common import CommandError
from ._fleetview import Reader, printable

REPLY_TIMEOUT = 10.0


def views(
    args: argparse.Namespace,
) -> tuple[dict[str, rollout_status.RolloutStatus], dict[str, rollout_status.GateStatus]]:
    """The retained rollout status per group and gate status per ring, read through their
    codecs (proto/SPEC.md 7.5, 7.6); one that does not decode is named and skipped."""
    from setpoint.proto.errors import ProtocolError
    from setpoint.proto.topics import Topics

    topics = Topics(args.prefix)
    reader = Reader(args, [topics.all_group_rollout(), topics.all_ring_gates()], "rollout")
    try:
        messages = reader.snapshot()
    finally:
        reader.close()
    groups: dict[str, rollout_status.RolloutStatus] = {}
    rings: dict[str, rollout_status.GateStatus] = {}
    for topic, payload in messages.items():
        try:
            ref = topics.parse(topic)
            if ref.kind == "group-rollout":
                group = rollout_status.rollout_from_json(payload)
                if group.group == ref.name:  # a status is about the group its topic names
                    groups[group.group] = group
            elif ref.kind == "ring-gate":
                ring = rollout_status.gate_from_json(payload)
                if ring.ring == ref.name:
                    rings[ring.ring] = ring
        except ProtocolError as exc:
            print(f"setpoint: ignoring {printable(topic)}: {exc}", file=sys.stderr)
    return groups, rings


def send(args: argparse.Namespace, command: approvals.OperatorCommand) -> dict[str, Any]:
    """Sign ``command`` with the operator key, publish it, return the controller's reply."""
    from setpoint.proto.topics import Topics

    try:
        key = envelopes.load_private_key(Path(args.key).read_bytes())
    except (OSError, ValueError) as exc:
        raise CommandError(f"operator key {args.key}: {exc}") from None
    topics = Topics(args.prefix)
    reader = Reader(args, [topics.event("rollout")], "operator")
    replies: list[dict[str, Any]] = []
    got = threading.Event()

    def on_event(topic: str, payload: bytes) -> None:
        event = status.event_from_json(payload)
        if event.get("nonce") == command.nonce or (
            event.get("action") == "refused" and "nonce" not in event
        ):
            replies.append(event)
            got.set()

    try:
        reader.snapshot()
        reader.follow(on_event)
        reader._client.publish(topics.operator_commands(), approvals.sign(command, [key]), qos=1)
        if not got.wait(REPLY_TIMEOUT):
            raise CommandError("no reply from the controller: is it running with rollouts?")
    finally:
        reader.close()
    return replies[0]


def new_command(action: str, **fields: Any) -> approvals.OperatorCommand:
    now = int(time.time())
    return approvals.OperatorCommand(
        action=action,  # type: ignore[arg-type]
        nonce=secrets.token_hex(8),
        issued_at=now,
        expires_at=now + 300,
        **fields,
    )
