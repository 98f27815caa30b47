"""Trust state: which verified bundles a device may accept.

The second layer of verification, after :mod:`envelopes` (as python-tuf separates
signature checks from its trusted metadata set). A :class:`TrustState` remembers, per
target, the version and content digest last applied, the device's id and its current
group. :meth:`TrustState.evaluate` verifies an envelope and decides on the bundle inside:

* a valid signature by the trusted keys (threshold) and the pinned ``payloadType``;
* the bundle's target is this device, or this device's current group;
* its version is not lower than the floor for that target, and an equal version only
  carries the same content (a re-signed refresh);
* it has not expired (with a clock-skew tolerance).

Evaluating never changes the state; :meth:`TrustState.record` returns a new state once
the bundle has been applied. A refused bundle therefore cannot move a floor.

Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import bundles, envelopes
from .bundles import Bundle, BundleKind
from .errors import ExpiredError, RollbackError, SchemaError, WrongTargetError
from .topics import validate_id

DEFAULT_SKEW: Final = 300
PAYLOAD_TYPES: Final[Mapping[BundleKind, str]] = {
    "group": envelopes.GROUP_BUNDLE_TYPE,
    "device": envelopes.DEVICE_BUNDLE_TYPE,
}


@dataclass(frozen=True, slots=True)
class Floor:
    """The last applied version of one target and the digest of its content."""

    version: int
    digest: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """An accepted bundle: what it says, and whether it is new to this device."""

    bundle: Bundle
    digest: str
    new: bool


@dataclass(frozen=True, slots=True)
class TrustState:
    device: str
    group: str | None = None
    floors: Mapping[str, Floor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id(self.device, "device id")

    @staticmethod
    def floor_key(kind: BundleKind, target: str) -> str:
        return f"{kind}/{target}"

    def floor(self, kind: BundleKind, target: str) -> Floor | None:
        return self.floors.get(self.floor_key(kind, target))

    def evaluate(
        self,
        kind: BundleKind,
        data: bytes,
        *,
        trusted: Mapping[str, Ed25519PublicKey],
        now: float,
        threshold: int = 1,
        skew: float = DEFAULT_SKEW,
        max_size: int = envelopes.MAX_ENVELOPE_BYTES,
    ) -> Verdict:
        """Verify ``data`` as a ``kind`` bundle for this device; raise if it is refused."""
        payload = envelopes.verify(
            data,
            trusted,
            payload_type=PAYLOAD_TYPES[kind],
            threshold=threshold,
            max_size=max_size,
        )
        bundle = bundles.decode(payload, max_size=max_size)
        if bundle.kind != kind:
            raise SchemaError(f"a {bundle.kind} bundle arrived where a {kind} bundle belongs")
        expected = self.device if kind == "device" else self.group
        if expected is None:
            raise WrongTargetError(f"group bundle {bundle.target!r}: no group assigned yet")
        if bundle.target != expected:
            raise WrongTargetError(
                f"{kind} bundle for {bundle.target!r}; this device expects {expected!r}"
            )
        if now > bundle.expires_at + skew:
            raise ExpiredError(
                f"{kind} bundle {bundle.target!r} v{bundle.version} expired at"
                f" {bundle.expires_at} (now {int(now)}, skew {int(skew)}s)"
            )
        digest = bundle.content_digest()
        floor = self.floor(kind, bundle.target)
        if floor is not None:
            if bundle.version < floor.version:
                raise RollbackError(
                    f"{kind} bundle {bundle.target!r} v{bundle.version} is older than"
                    f" applied v{floor.version}"
                )
            if bundle.version == floor.version and digest != floor.digest:
                raise RollbackError(
                    f"{kind} bundle {bundle.target!r} v{bundle.version} has other content"
                    " than the applied bundle of the same version"
                )
        new = floor is None or bundle.version > floor.version
        return Verdict(bundle, digest, new)

    def record(self, verdict: Verdict) -> TrustState:
        """The state after ``verdict``'s bundle was applied."""
        bundle = verdict.bundle
        floors = dict(self.floors)
        floors[self.floor_key(bundle.kind, bundle.target)] = Floor(bundle.version, verdict.digest)
        group = bundle.group if bundle.kind == "device" else self.group
        return replace(self, group=group, floors=floors)

    def reset_floors(self) -> TrustState:
        """Forget every floor (trust-anchor rotation, as TUF does on a root key change)."""
        return replace(self, floors={})

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "group": self.group,
            "floors": {
                k: {"version": f.version, "digest": f.digest} for k, f in self.floors.items()
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrustState:
        try:
            floors = {
                str(k): Floor(int(v["version"]), str(v["digest"]))
                for k, v in raw.get("floors", {}).items()
            }
            group = raw.get("group")
            return cls(str(raw["device"]), None if group is None else validate_id(group), floors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError(f"stored trust state is malformed: {exc!r}") from exc
