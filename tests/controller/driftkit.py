"""Helpers for the drift engine's tests against a real mosquitto.

``run_drift`` starts a real :class:`Controller` with a :class:`DriftEngine`; ``Devices``
publishes reports and presence the way a device does (msgpack on the real topics);
``DriftWatch`` is a plain MQTT subscriber to drift statuses, group statuses, drift and
reconcile events and device commands, with a barrier to prove nothing more is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
from mqttkit import Subscriber

from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.detecting import Desired
from setpoint.controller.drifting import DriftEngine, DriftSettings
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.proto import bundles, reports, status
from setpoint.proto.reports import Applied, Report, ResourceReport
from setpoint.proto.status import DriftStatus, GroupStatus
from setpoint.proto.topics import Topics

TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def run_drift(
    broker: Any,
    prefix: str,
    repo: Any,
    key: Path,
    state_dir: Path,
    *,
    client_id: str = "",
    extra_keys: tuple[Path, ...] = (),
    **settings: Any,
) -> AsyncIterator[tuple[Controller, DriftEngine]]:
    """A real controller with the drift engine, ready (retained state read, desired settled)."""
    settings.setdefault("grace", 60.0)
    settings.setdefault("tick", 0.2)
    config = ControllerConfig(
        repo=str(getattr(repo, "path", repo)),
        broker=BrokerSettings(broker.host, broker.port, client_id=client_id),
        key_path=key,
        extra_key_paths=extra_keys,
        state_dir=state_dir,
        prefix=prefix,
        backoff=Backoff(base=0.05, cap=0.3),
        publish_timeout=5.0,
    )
    async with Controller(config, drift=DriftSettings(**settings)) as controller:
        engine = controller.drift
        assert engine is not None
        async with asyncio.timeout(TIMEOUT):
            await engine.ready.wait()
        yield controller, engine


def in_sync_report(desired: Desired, seq: int, **changes: Any) -> Report:
    """The report a device on exactly ``desired`` sends."""
    base = Report(
        device=desired.device,
        time=1_800_000_000,
        seq=seq,
        shim_version="test",
        mode=desired.mode,
        group=desired.group,
        applied_group=Applied(
            desired.group, desired.group_version, desired.commit, desired.group_digest
        ),
        applied_device=Applied(
            desired.device, desired.device_version, desired.commit, desired.device_digest
        ),
        resources=tuple(
            ResourceReport(r.id, r.kind, "ok", bundles.resource_digest(r))
            for r in desired.resources
        ),
    )
    return replace(base, **changes)


def drifted_report(desired: Desired, seq: int, resource: str, why: str = "edited") -> Report:
    base = in_sync_report(desired, seq)
    return replace(
        base,
        resources=tuple(
            ResourceReport(r.id, r.kind, "drifted", "0" * 64, why) if r.id == resource else r
            for r in base.resources
        ),
    )


class DriftWatch(Subscriber):
    """A plain subscriber: what any operator tool sees."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        super().__init__(host, port, f"watch-{secrets.token_hex(4)}")
        self.topics = Topics(prefix)
        self.drift: dict[str, DriftStatus] = {}
        self.groups: dict[str, GroupStatus] = {}
        self.events: list[dict[str, Any]] = []
        self.commands: list[tuple[str, bytes]] = []
        self._marks: set[str] = set()

    def filters(self) -> list[tuple[str, int]]:
        return [
            (self.topics.all_drift(), 0),
            (self.topics.all_group_status(), 0),
            (self.topics.event("drift"), 1),
            (self.topics.event("reconcile"), 1),
            (self.topics.all_device_commands(), 1),
            (self.topics.barrier(self._id), 1),
        ]

    async def handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.barrier(self._id):
            self._marks.add(payload.decode())
            return
        ref = self.topics.parse(topic)
        if ref.kind == "device-drift":
            if payload:
                self.drift[ref.name] = status.drift_from_json(payload)
            else:
                self.drift.pop(ref.name, None)
        elif ref.kind == "group-status" and payload:
            self.groups[ref.name] = status.group_status_from_json(payload)
        elif ref.kind == "event":
            self.events.append(status.event_from_json(payload))
        elif ref.kind == "device-command":
            self.commands.append((ref.name, payload))

    async def wait(self, predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
        try:
            await super().wait(predicate, timeout)
        except TimeoutError:
            states = {d: s.state for d, s in self.drift.items()}
            seen = [(e.get("device"), e.get("change"), e.get("state")) for e in self.events]
            raise AssertionError(f"timed out; drift={states} events={seen}") from None

    async def barrier(self) -> None:
        """Return once everything published before this call has arrived here."""
        assert self._client is not None
        mark = secrets.token_hex(4)
        await self._client.publish(self.topics.barrier(self._id), mark.encode(), qos=1)
        await self.wait(lambda: mark in self._marks)

    def state(self, device: str) -> str | None:
        found = self.drift.get(device)
        return found.state if found else None

    def drift_events(self, device: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["type"] == "drift" and (device is None or e["device"] == device)
        ]

    def is_(self, device: str, state: str) -> Callable[[], bool]:
        return lambda: self.state(device) == state


class Devices:
    """Publishes reports and presence as devices do (retained, QoS 1)."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.host, self.port = host, port
        self.topics = Topics(prefix)
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Devices:
        self._client = aiomqtt.Client(
            self.host, self.port, identifier=f"devices-{secrets.token_hex(4)}"
        )
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._client is not None
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def raw(self, device: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        assert self._client is not None
        await self._client.publish(
            self.topics.device_reported(device), payload, qos=qos, retain=retain
        )

    async def report(self, report: Report, *, on: str | None = None, qos: int = 1) -> None:
        await self.raw(on or report.device, reports.encode(report), qos=qos)

    async def presence(self, device: str, value: bytes) -> None:
        assert self._client is not None
        await self._client.publish(self.topics.device_presence(device), value, qos=1, retain=True)

    async def to(self, topic: str, payload: bytes) -> None:
        """Publish on any topic (retained, QoS 1): a device that strays from its own."""
        assert self._client is not None
        await self._client.publish(topic, payload, qos=1, retain=True)
