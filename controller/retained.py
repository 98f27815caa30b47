"""What the broker retains on every ``.../groups/+/desired`` and ``.../devices/+/desired``.

The controller subscribes to its own retained topics. On every connect the view is
emptied, the SUBSCRIBE releases the retained bundles, and a barrier round trip (see
:meth:`Link.barrier`) proves they have all arrived: only then is the view ``synced`` and
the reconcile loop allowed to plan. After that, live messages keep it current, so a bundle
that someone clears, overwrites or replaces with an older one wakes the loop, which puts
the right one back.

Each message is verified with the fleet's public key and decoded; what does not verify is
kept as an error entry (it is not ours, and gives no version floor).

Pure bookkeeping on messages handed to it; the Link does the I/O.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from setpoint.proto import bundles, envelopes
from setpoint.proto.errors import ProtocolError
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES

from .broker import Message
from .planning import Retained
from .rendering import Target

log = logging.getLogger(__name__)


def decode(target: Target, payload: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> Retained:
    """A retained message on ``target``'s topic, verified and decoded."""
    digest = hashlib.sha256(payload).hexdigest()
    try:
        verified = envelopes.verify(payload, trusted, payload_type=PAYLOAD_TYPES[target.kind])
        bundle = bundles.decode(verified)
    except ProtocolError as exc:
        return Retained(None, digest, str(exc))
    if bundle.kind != target.kind or bundle.target != target.id:
        return Retained(None, digest, f"names {bundle.kind} {bundle.target!r}")
    return Retained(bundle, digest, envelope=payload)


class RetainedView:
    """The broker's retained desired bundles, as last seen."""

    def __init__(
        self,
        topics: Topics,
        trusted: Mapping[str, Ed25519PublicKey],
        on_change: Callable[[], None],
    ) -> None:
        self._topics = topics
        self._trusted = trusted
        self._on_change = on_change
        self.entries: dict[Target, Retained] = {}
        self.version = 0  # counts every change of ``entries``
        # Targets whose entry a message changed since take_changed (None: all of them).
        self._changed: set[Target] | None = None
        self.synced = False
        self._received: dict[Target, int] = {}

    def filters(self) -> tuple[str, str]:
        return self._topics.all_group_desired(), self._topics.all_device_desired()

    def reset(self) -> None:
        """Forget everything (a new connection is about to deliver it all again)."""
        self.entries.clear()
        self.version += 1
        self._changed = None
        self.synced = False

    def mark_synced(self) -> None:
        self.synced = True
        self._on_change()

    def handle(self, message: Message) -> None:
        try:
            ref = self._topics.parse(message.topic)
        except ProtocolError:
            return
        if ref.kind == "group-desired":
            target = Target("group", ref.name)
        elif ref.kind == "device-desired":
            target = Target("device", ref.name)
        else:
            return
        self._received[target] = self._received.get(target, 0) + 1
        if not message.payload:
            before = self.entries.pop(target, None)
        else:
            before = self.entries.get(target)
            entry = decode(target, message.payload, self._trusted)
            if not entry.valid:
                log.warning(
                    "retained %s does not verify with the fleet key: %s", target, entry.error
                )
            self.entries[target] = entry
            if before is not None and before.digest == entry.digest:
                return  # the same envelope again (our own echo): nothing changed
        self.version += 1
        if self._changed is not None:
            self._changed.add(target)
        if self.synced and (before is not None or message.payload):
            self._on_change()

    def take_changed(self) -> set[Target] | None:
        """The targets whose entry a message changed since the last call (None: every
        target may have, the view was reset); starts counting again."""
        changed, self._changed = self._changed, set()
        return changed

    def mark(self, target: Target) -> int:
        """A token to pass to :meth:`note` after publishing to ``target``."""
        return self._received.get(target, 0)

    def note(self, target: Target, entry: Retained | None, mark: int) -> None:
        """Record what the broker acknowledged from us (``None``: cleared).

        Ignored if a message for ``target`` arrived since ``mark``: the broker sent it after
        it took ours (our own echo, or someone else's change), so it is newer news than our
        acknowledgement, and overwriting it could hide a bundle cleared in between.
        """
        if self._received.get(target, 0) != mark:
            return
        self.version += 1
        if entry is None:
            self.entries.pop(target, None)
        else:
            self.entries[target] = entry
