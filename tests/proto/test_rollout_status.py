"""The typed rollout and gate statuses: round trips, bounded decoding, clear refusals."""

from __future__ import annotations

import json

import pytest

from setpoint.proto import rollout_status as rs
from setpoint.proto.errors import PayloadTooLarge, SchemaError
from setpoint.proto.topics import Topics

ROLLOUT = rs.RolloutStatus(
    group="canaries",
    branch="canary",
    state="rolling",
    reason="batch 1/2: 0/1 in sync (need 1)",
    version=3,
    commit="c" * 40,
    tree="t" * 40,
    window="Mon-Fri 09:00-17:00 UTC",
    batches=(
        rs.Batch(1, ("can-1",), released_at=10.0, in_sync=(), offline=("can-1",)),
        rs.Batch(2, ("can-2",)),
    ),
    rollout=rs.Run(3, "c" * 40, "d" * 64, halted=None, done_at=None, closed=None),
    time=12.5,
)
GATE = rs.GateStatus(
    ring="production",
    source="canary",
    commit="c" * 40,
    tree="t" * 40,
    state="waiting",
    gate=rs.GateRule("canary", in_sync=1.0, healthy_for=600, approval=True),
    reason="waiting for 600s healthy",
    missing=("healthy_for",),
    evidence={
        "t" * 40: rs.Evidence(ran_at=1.0, in_sync=2, devices=2, unhealthy=(("a", "b", "c"),))
    },
    passed=("p" * 40,),
    time=3.0,
)


def test_round_trips() -> None:
    assert rs.rollout_from_json(rs.rollout_to_json(ROLLOUT)) == ROLLOUT
    assert rs.gate_from_json(rs.gate_to_json(GATE)) == GATE
    body = json.loads(rs.gate_to_json(GATE))
    assert (body["type"], body["from"], body["gate"]["approval"]) == ("gate-status", "canary", True)
    assert json.loads(rs.rollout_to_json(ROLLOUT))["type"] == "rollout-status"


def test_decoding_is_bounded() -> None:
    with pytest.raises(PayloadTooLarge):
        rs.rollout_from_json(b" " * (rs.MAX_ROLLOUT_STATUS_BYTES + 1))
    body = rs.rollout_to_dict(ROLLOUT)
    body["missing"] = ["x"] * (rs.MAX_LIST + 1)
    with pytest.raises(SchemaError, match="'missing' is not a list of at most"):
        rs.rollout_from_dict(body)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"state": "exploded"}, "rollout state 'exploded' is unknown (known: idle, gated"),
        ({"group": 7}, "rollout status: 'group' is not a string"),
        ({"paused": "yes"}, "rollout status: 'paused' is not true or false"),
        ({"version": 1.5}, "rollout status: 'version' is not an integer or null"),
        ({"batches": [{"devices": []}]}, "rollout status batch: field 'batch' is missing"),
    ],
)
def test_a_malformed_rollout_status_is_refused_with_the_field_named(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(SchemaError, match=message.replace("(", r"\(")):
        rs.rollout_from_dict({**rs.rollout_to_dict(ROLLOUT), **change})


def test_a_malformed_gate_status_is_refused_with_the_field_named() -> None:
    body = rs.gate_to_dict(GATE)
    with pytest.raises(SchemaError, match="gate state 'ajar' is unknown"):
        rs.gate_from_dict({**body, "state": "ajar"})
    del body["from"]
    with pytest.raises(SchemaError, match="gate status: field 'from' is missing"):
        rs.gate_from_dict(body)


def test_the_topics_name_what_they_carry() -> None:
    topics = Topics("fleet/v1")
    assert topics.parse(topics.group_rollout("canaries")).kind == "group-rollout"
    ref = topics.parse(topics.ring_gate("production"))
    assert (ref.kind, ref.name) == ("ring-gate", "production")
