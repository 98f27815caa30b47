"""Helpers for the controller's tests: real git repositories made with the git CLI."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fleetkit import FLEET
from gitkit import GitRepo
from mqttkit import Subscriber

from setpoint.commands import keys
from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.proto import bundles, envelopes, repository, status
from setpoint.proto.bundles import Bundle
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES


@pytest.fixture
def example_repo(tmp_path: Path) -> GitRepo:
    """A git repository holding the example fleet plus ``kiosk-02``, on ``main``."""
    repo = GitRepo(tmp_path / "fleet")
    repo.commit(FLEET, "example fleet")
    return repo


@pytest.fixture
def make_repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(files: Mapping[str, str | None] | None = None, name: str = "fleet") -> GitRepo:
        repo = GitRepo(tmp_path / name)
        if files is not None:
            repo.commit(files, "first")
        return repo

    return make


# --- Keys, controllers and a plain MQTT observer ---------------------------------------


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    keys.generate(tmp_path / "keys")
    return tmp_path / "keys" / keys.PRIVATE_NAME


@pytest.fixture
def public_key(signing_key: Path) -> dict[str, Any]:
    """The fleet's public key as a verifier would load it: from signing.pub, PEM."""
    pem = (signing_key.parent / keys.PUBLIC_NAME).read_bytes()
    return envelopes.trusted_keys([envelopes.load_public_key(pem)])


@pytest.fixture
def run_controller(broker: Any, unique_prefix: str, signing_key: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """``async with run_controller(repo, **config) as controller``: a real controller."""

    @contextlib.asynccontextmanager
    async def run(repo: Any, **overrides: Any) -> AsyncIterator[Controller]:
        overrides.setdefault("state_dir", tmp_path / "state")
        overrides.setdefault("backoff", Backoff(base=0.05, cap=0.3))
        overrides.setdefault("publish_timeout", 5.0)
        config = ControllerConfig(
            repo=str(getattr(repo, "path", repo)),
            broker=BrokerSettings(broker.host, broker.port),
            key_path=signing_key,
            prefix=unique_prefix,
            **overrides,
        )
        async with Controller(config) as controller:
            yield controller

    return run


def target_of(topics: Topics, topic: str) -> str | None:
    ref = topics.parse(topic)
    if ref.kind == "group-desired":
        return f"group/{ref.name}"
    if ref.kind == "device-desired":
        return f"device/{ref.name}"
    return None


def verify(target: str, payload: bytes, trusted: Mapping[str, Any]) -> Bundle:
    """What any subscriber holding signing.pub does: verify, then decode."""
    kind = target.split("/")[0]
    return bundles.decode(envelopes.verify(payload, trusted, payload_type=PAYLOAD_TYPES[kind]))


class Observer(Subscriber):
    """A plain aiomqtt subscriber to the desired topics and the events."""

    def __init__(self, host: str, port: int, prefix: str, trusted: Mapping[str, Any]) -> None:
        super().__init__(host, port, f"observer-{secrets.token_hex(4)}")
        self.topics = Topics(prefix)
        self.trusted = trusted
        self.retained: dict[str, bytes] = {}
        self.arrivals: list[tuple[float, str, bytes]] = []
        self.events: list[dict[str, Any]] = []
        self.repository: repository.RepositoryStatus | None = None

    def filters(self) -> list[tuple[str, int]]:
        return [
            (self.topics.all_group_desired(), 1),
            (self.topics.all_device_desired(), 1),
            (self.topics.all_events(), 1),
            (self.topics.repository_status(), 1),
        ]

    async def handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.repository_status():
            self.repository = repository.from_json(payload) if payload else None
            return
        ref = self.topics.parse(topic)
        if ref.kind == "event":
            self.events.append(status.event_from_json(payload))
            return
        target = target_of(self.topics, topic)
        assert target is not None
        self.arrivals.append((time.time(), target, payload))
        if payload:
            self.retained[target] = payload
        else:
            self.retained.pop(target, None)

    def bundle(self, target: str) -> Bundle | None:
        payload = self.retained.get(target)
        return None if payload is None else verify(target, payload, self.trusted)

    def version(self, target: str) -> int:
        """The retained version of ``target`` (0 if nothing is retained)."""
        bundle = self.bundle(target)
        return 0 if bundle is None else bundle.version

    def holds(self, target: str, test: Callable[[Bundle], bool]) -> bool:
        bundle = self.bundle(target)
        return bundle is not None and test(bundle)

    def versions(self) -> dict[str, int]:
        return {t: verify(t, p, self.trusted).version for t, p in sorted(self.retained.items())}

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    def verdict(self, branch: str = "main") -> repository.BranchStatus | None:
        """The controller's retained verdict on ``branch``'s head, if any."""
        return None if self.repository is None else self.repository.branches.get(branch)


@pytest.fixture
def observe(broker: Any, unique_prefix: str, public_key: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    def make() -> Observer:
        return Observer(broker.host, broker.port, unique_prefix, public_key)

    return make


async def read_retained(
    host: str, port: int, prefix: str, trusted: Mapping[str, Any], timeout: float = 10.0
) -> dict[str, Bundle]:
    """Connect (retrying while the broker is down), read every retained bundle, verify."""
    topics = Topics(prefix)
    marker = f"setpoint-test/marker/{secrets.token_hex(4)}"
    found: dict[str, Bundle] = {}
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with aiomqtt.Client(host, port) as client:
                    # QoS 0: mosquitto drops QoS 1 retained floods beyond its queue limit.
                    await client.subscribe(
                        [
                            (topics.all_group_desired(), 0),
                            (topics.all_device_desired(), 0),
                            (marker, 0),
                        ]
                    )
                    await client.publish(marker, b"x", qos=1)
                    async for message in client.messages:
                        topic = str(message.topic)
                        if topic == marker:
                            return found
                        target = target_of(topics, topic)
                        if target and message.payload:
                            found[target] = verify(target, bytes(message.payload), trusted)  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)
