"""Helpers for the rollout tests: a ringed fleet repository and simulated devices.

``SimDevices`` stands in for devices *and* the drift engine, speaking only the public
protocol: it reads the signed retained bundles (verifying them), applies the group
version a device's bundle pins (``group_version``) the way the shim does, and publishes
each device's drift status (JSON on ``.../devices/<id>/drift``, retained). A device can be
told to fail on content containing a marker, or be offline. It also records events and the
retained rollout statuses, so tests wait on what happened.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqttkit import Subscriber

from setpoint.proto import bundles, envelopes, rollout_status, status
from setpoint.proto.bundles import Bundle, FileResource
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES

FLEET = """\
rings:
  - branch: main
  - branch: canary
    gate: {from: main, in_sync: 100%%, healthy_for: 0}
  - branch: production
    gate: {from: canary, in_sync: 100%%, healthy_for: %s}
"""


def pem_public(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def operators_yaml(**keys: Ed25519PrivateKey) -> str:
    """``operators:`` of fleet.yaml, one entry per ``name=key``."""
    out = "operators:\n"
    for name, key in keys.items():
        body = "".join(f"        {line}\n" for line in pem_public(key).splitlines())
        out += f"  - name: {name}\n    key: |\n{body}"
    return out


def fleet_yaml(approval: bool, **operators: Ed25519PrivateKey) -> str:
    """Rings main -> canary -> production (approval on production as asked) and operators."""
    return (
        "rings:\n  - branch: main\n  - branch: canary\n"
        "    gate: {from: main, in_sync: 100%, healthy_for: 0}\n"
        "  - branch: production\n"
        "    gate: {from: canary, in_sync: 100%, healthy_for: 0,"
        f" approval: {str(approval).lower()}}}\n" + operators_yaml(**operators)
    )


def group(branch: str, motd: str, extra: str = "") -> str:
    return (
        f"branch: {branch}\n{extra}resources:\n"
        f"  - id: motd\n    kind: file\n    path: etc/motd\n    content: {motd!r}\n"
    )


def ringed_files(motd: str = "v1", healthy_for: str = "1") -> dict[str, str]:
    return {
        "fleet.yaml": FLEET % healthy_for,
        "groups/qa.yaml": group("main", motd),
        "groups/canaries.yaml": group("canary", motd, "rollout: {batch: 1, on_failure: revert}\n"),
        "groups/prod.yaml": group("production", motd),
        "devices/qa-1.yaml": "group: qa\n",
        "devices/can-1.yaml": "group: canaries\n",
        "devices/can-2.yaml": "group: canaries\n",
        "devices/prod-1.yaml": "group: prod\n",
    }


def motd_change(motd: str) -> dict[str, str]:
    files = ringed_files(motd)
    return {k: v for k, v in files.items() if k.startswith("groups/")}


@dataclass
class Sim:
    fails_on: set[str] = field(default_factory=set)
    offline: bool = False
    applied: int | None = None


class SimDevices(Subscriber):
    def __init__(
        self, host: str, port: int, prefix: str, trusted: Mapping[str, Any], devices: list[str]
    ) -> None:
        super().__init__(host, port, f"sim-{secrets.token_hex(4)}")
        self.topics = Topics(prefix)
        self.trusted = trusted
        self.sims = {d: Sim() for d in devices}
        self.groups: dict[str, dict[int, Bundle]] = {}
        self.device_bundles: dict[str, Bundle] = {}
        self.published: dict[str, DriftStatus] = {}
        self.events: list[dict[str, Any]] = []
        self.rollout: dict[str, dict[str, Any]] = {}
        self.gates: dict[str, dict[str, Any]] = {}

    def filters(self) -> list[tuple[str, int]]:
        return [
            (self.topics.all_group_desired(), 0),
            (self.topics.all_device_desired(), 0),
            (self.topics.all_events(), 0),
            (self.topics.all_group_rollout(), 0),
            (self.topics.all_ring_gates(), 0),
        ]

    async def handle(self, topic: str, payload: bytes) -> None:
        self._take(topic, payload)
        await self._publish_statuses()

    def _take(self, topic: str, payload: bytes) -> None:
        ref = self.topics.parse(topic)
        if ref.kind in ("group-rollout", "ring-gate"):
            # Through the codecs, as any reader: what the controller publishes must decode.
            if payload and ref.kind == "group-rollout":
                group = rollout_status.rollout_from_json(payload)
                self.rollout[group.group] = rollout_status.rollout_to_dict(group)
            elif payload:
                gate = rollout_status.gate_from_json(payload)
                self.gates[gate.ring] = rollout_status.gate_to_dict(gate)
            return
        if ref.kind == "event":
            self.events.append(status.event_from_json(payload))
            return
        if not payload:
            return
        kind = "group" if ref.kind == "group-desired" else "device"
        bundle = bundles.decode(
            envelopes.verify(payload, self.trusted, payload_type=PAYLOAD_TYPES[kind])
        )
        if kind == "group":
            self.groups.setdefault(ref.name, {})[bundle.version] = bundle
        else:
            self.device_bundles[ref.name] = bundle

    async def _publish_statuses(self) -> None:
        assert self._client is not None
        for device, sim in self.sims.items():
            drift = self.compute(device, sim)
            if drift is None or self.published.get(device) == drift:
                continue
            self.published[device] = drift
            await self._client.publish(
                self.topics.device_drift(device), drift.to_json(), qos=1, retain=True
            )

    def compute(self, device: str, sim: Sim) -> DriftStatus | None:
        dev = self.device_bundles.get(device)
        if dev is None or dev.group is None or dev.group not in self.groups:
            return None
        versions = self.groups[dev.group]
        latest = max(versions)
        pin = dev.group_version
        allowed = [v for v in versions if pin is None or v <= pin or sim.applied is None]
        target = max(allowed) if allowed else sim.applied

        def make(state: str, reason: str = "") -> DriftStatus:
            return DriftStatus(
                device=device, group=dev.group, state=state,  # type: ignore[arg-type]
                desired_version=latest, applied_version=sim.applied,
                commit=versions[latest].commit, since=0.0, reason=reason,
            )  # fmt: skip

        if sim.offline:
            return make("offline", "offline")
        if target is not None and target != sim.applied:
            text = b"".join(
                r.content for r in versions[target].resources if isinstance(r, FileResource)
            )
            broken = [m for m in sim.fails_on if m.encode() in text]
            if broken:
                return make("failed", f"apply of v{target} failed: {broken[0]}")
            sim.applied = target
        return make("in_sync" if sim.applied == latest else "pending")

    async def refresh(self) -> None:
        async with self._changed:
            await self._publish_statuses()
            self._changed.notify_all()

    def of(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("action") == action or e["type"] == action]

    def motd(self, device: str) -> str | None:
        sim = self.sims[device]
        dev = self.device_bundles.get(device)
        if sim.applied is None or dev is None or dev.group is None:
            return None
        bundle = self.groups[dev.group][sim.applied]
        return b"".join(r.content for r in bundle.resources if isinstance(r, FileResource)).decode()

    async def wait(self, predicate: Callable[[], Any], timeout: float = 15.0) -> None:
        await super().wait(predicate, timeout)
