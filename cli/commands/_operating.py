"""What ``rollout``, ``approve`` and ``promote`` share: the retained rollout views and
signed operator commands (see ``setpoint.proto.approvals``)."""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from setpoint.proto import approvals, envelopes, status

from ._common import CommandError
from ._fleetview import Reader

REPLY_TIMEOUT = 10.0


def views(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The retained rollout status per group and gate status per ring."""
    from setpoint.proto.topics import Topics

    topics = Topics(args.prefix)
    reader = Reader(args, [topics.all_group_rollout(), topics.all_ring_gates()], "rollout")
    try:
        messages = reader.snapshot()
    finally:
        reader.close()
    groups: dict[str, Any] = {}
    rings: dict[str, Any] = {}
    for topic, payload in messages.items():
        body = json.loads(payload)
        if topic.endswith("/rollout"):
            groups[body["group"]] = body
        else:
            rings[body["ring"]] = body
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
