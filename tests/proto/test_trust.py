"""Trust state: one test per attack; every refusal leaves the state exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from setpoint.proto import (
    ExpiredError,
    PayloadTooLarge,
    PayloadTypeError,
    ProtocolError,
    RollbackError,
    SchemaError,
    SignatureError,
    WrongTargetError,
    bundles,
    codec,
    envelopes,
)
from setpoint.proto.bundles import Bundle, SettingResource
from setpoint.proto.trust import DEFAULT_SKEW, Floor, TrustState, Verdict

MakeBundle = Callable[..., Bundle]
Trusted = dict[str, Ed25519PublicKey]
EXPIRES = 1_700_000_000 + 7 * 24 * 3600
NOW = 1_700_000_100.0


@pytest.fixture
def seal(key: Ed25519PrivateKey) -> Callable[[Bundle], bytes]:
    """Sign a bundle as the controller does, with the payloadType of its kind."""

    def sign(bundle: Bundle) -> bytes:
        kind_type = {"group": envelopes.GROUP_BUNDLE_TYPE, "device": envelopes.DEVICE_BUNDLE_TYPE}
        return envelopes.sign(kind_type[bundle.kind], bundles.encode(bundle), [key])

    return sign


@pytest.fixture
def state() -> TrustState:
    """A device that applied kiosks v3 and its own v2."""
    floors = {"group/kiosks": Floor(3, "G3"), "device/kiosk-01": Floor(2, "D2")}
    return TrustState("kiosk-01", "kiosks", floors)


def refused(
    cls: type[ProtocolError],
    state: TrustState,
    kind: str,
    data: bytes,
    trusted: Trusted,
    **kw: Any,
) -> ProtocolError:
    """Evaluate, assert the exact error class, and that the state did not change."""
    before = state.to_dict()
    kw.setdefault("now", NOW)
    with pytest.raises(ProtocolError) as info:
        state.evaluate(kind, data, trusted=trusted, **kw)  # type: ignore[arg-type]
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert state.to_dict() == before
    return info.value


def fresh(state: TrustState, bundle: Bundle) -> TrustState:
    """``state`` with the floor of ``bundle``'s target set to the bundle's own content."""
    floors = dict(state.floors)
    floors[TrustState.floor_key(bundle.kind, bundle.target)] = Floor(
        bundle.version, bundle.content_digest()
    )
    return TrustState(state.device, state.group, floors)


# --- accepting ----------------------------------------------------------------------------


def test_accepts_a_new_group_version(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    bundle = group_bundle(version=4)
    verdict = state.evaluate("group", seal(bundle), trusted=trusted, now=NOW)
    assert verdict == Verdict(bundle, bundle.content_digest(), True)


def test_accepts_a_new_device_version(
    state: TrustState, device_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    verdict = state.evaluate("device", seal(device_bundle(version=3)), trusted=trusted, now=NOW)
    assert verdict.new and verdict.bundle.version == 3


def test_a_first_device_bundle_is_accepted_by_a_blank_device(
    device_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    blank = TrustState("kiosk-01")
    verdict = blank.evaluate("device", seal(device_bundle(version=1)), trusted=trusted, now=NOW)
    assert verdict.new
    learned = blank.record(verdict)
    assert learned.group == "kiosks"
    assert learned.floor("device", "kiosk-01") == Floor(1, verdict.digest)


def test_same_version_same_content_is_accepted_as_not_new(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    bundle = group_bundle(version=3)
    state = fresh(state, bundle)
    # A re-signed refresh: new times and even a new commit, the same content.
    refresh = bundle.with_version(3, bundle.issued_at + 3600, bundle.expires_at + 3600)
    verdict = state.evaluate("group", seal(refresh), trusted=trusted, now=NOW)
    assert not verdict.new
    assert state.record(verdict).floors == state.floors


def test_threshold_is_passed_to_the_envelope_check(
    state: TrustState,
    group_bundle: MakeBundle,
    key: Ed25519PrivateKey,
    key2: Ed25519PrivateKey,
) -> None:
    trusted = envelopes.trusted_keys([key.public_key(), key2.public_key()])
    payload = bundles.encode(group_bundle(version=4))
    both = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, payload, [key, key2])
    assert state.evaluate("group", both, trusted=trusted, now=NOW, threshold=2).new
    one = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, payload, [key])
    refused(SignatureError, state, "group", one, trusted, threshold=2)


# --- refusing -----------------------------------------------------------------------------


def test_refuses_rollback(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    error = refused(RollbackError, state, "group", seal(group_bundle(version=2)), trusted)
    assert "older than applied v3" in str(error)


def test_refuses_device_rollback(
    state: TrustState, device_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    refused(RollbackError, state, "device", seal(device_bundle(version=1)), trusted)


def test_refuses_same_version_with_other_content(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    state = fresh(state, group_bundle(version=3))
    other = group_bundle(version=3, resources=(SettingResource("tz", "time.zone", "EST"),))
    error = refused(RollbackError, state, "group", seal(other), trusted)
    assert "other content" in str(error)


def test_refuses_expired(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    data = seal(group_bundle(version=4))
    refused(ExpiredError, state, "group", data, trusted, now=EXPIRES + DEFAULT_SKEW + 1)


def test_expiry_allows_the_clock_skew(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    data = seal(group_bundle(version=4))
    assert state.evaluate("group", data, trusted=trusted, now=EXPIRES + DEFAULT_SKEW).new
    refused(ExpiredError, state, "group", data, trusted, now=EXPIRES + 11, skew=10)
    assert state.evaluate("group", data, trusted=trusted, now=EXPIRES + 10, skew=10).new


def test_refuses_a_bundle_for_another_device(
    state: TrustState, device_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    data = seal(device_bundle(target="kiosk-02", version=9))
    error = refused(WrongTargetError, state, "device", data, trusted)
    assert "'kiosk-02'" in str(error) and "'kiosk-01'" in str(error)


def test_refuses_a_bundle_for_another_group(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    # A valid bundle of another group, replayed onto this group's topic.
    refused(
        WrongTargetError, state, "group", seal(group_bundle(target="tills", version=9)), trusted
    )


def test_refuses_a_group_bundle_before_any_group_is_assigned(
    group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    blank = TrustState("kiosk-01")
    error = refused(WrongTargetError, blank, "group", seal(group_bundle(version=4)), trusted)
    assert "no group assigned" in str(error)


def test_refuses_a_group_bundle_where_a_device_bundle_belongs(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    refused(PayloadTypeError, state, "device", seal(group_bundle(version=4)), trusted)


def test_refuses_a_payload_of_the_other_kind_under_the_right_type(
    state: TrustState, group_bundle: MakeBundle, key: Ed25519PrivateKey, trusted: Trusted
) -> None:
    # Signed as a device bundle, but the payload says it is a group bundle.
    payload = bundles.encode(group_bundle(version=4))
    data = envelopes.sign(envelopes.DEVICE_BUNDLE_TYPE, payload, [key])
    refused(SchemaError, state, "device", data, trusted)


def test_refuses_a_forged_signature(
    state: TrustState,
    group_bundle: MakeBundle,
    stranger: Ed25519PrivateKey,
    trusted: Trusted,
) -> None:
    payload = bundles.encode(group_bundle(version=99))
    forged = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, payload, [stranger])
    refused(SignatureError, state, "group", forged, trusted)


def test_refuses_oversized_before_anything_else(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    data = seal(group_bundle(version=4))
    refused(PayloadTooLarge, state, "group", data, trusted, max_size=len(data) - 1)


def test_refusal_leaves_state_unchanged_then_a_good_bundle_is_still_accepted(
    state: TrustState,
    group_bundle: MakeBundle,
    seal: Callable[[Bundle], bytes],
    stranger: Ed25519PrivateKey,
    trusted: Trusted,
) -> None:
    # A huge version signed by an untrusted key cannot move the floor.
    payload = bundles.encode(group_bundle(version=10**9))
    forged = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, payload, [stranger])
    refused(SignatureError, state, "group", forged, trusted)
    refused(SchemaError, state, "group", b"\x00", trusted)
    assert state.floor("group", "kiosks") == Floor(3, "G3")
    assert state.evaluate("group", seal(group_bundle(version=4)), trusted=trusted, now=NOW).new


# --- recording ------------------------------------------------------------------------------


def test_evaluate_never_changes_the_state(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    before = state.to_dict()
    state.evaluate("group", seal(group_bundle(version=4)), trusted=trusted, now=NOW)
    assert state.to_dict() == before


def test_record_moves_the_floor(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    verdict = state.evaluate("group", seal(group_bundle(version=4)), trusted=trusted, now=NOW)
    after = state.record(verdict)
    assert after.floor("group", "kiosks") == Floor(4, verdict.digest)
    assert after.floor("device", "kiosk-01") == Floor(2, "D2")
    assert after.group == "kiosks"
    assert state.floor("group", "kiosks") == Floor(3, "G3")  # the old state is untouched
    refused(RollbackError, after, "group", seal(group_bundle(version=3)), trusted)


def test_record_learns_the_group_and_follows_a_move(
    state: TrustState,
    device_bundle: MakeBundle,
    group_bundle: MakeBundle,
    seal: Callable[[Bundle], bytes],
    trusted: Trusted,
) -> None:
    move = state.evaluate(
        "device", seal(device_bundle(version=3, group="tills")), trusted=trusted, now=NOW
    )
    moved = state.record(move)
    assert moved.group == "tills"
    assert moved.evaluate("group", seal(group_bundle(target="tills", version=1)),
                          trusted=trusted, now=NOW).new  # fmt: skip
    refused(WrongTargetError, moved, "group", seal(group_bundle(version=9)), trusted)
    # The old group's floor is kept: moving back cannot replay an old kiosks bundle.
    assert moved.floor("group", "kiosks") == Floor(3, "G3")


def test_to_dict_from_dict_round_trip(state: TrustState) -> None:
    assert TrustState.from_dict(state.to_dict()) == state
    blank = TrustState("kiosk-01")
    assert TrustState.from_dict(blank.to_dict()) == blank
    assert state.to_dict() == {
        "device": "kiosk-01",
        "group": "kiosks",
        "floors": {
            "group/kiosks": {"version": 3, "digest": "G3"},
            "device/kiosk-01": {"version": 2, "digest": "D2"},
        },
    }


def test_to_dict_is_json_and_msgpack_safe(state: TrustState) -> None:
    data = codec.dumps_json(state.to_dict())
    assert TrustState.from_dict(codec.loads_json(data, max_size=4096)) == state


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"device": "Kiosk"},
        {"device": "kiosk-01", "group": "a/b"},
        {"device": "kiosk-01", "floors": []},
        {"device": "kiosk-01", "floors": {"group/kiosks": {"version": "x", "digest": "d"}}},
        {"device": "kiosk-01", "floors": {"group/kiosks": {"digest": "d"}}},
        {"device": "kiosk-01", "floors": {"group/kiosks": 3}},
    ],
    ids=repr,
)
def test_from_dict_refuses_a_malformed_store(raw: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        TrustState.from_dict(raw)


def test_reset_floors(
    state: TrustState, group_bundle: MakeBundle, seal: Callable[[Bundle], bytes], trusted: Trusted
) -> None:
    reset = state.reset_floors()
    assert reset.floors == {}
    assert reset.device == state.device and reset.group == state.group
    assert reset.evaluate("group", seal(group_bundle(version=1)), trusted=trusted, now=NOW).new
    assert state.floor("group", "kiosks") == Floor(3, "G3")


def test_state_needs_a_valid_device_id() -> None:
    with pytest.raises(ProtocolError):
        TrustState("Kiosk 01")
