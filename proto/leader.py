"""The controller leader record (``<prefix>/controllers/leader``): which replica publishes.

Several controller replicas may run on one fleet for availability. Exactly one of them, the
leader, publishes desired bundles, statuses, events and commands; the others wait. The
leader says so in a retained record, signed with the fleet's signing key(s) like every
other message the controller writes, and renews it every third of its lease. A replica that
has seen no renewal for a whole lease claims the lead with the next term.

Leases are timed by each replica's own monotonic clock from the moment it *received* a
record, never from timestamps inside it, so replicas on hosts whose clocks disagree still
agree on when a lease ran out. The record therefore carries no time of day, only the lease
length the leader promises to renew within.

Replicas that split the report shards (``docs/decisions/0009-report-shards.md``) keep two
more records of this same form, each with its own payload type pinned by its topic: one
lease per shard (``controllers/shards/<shard>``) and one membership record per replica
(``controllers/replicas/<replica>``).

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, envelopes
from .errors import InvalidId, SchemaError
from .topics import validate_id

MAX_LEADER_BYTES: Final = 1024
MAX_LEASE_MS: Final = 3_600_000
_FIELDS: Final = frozenset({"holder", "term", "lease_ms", "renewal"})


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """``holder`` is the replica's id; ``term`` grows by one at every claim; ``renewal``
    counts the renewals within a term (so each one is a distinct message); ``lease_ms`` is
    how long the others wait, after the last renewal they received, before claiming."""

    holder: str
    term: int
    lease_ms: int
    renewal: int = 0


def encode(record: LeaderRecord) -> bytes:
    return codec.pack(
        {
            "holder": record.holder,
            "term": record.term,
            "lease_ms": record.lease_ms,
            "renewal": record.renewal,
        }
    )


# The records of this form and the topic each is pinned to (SPEC 7.7 and 7.8): the leader
# record, a shard's lease, and a replica's membership.
RECORD_TYPES: Final = (
    envelopes.LEADER_TYPE,
    envelopes.SHARD_LEASE_TYPE,
    envelopes.REPLICA_TYPE,
)


def sign(
    record: LeaderRecord,
    keys: list[Ed25519PrivateKey],
    payload_type: str = envelopes.LEADER_TYPE,
) -> bytes:
    """The signed envelope of ``record`` as a leader record, or (``payload_type``) as a
    shard lease or a replica's membership record, which have the same form."""
    if payload_type not in RECORD_TYPES:
        raise ValueError(f"{payload_type!r} is not a record of the leader record's form")
    return envelopes.sign(payload_type, encode(record), keys)


def decode(payload: bytes) -> LeaderRecord:
    """Decode a *verified* leader record payload."""
    raw = codec.unpack(payload, max_size=MAX_LEADER_BYTES)
    if not isinstance(raw, dict):
        raise SchemaError("leader record is not a map")
    if set(raw) != _FIELDS:
        raise SchemaError(f"leader record must have exactly {sorted(_FIELDS)}")
    for name in ("term", "lease_ms", "renewal"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchemaError(f"leader record field {name!r} must be a non-negative integer")
    if not 0 < raw["lease_ms"] <= MAX_LEASE_MS:
        raise SchemaError(f"leader record lease_ms must be 1..{MAX_LEASE_MS}")
    try:
        holder = validate_id(raw["holder"], "replica id")
    except InvalidId as exc:
        raise SchemaError(str(exc)) from None
    return LeaderRecord(holder, raw["term"], raw["lease_ms"], raw["renewal"])
