"""Topic builders and parsers: every topic round trips, hostile ids never make a topic."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from setpoint.proto import SHARDS, InvalidId, Topics, WrongShardError, shard_of, validate_id
from setpoint.proto.topics import DEFAULT_PREFIX, EVENT_TYPES, TopicRef, validate_prefix

T = Topics()

BUILDERS: dict[str, Callable[[str], str]] = {
    "group-desired": T.group_desired,
    "group-status": T.group_status,
    "device-desired": T.device_desired,
    "device-reported": T.device_reported,
    "device-presence": T.device_presence,
    "device-drift": T.device_drift,
    "device-command": T.device_command,
}

EXPECTED = {
    "group-desired": "setpoint/v1/groups/kiosks/desired",
    "group-status": "setpoint/v1/groups/kiosks/status",
    "device-desired": "setpoint/v1/devices/kiosks/desired",
    "device-reported": "setpoint/v1/shards/8/devices/kiosks/reported",
    "device-presence": "setpoint/v1/shards/8/devices/kiosks/presence",
    "device-drift": "setpoint/v1/devices/kiosks/drift",
    "device-command": "setpoint/v1/devices/kiosks/command",
}

HOSTILE_IDS: list[object] = [
    "a/b",
    "a+",
    "+",
    "#",
    "a#",
    "a\x00b",
    "Kiosk",
    "KIOSK-01",
    "kiosk 01",
    " kiosk",
    "kiosk\n",
    "a" * 65,
    "",
    "-kiosk",
    ".kiosk",
    "_kiosk",
    "kiosk:01",
    "kiosk\u00e9",
    "\u0661",  # an Arabic-Indic digit: \d would take it, the grammar must not
    None,
    5,
    b"kiosk",
    ["kiosk"],
]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_builder_gives_the_contract_topic(kind: str) -> None:
    assert BUILDERS[kind]("kiosks") == EXPECTED[kind]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("name", ["a", "0", "kiosk-01", "k.i_o-s", "a" * 64])
def test_builder_and_parser_round_trip(kind: str, name: str) -> None:
    shard = shard_of(name) if kind in ("device-reported", "device-presence") else None
    assert T.parse(BUILDERS[kind](name)) == TopicRef(kind, name, shard)  # type: ignore[arg-type]


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_event_topics_round_trip(event_type: str) -> None:
    topic = T.event(event_type)
    assert topic == f"setpoint/v1/events/{event_type}"
    assert T.parse(topic) == TopicRef("event", event_type)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=repr)
def test_hostile_id_raises_and_makes_no_topic(kind: str, hostile: object) -> None:
    topic = None
    with pytest.raises(InvalidId):
        topic = BUILDERS[kind](hostile)  # type: ignore[arg-type]
    assert topic is None


@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=repr)
def test_validate_id_refuses_hostile_ids(hostile: object) -> None:
    with pytest.raises(InvalidId) as info:
        validate_id(hostile, "device id")
    assert "device id" in str(info.value)


def test_invalid_id_is_a_value_error_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"1-64 characters of a-z, 0-9"):
        validate_id("Bad/Id")


def test_a_very_long_id_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidId) as info:
        validate_id("x" * 10_000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("event_type", ["", "Drift", "drift/x", "+", "#", "1drift", None, 3])
def test_hostile_event_type_makes_no_topic(event_type: object) -> None:
    with pytest.raises(InvalidId):
        T.event(event_type)  # type: ignore[arg-type]


def test_subscription_filters() -> None:
    assert T.all_reported() == "setpoint/v1/shards/+/devices/+/reported"
    assert T.all_presence() == "setpoint/v1/shards/+/devices/+/presence"
    assert T.all_reported("3") == "setpoint/v1/shards/3/devices/+/reported"
    assert T.all_presence("f") == "setpoint/v1/shards/f/devices/+/presence"
    assert T.all_drift() == "setpoint/v1/devices/+/drift"
    assert T.all_device_desired() == "setpoint/v1/devices/+/desired"
    assert T.all_group_desired() == "setpoint/v1/groups/+/desired"
    assert T.all_group_status() == "setpoint/v1/groups/+/status"
    assert T.all_events() == "setpoint/v1/events/+"


def test_barrier_topic() -> None:
    assert T.barrier("controller-1") == "setpoint/v1/clients/controller-1/barrier"
    for hostile in ("a/b", "+", "#", "Ctl", ""):
        with pytest.raises(InvalidId):
            T.barrier(hostile)


def test_shared_subscription_filter() -> None:
    assert (
        Topics.shared("ctl", T.all_reported())
        == "$share/ctl/setpoint/v1/shards/+/devices/+/reported"
    )
    with pytest.raises(InvalidId):
        Topics.shared("ctl/x", T.all_reported())


@pytest.mark.parametrize(
    "topic",
    [
        "setpoint/v1/devices/+/reported",
        "setpoint/v1/devices/kiosk/reported",
        "setpoint/v1/devices/kiosk/presence",
        "setpoint/v1/shards/+/devices/+/reported",
        "setpoint/v1/shards/#",
        "setpoint/v1/shards/a/devices/kiosk-01/drift",
        "setpoint/v1/shards/a/devices/kiosk-01/desired",
        "setpoint/v1/shards/a/devices/kiosk-01/reported/extra",
        "setpoint/v1/shards/a/groups/kiosk-01/reported",
        "setpoint/v1/shards/A/devices/kiosk-01/reported",
        "setpoint/v1/shards/aa/devices/kiosk-01/reported",
        "setpoint/v1/shards//devices/kiosk-01/reported",
        "setpoint/v1/shards/g/devices/kiosk-01/reported",
        "setpoint/v1/shards/a/devices/Kiosk-01/reported",
        "setpoint/v1/devices/#",
        "setpoint/v1/devices/Kiosk/reported",
        "setpoint/v1/devices/kiosk/unknown",
        "setpoint/v1/devices/kiosk/reported/extra",
        "setpoint/v1/devices/kiosk",
        "setpoint/v1/groups/kiosks/reported",
        "setpoint/v1/events/Drift",
        "setpoint/v1/events/drift/x",
        "setpoint/v2/devices/kiosk/reported",
        "setpoint/v1x/devices/kiosk/reported",
        "other/devices/kiosk/reported",
        "setpoint/v1",
        "",
        "/setpoint/v1/devices/kiosk/reported",
    ],
)
def test_parse_refuses_what_is_not_ours(topic: str) -> None:
    with pytest.raises(InvalidId):
        T.parse(topic)


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(InvalidId):
        T.parse(b"setpoint/v1/devices/kiosk/reported")  # type: ignore[arg-type]


def test_default_prefix() -> None:
    assert DEFAULT_PREFIX == "setpoint/v1"
    assert T.prefix == "setpoint/v1"
    assert repr(T) == "Topics('setpoint/v1')"


@pytest.mark.parametrize("prefix", ["acme", "acme/fleet-1/v1", "A.B/c_d", "x" * 64])
def test_custom_prefix_round_trips(prefix: str) -> None:
    topics = Topics(prefix)
    topic = topics.device_reported("kiosk-01")
    assert topic == f"{prefix}/shards/a/devices/kiosk-01/reported"
    assert topics.parse(topic) == TopicRef("device-reported", "kiosk-01", "a")
    with pytest.raises(InvalidId):
        T.parse(topic)


@pytest.mark.parametrize(
    "prefix",
    ["", "/", "a//b", "/a", "a/", "a/+/b", "#", "a/#", "$SYS", "a b", "a\x00", "x" * 65, None, 7],
)
def test_bad_prefix_is_refused(prefix: object) -> None:
    with pytest.raises(InvalidId):
        validate_prefix(prefix)  # type: ignore[arg-type]
    with pytest.raises(InvalidId):
        Topics(prefix)  # type: ignore[arg-type]


# --- report shards (SPEC 3.1) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "shard"),
    # sha256("a") = ca978112..., sha256("kiosk-01") = a..., the SPEC's vectors
    [("a", "c"), ("kiosk-01", "a"), ("kiosk-02", "c"), ("dev1", "c"), ("dev2", "4")],
)
def test_shard_of_is_the_first_hex_digit_of_the_ids_sha256(device: str, shard: str) -> None:
    assert shard_of(device) == shard == hashlib.sha256(device.encode()).hexdigest()[0]
    assert Topics.shard_of(device) == shard


def test_shard_space_is_sixteen_hex_digits_and_ids_spread_over_all() -> None:
    assert tuple("0123456789abcdef") == SHARDS
    spread = {shard_of(f"kiosk-{i:04d}") for i in range(200)}
    assert spread == set(SHARDS)


@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=repr)
def test_shard_of_refuses_hostile_ids(hostile: object) -> None:
    with pytest.raises(InvalidId):
        shard_of(hostile)  # type: ignore[arg-type]


@pytest.mark.parametrize("leaf", ["reported", "presence"])
@pytest.mark.parametrize("device", ["kiosk-01", "a", "k.i_o-s"])
def test_a_report_or_presence_on_another_shard_is_refused_with_wrong_shard(
    leaf: str, device: str
) -> None:
    own = shard_of(device)
    for shard in SHARDS:
        topic = f"setpoint/v1/shards/{shard}/devices/{device}/{leaf}"
        if shard == own:
            assert T.parse(topic).shard == own
            continue
        with pytest.raises(WrongShardError) as info:
            T.parse(topic)
        assert info.value.device == device
        assert f"belongs to shard {own!r}, not {shard!r}" in str(info.value)
        assert isinstance(info.value, InvalidId)  # refused like any topic that is not ours


def test_shard_filters_of_a_replicas_shards() -> None:
    assert T.shard_filters(["a", "3", "a"]) == [
        "setpoint/v1/shards/3/devices/+/reported",
        "setpoint/v1/shards/3/devices/+/presence",
        "setpoint/v1/shards/a/devices/+/reported",
        "setpoint/v1/shards/a/devices/+/presence",
    ]
    assert len(T.shard_filters(SHARDS)) == 32


@pytest.mark.parametrize("bad", ["g", "A", "10", "", "+", "#", 3])
def test_a_bad_shard_makes_no_filter(bad: object) -> None:
    with pytest.raises(InvalidId, match="one lowercase hex digit"):
        T.all_reported(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidId, match="one lowercase hex digit"):
        T.all_presence(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidId, match="one lowercase hex digit"):
        T.shard_filters([bad])  # type: ignore[list-item]
