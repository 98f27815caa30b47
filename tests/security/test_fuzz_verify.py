"""A long fuzz run of decode-and-verify: whatever bytes arrive on a bundle topic, the only
outcome besides acceptance of the genuine bundle is a typed ProtocolError.

``SETPOINT_FUZZ_EXAMPLES`` sets the number of generated inputs: 10,000 by default (about
5-7 s, inside ``make test``); the full run is ``SETPOINT_FUZZ_EXAMPLES=100000`` (about 50 s
on a 2-core machine; docs/security.md has the figures). The count is asserted at the end,
so a run cannot silently do less.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from setpoint.proto import ProtocolError, bundles, codec, envelopes
from setpoint.proto.bundles import Bundle, FileResource, SettingResource
from setpoint.proto.trust import Floor, TrustState

EXAMPLES = int(os.environ.get("SETPOINT_FUZZ_EXAMPLES", "10000"))
KEY = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
TRUSTED = envelopes.trusted_keys([KEY.public_key()])
NOW = 1_700_000_100
STATE = TrustState("kiosk-01", "kiosks", {"group/kiosks": Floor(3, "x" * 64)})
BUNDLE = Bundle(
    "group", "kiosks", 4, "c0ffee", 1_700_000_000, 1_800_000_000,
    (FileResource("motd", "etc/motd", b"hello\n", 0o644), SettingResource("tz", "tz", "UTC")),
)  # fmt: skip
PAYLOAD = bundles.encode(BUNDLE)
SIGNED = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, PAYLOAD, [KEY])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def mutated(draw: Any) -> bytes:
    data = bytearray(SIGNED)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.integers(0, len(data) - 1)) if data else 0
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if how == "flip" and data:
            data[where] ^= draw(st.integers(1, 255))
        elif how == "insert":
            data.insert(where, draw(st.integers(0, 255)))
        elif how == "delete" and data:
            del data[where : where + draw(st.integers(1, 8))]
        else:
            del data[where:]
    return bytes(data)


@st.composite
def signed_shapes(draw: Any) -> bytes:
    raw = codec.unpack(PAYLOAD, max_size=len(PAYLOAD))
    raw[draw(st.sampled_from(sorted(raw)))] = draw(values)
    return envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, codec.pack(raw), [KEY])


inputs = st.one_of(st.binary(max_size=512), mutated(), signed_shapes(), values.map(codec.pack))
# Inputs are drawn in batches: hypothesis's per-example bookkeeping, not the decoder,
# dominates the cost of one example (measured: ~1.2 ms per example one by one).
BATCH = 25
seen = {"inputs": 0, "refused": 0, "accepted": 0}


@settings(
    max_examples=max(1, EXAMPLES // BATCH),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.lists(inputs, min_size=BATCH, max_size=BATCH))
def _fuzz(batch: list[bytes]) -> None:
    for data in batch:
        seen["inputs"] += 1
        try:
            verdict = STATE.evaluate("group", data, trusted=TRUSTED, now=NOW)
        except ProtocolError:
            seen["refused"] += 1
            continue
        seen["accepted"] += 1
        assert verdict.bundle.target == "kiosks" and verdict.bundle.version >= 3


def test_fuzz_decode_and_verify() -> None:
    started = time.perf_counter()
    _fuzz()
    elapsed = time.perf_counter() - started
    print(f"\nfuzz: {seen} in {elapsed:.1f}s")
    assert seen["inputs"] >= EXAMPLES - EXAMPLES % BATCH
    assert seen["refused"] > 0 and seen["accepted"] > 0  # both paths were exercised
