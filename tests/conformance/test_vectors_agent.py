"""The reference agent against the behaviour vectors: sequences, refusals, the settings file.

``proto/vectors/vectors.json`` says what a device runs after each message of a sequence
(a move to another group and back, a pinned group version), which refusal entry each bad
message gives, and the bytes of the settings file. These tests feed the vectors to a real
:class:`~setpoint.device_shim.Agent` (no broker: messages are handed to it as the MQTT link
would, and it runs one pass after each) with the clock at the vectors' ``now``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from setpoint.device_shim import Agent, DevicePolicy, ShimConfig
from setpoint.proto import bundles, envelopes
from setpoint.proto.bundles import Bundle, SettingResource
from setpoint.proto.topics import DEFAULT_PREFIX

VECTORS = Path(__file__).resolve().parents[2] / "proto" / "vectors"
DATA: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
KEY_FILES = {k["keyid"]: VECTORS / k["public_pem"] for k in DATA["keys"]}
PRIVATE = envelopes.load_private_key((VECTORS / "test-key.pem").read_bytes())


class Replay:
    """One agent, fed messages by hand."""

    def __init__(self, root: Path, device: str, trusted: list[str], now: float) -> None:
        root.mkdir()
        config = ShimConfig(
            device=device,
            root=root,
            state_dir=root.parent / f"{root.name}-state",  # the default is machine-wide
            trust_files=tuple(KEY_FILES[k] for k in trusted),
            policy=DevicePolicy(allow_commands=False),
        )
        self.agent = Agent(config, clock=lambda: now)
        self.agent.start()

    def deliver(self, topic: str, payload: bytes) -> None:
        self.agent._on_message(f"{DEFAULT_PREFIX}/{topic}", payload)
        self.agent.run_once()

    def close(self) -> None:
        self.agent.close()


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[Any]:
    made: list[Replay] = []

    def make(device: str, trusted: list[str], now: float) -> Replay:
        r = Replay(tmp_path / f"root{len(made)}", device, trusted, now)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def applied(report: Any) -> dict[str, Any]:
    def one(a: Any) -> Any:
        return None if a is None else {"target": a.target, "version": a.version}

    return {"group": one(report.applied_group), "device": one(report.applied_device)}


def refusal_entry(refusal: Any) -> dict[str, Any]:
    return {
        "kind": refusal.kind,
        "target": refusal.target,
        "version": refusal.version,
        "reason": refusal.reason,
    }


@pytest.mark.parametrize("sequence", DATA["sequences"], ids=lambda s: s["name"])
def test_the_agent_follows_the_sequence(replay: Any, sequence: dict[str, Any]) -> None:
    r = replay(sequence["device"], sequence["trusted"], sequence["now"])
    for number, step in enumerate(sequence["steps"], 1):
        before = len(r.agent.build_report().refusals)
        r.deliver(step["topic"], bytes.fromhex(step["envelope_hex"]))
        report = r.agent.build_report()
        expect = step["expect"]
        where = f"step {number} ({step['note']})"
        assert applied(report) == expect["applied"], where
        assert report.group == expect["group"], where
        if expect["refusal"] is None:
            assert len(report.refusals) == before, f"{where}: {report.refusals}"
        else:
            assert refusal_entry(report.refusals[-1]) == expect["refusal"], where
        if "resources" in expect:
            got = {x.id: x.digest for x in report.resources}
            assert got == expect["resources"], where
            assert {x.status for x in report.resources} == {"ok"}, where


@pytest.mark.parametrize(
    "vector",
    [
        v
        for v in DATA["invalid"]
        if v["verify"]["threshold"] == 1
        and v["verify"]["max_size"] == envelopes.MAX_ENVELOPE_BYTES
        and v["trust"]["group"] == "kiosks"
        and not v["trust"]["floors"]
        and v["trust"]["device"] == "kiosk-01"
    ],
    ids=lambda v: v["name"],
)
def test_the_agent_reports_the_refusal_the_vector_names(
    replay: Any, vector: dict[str, Any]
) -> None:
    trust = vector["trust"]
    r = replay(trust["device"], vector["verify"]["trusted"], trust["now"])
    # Give the device its group first: a device bundle naming 'kiosks' (as a controller
    # would), valid whatever the vector's clock.
    device = dataclasses.replace(VALID_DEVICE, expires_at=trust["now"] + 3600)
    r.deliver("devices/kiosk-01/desired", envelopes.sign(
        envelopes.DEVICE_BUNDLE_TYPE, bundles.encode(device), [PRIVATE]))  # fmt: skip
    r.deliver(vector["topic"], bytes.fromhex(vector["envelope_hex"]))
    report = r.agent.build_report()
    assert report.refusals, "nothing was refused"
    assert refusal_entry(report.refusals[-1]) == vector["refusal"]


VALID_DEVICE: Bundle = bundles.decode(
    bytes.fromhex(next(v for v in DATA["valid"] if v["name"] == "device-bundle")["payload_hex"])
)


@pytest.mark.parametrize("vector", DATA["invalid_commands"], ids=lambda v: v["name"])
def test_the_agent_refuses_the_command_vector(replay: Any, vector: dict[str, Any]) -> None:
    state = vector["state"]
    r = replay(state["device"], vector["trusted"], state["now"])
    r.agent.state = dataclasses.replace(r.agent.state, command_seq=state["last_seq"])
    r.deliver(vector["topic"], bytes.fromhex(vector["envelope_hex"]))
    report = r.agent.build_report()
    assert report.refusals
    assert refusal_entry(report.refusals[-1]) == vector["refusal"]


def test_the_agent_writes_the_settings_file_of_the_vector(replay: Any, tmp_path: Path) -> None:
    written = DATA["settings_file"][0]

    def untyped(value: dict[str, Any]) -> Any:
        [(tag, raw)] = value.items()
        return float(raw) if tag == "float" else raw

    values = {k: untyped(v) for k, v in written["values"].items()}
    now = DATA["sequences"][0]["now"]
    group = bundles.decode(
        bytes.fromhex(next(v for v in DATA["valid"] if v["name"] == "group-bundle")["payload_hex"])
    )
    settings = tuple(
        SettingResource(f"s{i}", key, value) for i, (key, value) in enumerate(values.items())
    )
    group = Bundle("group", "kiosks", 3, group.commit, group.issued_at, group.expires_at, settings)
    device = Bundle(
        "device", "kiosk-01", 2, group.commit, group.issued_at, group.expires_at, (),
        group="kiosks",
    )  # fmt: skip
    r = replay("kiosk-01", [DATA["keys"][0]["keyid"]], now)
    for bundle, topic in ((device, "devices/kiosk-01/desired"), (group, "groups/kiosks/desired")):
        kind_type = envelopes.DEVICE_BUNDLE_TYPE if bundle.kind == "device" else (
            envelopes.GROUP_BUNDLE_TYPE)  # fmt: skip
        r.deliver(topic, envelopes.sign(kind_type, bundles.encode(bundle), [PRIVATE]))
    report = r.agent.build_report()
    assert {x.status for x in report.resources} == {"ok"}, report.resources
    path = r.agent.config.root / ".setpoint" / "settings.json"
    assert path.read_bytes().hex() == written["file_hex"]
    assert {x.id: x.digest for x in report.resources} == {
        f"s{i}": written["digests"][key] for i, key in enumerate(values)
    }
