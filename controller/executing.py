"""The controller's one door out: every signed, published, cleared or audited thing.

:class:`Executor` is the only part of the controller that signs (one
:class:`~setpoint.controller.signing.Signer`, every configured key), publishes or clears
on the broker (through the :class:`~setpoint.controller.broker.Link`), writes the audit
log (one schema, :class:`~setpoint.controller.audit.Entry`) and sends events. The
reconciler, the drift engine and the rollouts decide; they hand what they decided to it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

from setpoint.proto import commands, status
from setpoint.proto.bundles import Bundle
from setpoint.proto.topics import Topics

from . import detecting
from .audit import AuditLog, Entry
from .broker import Link, Session
from .detecting import ClearDrift, ClearGroup, DriftAction, GroupAction, ShowDrift, ShowGroup
from .errors import BrokerUnavailable
from .rereading import Probe, Reread
from .resending import Resend
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

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> float:
        """Publish at QoS 1; return once the broker acknowledged (BrokerUnavailable if not):
        the seconds it took to acknowledge."""
        return await self.link.publish(topic, payload, qos=1, retain=retain)

    async def clear(self, topic: str) -> float:
        """Clear a retained topic; the seconds the broker took to acknowledge."""
        return await self.link.publish(topic, b"", qos=1, retain=True)

    async def resend(self, action: Resend) -> float:
        """Publish, retained, the very envelope ``action`` holds again (same bytes: same
        version, same signature; nothing is signed anew); the seconds the broker took to
        acknowledge."""
        return await self.publish(action.target.topic(self.topics), action.envelope, retain=True)

    async def probe(self, _action: Probe) -> float:
        """Rule 1's probe (``controller/rereading.py``): one QoS 1 message to the
        controller's own echo topic; the seconds the broker took to acknowledge it."""
        return await self.link.probe()

    async def reread(self, _action: Reread, topic_filters: Sequence[str]) -> None:
        """Rule 1's fresh read: ``topic_filters`` subscribed again on the live connection,
        back once every retained message it brought was delivered (``Link.reread``)."""
        await self.link.reread(topic_filters)

    def sign(self, bundle: Bundle) -> Signed:
        assert self.signer is not None, "the signer is loaded when the controller starts"
        return self.signer.sign(bundle)

    async def command(self, command: commands.Command) -> None:
        """Sign ``command`` with every key and send it to its device (not retained)."""
        assert self.signer is not None, "the signer is loaded when the controller starts"
        payload = self.signer.sign_command(command)
        await self.publish(self.topics.device_command(command.device), payload, retain=False)

    async def event(self, event_type: str, **fields: Any) -> None:
        topic, payload, retain = self._event(event_type, **fields)
        await self.publish(topic, payload, retain=retain)

    async def audit(self, entries: Sequence[Entry]) -> None:
        if entries:
            await asyncio.to_thread(self._audit.append, entries)

    def audit_now(self, entries: Sequence[Entry]) -> None:
        """Append in this thread (for callers already in a worker thread)."""
        if entries:
            self._audit.append(entries)

    # --- Drift's typed actions (decided by the drift part of the reconcile loop) ---------

    def messages(self, action: DriftAction | GroupAction) -> list[tuple[str, bytes, bool]]:
        """What carrying out ``action`` publishes, in order, as ``(topic, payload, retain)``:
        a device's drift status (retained, or cleared) and the drift event its change
        makes; a signed reconcile command and its event; a group's summary."""
        topics = self.topics
        if isinstance(action, ShowDrift):
            out = [(topics.device_drift(action.device), action.new.to_json(), True)]
            change = detecting.change_of(action.old, action.new) if action.event else None
            if change is not None:
                fields = detecting.drift_event_fields(action.old, action.new, change)
                out.append(self._event("drift", **fields))
            return out
        if isinstance(action, ClearDrift):
            return [(topics.device_drift(action.device), b"", True)]
        if isinstance(action, ShowGroup):
            return [(topics.group_status(action.group), action.new.to_json(), True)]
        if isinstance(action, ClearGroup):
            return [(topics.group_status(action.group), b"", True)]
        assert self.signer is not None, "the signer is loaded when the controller starts"
        command = commands.Command(
            action.device, "reconcile", action.seq, action.issued_at, action.expires_at,
            action.reason,
        )  # fmt: skip
        return [
            (topics.device_command(action.device), self.signer.sign_command(command), False),
            self._event(
                "reconcile",
                device=action.device,
                group=action.group,
                seq=action.seq,
                reason=action.reason,
            ),
        ]

    def _event(self, event_type: str, **fields: Any) -> tuple[str, bytes, bool]:
        return (
            self.topics.event(event_type),
            status.event(event_type, self._clock(), **fields),
            False,
        )

    async def carry_out_all(
        self,
        actions: Sequence[DriftAction | GroupAction],
        done: Callable[[DriftAction | GroupAction], None],
    ) -> None:
        """Carry out ``actions`` pipelined: every PUBLISH is written, in the actions'
        order, as soon as the connection has room (the transport's ``max_inflight``, or
        the broker's receive maximum), without waiting for the acknowledgements of those
        before; ``done(action)`` is called, in order, once everything an action published
        is acknowledged. One connection keeps the order, so each device's status and
        event arrive as decided. BrokerUnavailable for the first that failed; the actions
        after it are not done (a later pass decides them again)."""
        if not actions:
            return
        session = self.link.session()
        timeout = self.link.publish_timeout
        waiting: collections.deque[
            tuple[DriftAction | GroupAction, list[tuple[str, asyncio.Future[None]]]]
        ] = collections.deque()

        async def finish(until_pending: bool) -> None:
            # Hand over the oldest actions whose acknowledgements are in (all of them at the
            # end), so that a round of thousands holds only what is still in flight.
            while waiting and (not until_pending or all(a.done() for _t, a in waiting[0][1])):
                action, acks = waiting.popleft()
                for topic, ack in acks:
                    await session.acked(topic, ack, timeout)
                done(action)

        try:
            for action in actions:
                acks = []
                for topic, payload, retain in self.messages(action):
                    try:
                        async with asyncio.timeout(timeout):
                            acks.append((topic, await session.send(topic, payload, retain=retain)))
                    except TimeoutError as exc:
                        raise BrokerUnavailable(
                            f"no room to publish {topic} within {timeout:g}s"
                        ) from exc
                waiting.append((action, acks))
                await finish(until_pending=True)
            await finish(until_pending=False)
        finally:
            for _action, acks in waiting:
                for _topic, ack in acks:
                    if ack.done() and not ack.cancelled():
                        ack.exception()  # retrieved: the first failure is the one raised
