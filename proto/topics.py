"""Every MQTT topic of the protocol, built and parsed in one place.

Ids are validated against ``^[a-z0-9][a-z0-9._-]{0,63}$`` before a topic is built, so no
id can smuggle a level separator, a wildcard or a NUL into a topic. Nothing else in
setpoint formats a topic string by hand.

Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from .errors import InvalidId, WrongShardError

ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DEFAULT_PREFIX: Final = "setpoint/v1"
EVENT_TYPES: Final = frozenset(
    {
        "drift",
        "published",
        "rejected",
        "repository-error",
        "removed",
        "gated",
        "rollout-halted",
        "rollout",
        "reconcile",
    }
)
_EVENT_TYPE_PATTERN: Final = re.compile(r"[a-z][a-z0-9-]{0,63}")
# The report shards (SPEC 3.1, decision record 0009): a fixed space of 16, named by one
# lowercase hex digit. Reports and presence carry their device's shard as a topic level,
# so controller replicas can split those two floods with plain subscriptions (no $share).
SHARDS: Final = tuple("0123456789abcdef")
_PREFIX_LEVEL: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

TopicKind = Literal[
    "group-desired",
    "group-status",
    "group-rollout",
    "ring-gate",
    "device-desired",
    "device-reported",
    "device-presence",
    "device-drift",
    "device-command",
    "event",
]


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid device or group id, else raise InvalidId."""
    if not isinstance(value, str):
        raise InvalidId(f"{what} must be a string, got {type(value).__name__}")
    if ID_PATTERN.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidId(
            f"{what} {shown!r} is not valid: use 1-64 characters of a-z, 0-9, '.', '_', '-',"
            " starting with a letter or digit"
        )
    return value


ENGINES: Final = ("mqtt", "nats")
# Characters of the id grammar that an engine cannot carry inside a topic level, and why.
# NATS maps MQTT's '/' to its subject token separator '.', so a '.' inside a level would
# split it: the engine drops the connection of whoever publishes there.
_ENGINE_UNSAFE: Final = {"nats": (".", "NATS maps '.' in a topic to its own token separator")}


def validate_id_for_engine(value: str, engine: str, what: str = "id") -> str:
    """Return ``value`` if ``engine`` (one of :data:`ENGINES`) can carry it in a topic
    level, else raise InvalidId naming the id, the engine and the fix. ``value`` already
    matches the id grammar; ``mqtt`` (any standard broker) carries every such id."""
    if engine not in ENGINES:
        raise InvalidId(f"engine {engine!r} is not known (known: {', '.join(ENGINES)})")
    unsafe, reason = _ENGINE_UNSAFE.get(engine, ("", ""))
    found = sorted({c for c in value if c in unsafe})
    if found:
        shown = ", ".join(repr(c) for c in found)
        raise InvalidId(
            f"{what} {value!r} cannot be used on engine {engine}: {reason}; use '-' or '_'"
            f" instead of {shown}"
        )
    return value


def shard_of(device: str) -> str:
    """The shard of a device: the first hex digit of the lowercase hex SHA-256 of its id's
    bytes (ASCII; the id grammar has nothing else), so one of :data:`SHARDS`."""
    return _shard(validate_id(device, "device id"))


def _shard(valid_id: str) -> str:
    return hashlib.sha256(valid_id.encode("ascii")).hexdigest()[0]


def validate_shard(shard: object) -> str:
    """Return ``shard`` if it is one of :data:`SHARDS`, else raise InvalidId."""
    if not isinstance(shard, str) or shard not in SHARDS:
        raise InvalidId(
            f"shard {shard!r} is not valid: a shard is one lowercase hex digit, '0' to 'f'"
        )
    return shard


def validate_prefix(prefix: str) -> str:
    """Return a topic prefix made of plain levels (no wildcards, no empty levels)."""
    if not isinstance(prefix, str):
        raise InvalidId(f"topic prefix must be a string, got {type(prefix).__name__}")
    levels = prefix.split("/")
    if not levels or any(_PREFIX_LEVEL.fullmatch(level) is None for level in levels):
        raise InvalidId(
            f"topic prefix {prefix!r} is not valid: use '/'-separated levels of"
            " letters, digits, '.', '_', '-' (no wildcards, no empty levels)"
        )
    return prefix


@dataclass(frozen=True, slots=True)
class TopicRef:
    """What a parsed topic names: its kind and the device, group or event type, and for a
    report or presence the shard in its topic (always the device's own: see ``parse``)."""

    kind: TopicKind
    name: str
    shard: str | None = None


class Topics:
    """Topic builders and parsers under one prefix (default ``setpoint/v1``)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = validate_prefix(prefix)
        self._levels = len(self.prefix.split("/"))

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r})"

    # Builders: one per topic in the contract.
    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/groups/{validate_id(group, 'group id')}/desired"

    def group_status(self, group: str) -> str:
        return f"{self.prefix}/groups/{validate_id(group, 'group id')}/status"

    def device_desired(self, device: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device, 'device id')}/desired"

    shard_of = staticmethod(shard_of)

    def device_reported(self, device: str) -> str:
        """Retained report, by the device, under its shard (``shards/<s>/devices/<id>``)."""
        return f"{self.prefix}/shards/{shard_of(device)}/devices/{device}/reported"

    def device_presence(self, device: str) -> str:
        """Retained presence and will, by the device, under its shard."""
        return f"{self.prefix}/shards/{shard_of(device)}/devices/{device}/presence"

    def device_drift(self, device: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device, 'device id')}/drift"

    def device_command(self, device: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device, 'device id')}/command"

    def group_rollout(self, group: str) -> str:
        """Retained JSON: the group's rollout (gate, window, batches), by the controller."""
        return f"{self.prefix}/groups/{validate_id(group, 'group id')}/rollout"

    def ring_gate(self, ring: str) -> str:
        """Retained JSON: a gated ring's gate and the evidence per content, by the controller."""
        return f"{self.prefix}/rings/{validate_id(ring, 'ring')}/gate"

    def repository_status(self) -> str:
        """Retained JSON: each tracked branch's head commit, accepted or refused, and why."""
        return f"{self.prefix}/repository/status"

    def controller_leader(self) -> str:
        """Retained, signed: which controller replica leads (``proto.leader``)."""
        return f"{self.prefix}/controllers/leader"

    def controller_shard(self, shard: str) -> str:
        """One report shard's lease (replicas that split the shards, SPEC 7.8)."""
        return f"{self.prefix}/controllers/shards/{validate_shard(shard)}"

    def controller_replica(self, replica: str) -> str:
        """One replica's membership record (SPEC 7.8)."""
        return f"{self.prefix}/controllers/replicas/{validate_id(replica, 'replica id')}"

    def all_controller_shards(self) -> str:
        return f"{self.prefix}/controllers/shards/+"

    def all_controller_replicas(self) -> str:
        return f"{self.prefix}/controllers/replicas/+"

    def operator_commands(self) -> str:
        """Signed operator commands (approve, pause, resume) to the controller."""
        return f"{self.prefix}/operators/commands"

    def barrier(self, client_id: str) -> str:
        """A client's private topic: a message it sends there and gets back proves that
        everything the broker sent it before (retained messages included) has arrived."""
        return f"{self.prefix}/clients/{validate_id(client_id, 'client id')}/barrier"

    def event(self, event_type: str) -> str:
        if not isinstance(event_type, str) or _EVENT_TYPE_PATTERN.fullmatch(event_type) is None:
            raise InvalidId(f"event type {event_type!r} is not valid")
        return f"{self.prefix}/events/{event_type}"

    # Subscription filters.
    def all_reported(self, shard: str | None = None) -> str:
        """Every device's report: of every shard, or of the one ``shard``."""
        return f"{self.prefix}/shards/{self._shard_level(shard)}/devices/+/reported"

    def all_presence(self, shard: str | None = None) -> str:
        """Every device's presence: of every shard, or of the one ``shard``."""
        return f"{self.prefix}/shards/{self._shard_level(shard)}/devices/+/presence"

    def device_any_shard(self, device: str) -> list[str]:
        """One device's report and presence under every shard (a conformance check that a
        device publishes only under its own: anything else parses as WrongShardError)."""
        device = validate_id(device, "device id")
        return [f"{self.prefix}/shards/+/devices/{device}/{leaf}" for leaf in _SHARDED]

    def shard_filters(self, shards: Iterable[str]) -> list[str]:
        """The report and presence filters of the given shards (what a replica owning them
        subscribes to), in shard order, each shard once."""
        chosen = sorted({validate_shard(s) for s in shards})
        return [f(s) for s in chosen for f in (self.all_reported, self.all_presence)]

    @staticmethod
    def _shard_level(shard: str | None) -> str:
        return "+" if shard is None else validate_shard(shard)

    def all_drift(self) -> str:
        return f"{self.prefix}/devices/+/drift"

    def all_device_desired(self) -> str:
        return f"{self.prefix}/devices/+/desired"

    def all_device_commands(self) -> str:
        return f"{self.prefix}/devices/+/command"

    def all_group_desired(self) -> str:
        return f"{self.prefix}/groups/+/desired"

    def all_group_status(self) -> str:
        return f"{self.prefix}/groups/+/status"

    def all_group_rollout(self) -> str:
        return f"{self.prefix}/groups/+/rollout"

    def all_ring_gates(self) -> str:
        return f"{self.prefix}/rings/+/gate"

    def all_events(self) -> str:
        return f"{self.prefix}/events/+"

    @staticmethod
    def shared(group_name: str, topic_filter: str) -> str:
        """An MQTT 5 shared-subscription filter (``$share/<name>/<filter>``)."""
        return f"$share/{validate_id(group_name, 'share name')}/{topic_filter}"

    def parse(self, topic: str) -> TopicRef:
        """Return what ``topic`` names, or raise InvalidId if it is not one of ours.

        A report or presence whose shard level is not its device's shard raises
        WrongShardError (an InvalidId): a device's topic ACL cannot hold it to its shard,
        so the receiver drops such a message (and counts it)."""
        if not isinstance(topic, str):
            raise InvalidId(f"topic must be a string, got {type(topic).__name__}")
        levels = topic.split("/")
        if "/".join(levels[: self._levels]) != self.prefix:
            raise InvalidId(f"topic {topic!r} is not under prefix {self.prefix!r}")
        rest = levels[self._levels :]
        if len(rest) == 2 and rest[0] == "events":
            if _EVENT_TYPE_PATTERN.fullmatch(rest[1]) is None:
                raise InvalidId(f"topic {topic!r}: bad event type")
            return TopicRef("event", rest[1])
        if len(rest) == 5 and rest[0] == "shards" and rest[2] == "devices":
            shard, name, leaf = rest[1], rest[3], rest[4]
            if leaf in _SHARDED:
                validate_shard(shard)
                device = validate_id(name, "device id")
                own = _shard(device)
                if shard != own:
                    raise WrongShardError(
                        f"topic {topic!r}: device {device!r} belongs to shard {own!r},"
                        f" not {shard!r}",
                        device=device,
                    )
                return TopicRef(_DEVICE_KINDS[leaf], device, shard)
        if len(rest) == 3:
            section, name, leaf = rest
            if section == "groups" and leaf in ("desired", "status", "rollout"):
                kind: TopicKind = _GROUP_KINDS[leaf]
                return TopicRef(kind, validate_id(name, "group id"))
            if section == "rings" and leaf == "gate":
                return TopicRef("ring-gate", validate_id(name, "ring"))
            if section == "devices" and leaf in ("desired", "drift", "command"):
                return TopicRef(_DEVICE_KINDS[leaf], validate_id(name, "device id"))
        raise InvalidId(f"topic {topic!r} is not a setpoint topic")


_SHARDED: Final = ("reported", "presence")  # the device topics under a shard level
_GROUP_KINDS: Final[dict[str, TopicKind]] = {
    "desired": "group-desired",
    "status": "group-status",
    "rollout": "group-rollout",
}
_DEVICE_KINDS: Final[dict[str, TopicKind]] = {
    "desired": "device-desired",
    "reported": "device-reported",
    "presence": "device-presence",
    "drift": "device-drift",
    "command": "device-command",
}
