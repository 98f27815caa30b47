"""Helpers for the shim's tests against a real mosquitto (imported by conftest and tests).

``Fleet`` signs and publishes bundles the way the controller does (the controller itself is
not used here) and watches the devices' reports and presence; ``Shims`` starts agents in
threads and records their events, so tests wait for what happened instead of sleeping.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.device_shim import Agent, BrokerSettings, DevicePolicy, ShimConfig
from setpoint.proto import bundles, commands, envelopes, reports, trust
from setpoint.proto.bundles import Bundle, Resource
from setpoint.proto.reports import Report
from setpoint.proto.topics import Topics

TIMEOUT = 10.0


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll a condition on something that has no event to wait on (files on disk)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def snapshot(root: Path) -> dict[str, tuple[Any, int, int]]:
    """Everything under ``root`` but setpoint's state dir: content or link, mode, inode."""
    result: dict[str, tuple[Any, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel.startswith(".setpoint/state"):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                body: Any = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                body = "dir"
            else:
                body = Path(full).read_bytes()
            result[rel] = (body, stat.S_IMODE(st.st_mode), st.st_ino)
    return result


class Fleet:
    """A stand-in for the controller: keys, signed bundles, retained publishes, and a watcher."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        directory: Path,
        key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.topics = Topics(prefix)
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = key or Ed25519PrivateKey.generate()
        self.pub = directory / "signing.pub"
        self.pub.write_bytes(envelopes.public_key_pem(self.key.public_key()))
        self._cond = threading.Condition()
        self.reports: dict[str, list[Report]] = {}
        self.presence: dict[str, list[bytes]] = {}
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=f"fleet-{os.getpid()}-{id(self)}",
        )
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.connect(host, port)
        self._client.loop_start()
        self._client.subscribe([(self.topics.all_reported(), 1), (self.topics.all_presence(), 1)])
        assert subscribed.wait(TIMEOUT)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        ref = self.topics.parse(message.topic)
        with self._cond:
            if ref.kind == "device-reported" and message.payload:
                self.reports.setdefault(ref.name, []).append(reports.decode(message.payload))
            elif ref.kind == "device-presence":
                self.presence.setdefault(ref.name, []).append(bytes(message.payload))
            self._cond.notify_all()

    # Bundles.

    def sign(
        self,
        bundle: Bundle,
        *,
        keys: Sequence[Ed25519PrivateKey] | None = None,
        payload_type: str | None = None,
    ) -> bytes:
        return envelopes.sign(
            payload_type or trust.PAYLOAD_TYPES[bundle.kind],
            bundles.encode(bundle),
            list(keys) if keys is not None else [self.key],
        )

    @staticmethod
    def group(
        name: str,
        version: int,
        resources: Sequence[Resource] = (),
        *,
        mode: str = "enforce",
        expires_in: int = 3600,
        commit: str = "c0ffee",
    ) -> Bundle:
        now = int(time.time())
        return Bundle(
            "group",
            name,
            version,
            commit,
            now,
            now + expires_in,
            tuple(resources),
            mode=mode,  # type: ignore[arg-type]
        )

    @staticmethod
    def device(
        name: str,
        version: int,
        group: str,
        resources: Sequence[Resource] = (),
        *,
        vars: Mapping[str, Any] | None = None,
        expires_in: int = 3600,
        commit: str = "c0ffee",
    ) -> Bundle:
        now = int(time.time())
        return Bundle(
            "device",
            name,
            version,
            commit,
            now,
            now + expires_in,
            tuple(resources),
            group=group,
            vars=dict(vars or {}),
        )

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def publish_bundle(self, bundle: Bundle, *, retain: bool = True, **sign_kw: Any) -> bytes:
        data = self.sign(bundle, **sign_kw)
        topic = (
            self.topics.group_desired(bundle.target)
            if bundle.kind == "group"
            else self.topics.device_desired(bundle.target)
        )
        self.publish(topic, data, retain=retain)
        return data

    def command(
        self,
        device: str,
        seq: int,
        *,
        expires_in: int = 60,
        keys: Sequence[Ed25519PrivateKey] | None = None,
    ) -> bytes:
        now = int(time.time())
        cmd = commands.Command(device, "reconcile", seq, now, now + expires_in, "test")
        return commands.sign(cmd, list(keys) if keys is not None else [self.key])

    # Watching.

    def latest(self, device: str) -> Report | None:
        with self._cond:
            got = self.reports.get(device)
            return got[-1] if got else None

    def wait_report(
        self, device: str, predicate: Callable[[Report], Any], timeout: float = TIMEOUT
    ) -> Report:
        """The first report (from now on, or the latest already in) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            start = max(0, len(self.reports.get(device, [])) - 1)
            while True:
                got = self.reports.get(device, [])
                for report in got[start:]:
                    if predicate(report):
                        return report
                start = len(got)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = got[-1] if got else None
                    raise AssertionError(f"no matching report from {device}; last: {last}")
                self._cond.wait(remaining)

    def wait_presence(self, device: str, value: bytes, timeout: float = TIMEOUT) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (self.presence.get(device) or [b""])[-1] == value, timeout
            )
        assert ok, f"presence of {device} never became {value!r}: {self.presence.get(device)}"


def statuses(report: Report) -> dict[str, str]:
    return {r.id: r.status for r in report.resources}


def on_versions(group: int, device: int) -> Callable[[Report], bool]:
    """A report that has applied these versions and has every resource ok or healed."""

    def check(report: Report) -> bool:
        return (
            report.applied_group is not None
            and report.applied_group.version == group
            and report.applied_device is not None
            and report.applied_device.version == device
            and all(r.status in ("ok", "healed", "blocked") for r in report.resources)
        )

    return check


class Shim:
    """One agent in a thread, with its events recorded."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.events: list[tuple[str, Mapping[str, Any]]] = []
        self._cond = threading.Condition()
        self.agent = Agent(config, on_event=self._record)
        self._thread = threading.Thread(target=self.agent.run, name=f"shim-{config.device}")
        self._thread.start()

    def _record(self, name: str, data: Mapping[str, Any]) -> None:
        with self._cond:
            self.events.append((name, data))
            self._cond.notify_all()

    def count(self, name: str) -> int:
        with self._cond:
            return sum(1 for n, _ in self.events if n == name)

    def wait_event(
        self,
        name: str,
        predicate: Callable[[Mapping[str, Any]], Any] = lambda d: True,
        *,
        after: int = 0,
        timeout: float = TIMEOUT,
    ) -> Mapping[str, Any]:
        """The first event ``name`` (counting from index ``after``) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for n, data in self.events[after:]:
                    if n == name and predicate(data):
                        return data
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {name} event; events: {[n for n, _ in self.events]}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def stop(self) -> None:
        self.agent.stop()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class Shims:
    def __init__(self, fleet: Fleet, tmp_path: Path) -> None:
        self.fleet = fleet
        self.tmp = tmp_path
        self.running: list[Shim] = []

    def config(self, device: str = "dev1", **kw: Any) -> ShimConfig:
        root = self.tmp / f"root-{device}"
        root.mkdir(exist_ok=True)
        base: dict[str, Any] = {
            "device": device,
            "root": root,
            # Tests keep the state next to the root they own (the default is outside it).
            "state_dir": root / ".setpoint" / "state",
            "trust_files": (self.fleet.pub,),
            "broker": BrokerSettings(self.fleet.host, self.fleet.port),
            "prefix": self.fleet.topics.prefix,
            "observe_interval": 0.2,
            "heartbeat": 3600.0,
            "reconnect_min": 0.05,
            "reconnect_max": 0.5,
            "retry_base": 60.0,
            "policy": DevicePolicy(),
        }
        base.update(kw)
        return ShimConfig(**base)

    def start(self, device: str = "dev1", **kw: Any) -> Shim:
        shim = Shim(self.config(device, **kw))
        self.running.append(shim)
        return shim

    def restart(self, shim: Shim, **changes: Any) -> Shim:
        shim.stop()
        fresh = Shim(replace(shim.config, **changes))
        self.running.append(fresh)
        return fresh

    def close(self) -> None:
        for shim in self.running:
            if shim.alive:
                shim.stop()


@dataclass
class Converged:
    """A shim that applied group kiosk v2 and device dev1 v2, with what it looked like then:
    the fixture the refusal tests (here and in tests/security) check against."""

    shim: Shim
    fleet: Fleet
    root: Path
    before: dict[str, Any]
    trust: dict[str, Any]

    def state_trust(self) -> dict[str, Any]:
        state = json.loads((self.root / ".setpoint" / "state" / "state.json").read_text())
        return state["trust"]  # type: ignore[no-any-return]

    def refused(self, reason: str, kind: str = "group") -> Report:
        """Wait for the refusal in the report; then check that nothing changed."""
        report = self.fleet.wait_report(
            "dev1", lambda r: any(x.reason == reason and x.kind == kind for x in r.refusals)
        )
        self.unchanged()
        return report

    def unchanged(self) -> None:
        assert snapshot(self.root) == self.before
        assert self.state_trust() == self.trust
        assert self.shim.agent.state.trust.to_dict() == self.trust
        latest = self.fleet.latest("dev1")
        assert latest is not None and on_versions(2, 2)(latest)
