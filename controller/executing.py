"""The controller's one door out: every signed, published, cleared or audited thing.

:class:`Executor` is the only part of the controller that signs (one
:class:`~setpoint.controller.signing.Signer`, every configured key), publishes or clears
on the broker (through the :class:`~setpoint.controller.broker.Link`), writes the audit
log (one schema, :class:`~setpoint.controller.audit.Entry`) and sends events. The
reconciler, the drift engine and the rollouts decide; they hand what they decided to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from setpoint.proto import commands, status
from setpoint.proto.bundles import Bundle
from setpoint.proto.topics import Topics

from . import detecting
from .audit import AuditLog, Entry
from .broker import Link, Session
from .detecting import ClearDrift, ClearGroup, DriftAction, GroupAction, ShowDrift, ShowGroup
from .signing import Signed, Signer


class Executor:
    def __init__(
        self, link: Link, topics: Topics, audit: AuditLog, clock: Callable[[], float]
    ) -> None:
        self.link = link
        self.topics = topics
        self._audit = audit
        self._clock = clock
        self.signer: Signer | None = None  # loaded when the controller starts

    @property
    def connected(self) -> bool:
        return self.link.connected

    async def wait_connected(self) -> Session:
        return await self.link.wait_connected()

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish at QoS 1; return once the broker acknowledged (BrokerUnavailable if not)."""
        await self.link.publish(topic, payload, qos=1, retain=retain)

    async def clear(self, topic: str) -> None:
        """Clear a retained topic."""
        await self.link.publish(topic, b"", qos=1, retain=True)

    def sign(self, bundle: Bundle) -> Signed:
        assert self.signer is not None, "the signer is loaded when the controller starts"
        return self.signer.sign(bundle)

    async def command(self, command: commands.Command) -> None:
        """Sign ``command`` with every key and send it to its device (not retained)."""
        assert self.signer is not None, "the signer is loaded when the controller starts"
        payload = self.signer.sign_command(command)
        await self.publish(self.topics.device_command(command.device), payload, retain=False)

    async def event(self, event_type: str, **fields: Any) -> None:
        payload = status.event(event_type, self._clock(), **fields)
        await self.publish(self.topics.event(event_type), payload, retain=False)

    async def audit(self, entries: Sequence[Entry]) -> None:
        if entries:
            await asyncio.to_thread(self._audit.append, entries)

    def audit_now(self, entries: Sequence[Entry]) -> None:
        """Append in this thread (for callers already in a worker thread)."""
        if entries:
            self._audit.append(entries)

    # --- Drift's typed actions (decided by the drift part of the reconcile loop) ---------

    async def carry_out(self, action: DriftAction | GroupAction) -> None:
        """Carry out one drift action: retain or clear a device's drift status (and send
        the drift event its change makes), sign and send a reconcile command (and its
        event), retain or clear a group's summary."""
        topics = self.topics
        if isinstance(action, ShowDrift):
            await self.publish(
                topics.device_drift(action.device), action.new.to_json(), retain=True
            )
            change = detecting.change_of(action.old, action.new) if action.event else None
            if change is not None:
                fields = detecting.drift_event_fields(action.old, action.new, change)
                await self.event("drift", **fields)
        elif isinstance(action, ClearDrift):
            await self.clear(topics.device_drift(action.device))
        elif isinstance(action, ShowGroup):
            await self.publish(topics.group_status(action.group), action.new.to_json(), retain=True)
        elif isinstance(action, ClearGroup):
            await self.clear(topics.group_status(action.group))
        else:
            command = commands.Command(
                action.device, "reconcile", action.seq, action.issued_at, action.expires_at,
                action.reason,
            )  # fmt: skip
            await self.command(command)
            await self.event(
                "reconcile",
                device=action.device,
                group=action.group,
                seq=action.seq,
                reason=action.reason,
            )
