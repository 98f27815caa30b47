"""The controller against a real mosquitto and real git repositories.

Every test waits on what a plain MQTT subscriber sees (or on the controller settling),
never on a guessed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fleetkit import FLEET

from setpoint.controller.rendering import Target

pytestmark = pytest.mark.broker

ALL = {"group/kiosks", "group/gateways", "device/kiosk-01", "device/kiosk-02", "device/gw-01"}
KIOSK_01_HALL = "group: kiosks\nvars:\n  site: hall\n"


async def test_publishes_every_target_signed_and_retained(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await seen.wait(lambda: set(seen.retained) == ALL)
        head = example_repo.head()
        for target in ALL:
            bundle = seen.bundle(target)  # verified with signing.pub
            assert bundle is not None and bundle.version == 1 and bundle.commit == head
            assert bundle.expires_at > bundle.issued_at
        assert seen.bundle("device/kiosk-02").vars == {"site": "cafeteria"}
        await controller.settle(10)
        assert set(map(str, controller.desired())) == ALL
        await seen.wait(lambda: len(seen.of_type("published")) == len(ALL))
        event = next(e for e in seen.of_type("published") if e["target"] == "kiosks")
        assert event["kind"] == "group" and event["version"] == 1 and event["commit"] == head
        assert event["author"] == "Alice Operator <alice@example.com>"
        assert event["reason"] == "change"


async def test_commit_changes_exactly_the_affected_targets(
    example_repo: Any, run_controller: Any, observe: Any, tmp_path: Path
) -> None:
    async with observe() as seen, run_controller(example_repo):
        await seen.wait(lambda: set(seen.retained) == ALL)
        before = len(seen.arrivals)
        commit = example_repo.commit(
            {"devices/kiosk-01.yaml": KIOSK_01_HALL},
            "kiosk-01 moves",
            author="Bob <bob@example.com>",
        )
        await seen.wait(lambda: seen.version("device/kiosk-01") == 2)
        bundle = seen.bundle("device/kiosk-01")
        assert bundle.vars == {"site": "hall"} and bundle.commit == commit
        await seen.wait(lambda: any(e["version"] == 2 for e in seen.of_type("published")))
    assert [t for _, t, _ in seen.arrivals[before:]] == ["device/kiosk-01"]
    assert {t: v for t, v in seen.versions().items() if v != 1} == {"device/kiosk-01": 2}
    history = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").open()]
    last = history[-1]
    assert (last["target"], last["version"], last["commit"], last["author"], last["reason"]) == (
        "device/kiosk-01",
        2,
        commit,
        "Bob <bob@example.com>",
        "change",
    )


async def test_restarted_controller_republishes_nothing(
    example_repo: Any, run_controller: Any, observe: Any, tmp_path: Path
) -> None:
    async with run_controller(example_repo) as controller:
        await controller.settle(10)
    audit_lines = (tmp_path / "state" / "audit.jsonl").read_text().count("\n")
    async with observe() as seen, run_controller(example_repo) as controller:
        await seen.wait(lambda: set(seen.retained) == ALL)
        arrived = len(seen.arrivals)
        await controller.settle(10)
    assert len(seen.arrivals) == arrived  # only the retained copies, nothing new
    assert seen.versions() == dict.fromkeys(sorted(ALL), 1)
    assert (tmp_path / "state" / "audit.jsonl").read_text().count("\n") == audit_lines


async def test_lost_state_dir_recovers_versions_from_retained(
    example_repo: Any, run_controller: Any, observe: Any, tmp_path: Path
) -> None:
    async with run_controller(example_repo, state_dir=tmp_path / "s1") as controller:
        await controller.settle(10)
    example_repo.commit({"devices/kiosk-01.yaml": KIOSK_01_HALL})
    async with run_controller(example_repo, state_dir=tmp_path / "s1") as controller:
        await controller.settle(10)
    # A brand-new state directory: versions come from the broker, and go on up.
    async with observe() as seen, run_controller(example_repo, state_dir=tmp_path / "s2") as c:
        await c.settle(10)
        await seen.wait(lambda: set(seen.retained) == ALL)
        assert seen.versions()["device/kiosk-01"] == 2
        adopted = [json.loads(x) for x in (tmp_path / "s2" / "audit.jsonl").open()]
        assert {e["reason"] for e in adopted} == {"adopted"}
        example_repo.commit({"devices/kiosk-01.yaml": "group: kiosks\nvars: {site: roof}\n"})
        await seen.wait(lambda: seen.version("device/kiosk-01") == 3)
    assert seen.versions()["group/kiosks"] == 1


@pytest.mark.parametrize(
    ("name", "files", "file", "message"),
    [
        (
            "invalid YAML",
            {"groups/kiosks.yaml": "mode: [enforce\n"},
            "groups/kiosks.yaml",
            "invalid YAML: line",
        ),
        (
            "unknown key",
            {"groups/kiosks.yaml": "mode: enforce\nresource: []\n"},
            "groups/kiosks.yaml",
            "unknown key 'resource'",
        ),
        (
            "unknown kind",
            {"groups/kiosks.yaml": "resources:\n  - {id: motd, kind: fiel}\n"},
            "groups/kiosks.yaml",
            "resource 'motd': unknown kind 'fiel' (known: command, file, setting)",
        ),
        (
            "bad id",
            {"devices/Kiosk-03.yaml": "group: kiosks\n"},
            "devices/Kiosk-03.yaml",
            "device id 'Kiosk-03' is not valid",
        ),
        (
            "duplicate resource id",
            {
                "groups/kiosks.yaml": "resources:\n"
                "  - {id: a, kind: setting, key: x}\n"
                "  - {id: a, kind: setting, key: y}\n"
            },
            "groups/kiosks.yaml",
            "resource 'a': duplicate id",
        ),
        (
            "device in missing group",
            {"devices/kiosk-01.yaml": "group: kiosk\n"},
            "devices/kiosk-01.yaml",
            "group 'kiosk' does not exist",
        ),
        (
            "path escape",
            {
                "groups/kiosks.yaml": "resources:\n"
                "  - {id: a, kind: file, path: ../../etc/passwd, content: x}\n"
            },
            "groups/kiosks.yaml",
            "must be a normalised path inside the device root",
        ),
        (
            "missing content file",
            {"files/kiosk/config.ini": None},
            "groups/kiosks.yaml",
            "source 'files/kiosk/config.ini' does not exist",
        ),
        (
            "alias bomb",
            {
                "groups/kiosks.yaml": "a: &a [x, x, x, x, x, x, x, x]\n"
                "b: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n"
            },
            "groups/kiosks.yaml",
            "anchors (&a) are not allowed",
        ),
    ],
)
async def test_bad_commit_keeps_last_good_and_reports(
    example_repo: Any,
    run_controller: Any,
    observe: Any,
    name: str,
    files: dict[str, str | None],
    file: str,
    message: str,
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        await seen.wait(lambda: set(seen.retained) == ALL)
        good = dict(seen.retained)
        # The same commit also makes a valid change elsewhere: that one goes out.
        changes = {**files, "devices/gw-01.yaml": "group: gateways\nvars: {site: cellar}\n"}
        commit = example_repo.commit(changes, f"bad: {name}", author="Mallory <m@example.com>")
        await seen.wait(lambda: seen.of_type("repository-error"))
        await seen.wait(lambda: seen.version("device/gw-01") == 2)
        await controller.settle(10)
    [error] = seen.of_type("repository-error")
    assert error["commit"] == commit and error["branch"] == "main"
    assert error["author"] == "Mallory <m@example.com>"
    assert error["file"] == file and message in error["message"]
    for target in ALL - {"device/gw-01"}:
        assert seen.retained[target] == good[target], target  # last good bundle kept
    assert set(seen.retained) == ALL  # nothing cleared


async def test_alias_bomb_is_rejected_fast(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    levels = ["l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        example_repo.commit({"groups/kiosks.yaml": "\n".join(levels) + "\n"}, "bomb")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await seen.wait(lambda: seen.of_type("repository-error"), timeout=5)
        assert loop.time() - started < 2.0
        assert seen.bundle("group/kiosks").version == 1


async def test_deleting_everything_is_refused_unless_allowed(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    everything = {name: None for name in FLEET if name != "fleet.yaml"}
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        example_repo.commit(everything, "delete it all")
        await seen.wait(lambda: seen.of_type("repository-error"))
        [error] = seen.of_type("repository-error")
        assert "allow_empty: true" in error["message"] and error["file"] == "fleet.yaml"
        await controller.settle(10)
        assert set(seen.retained) == ALL
        example_repo.commit({"fleet.yaml": "allow_empty: true\n"}, "yes, really")
        await seen.wait(lambda: not seen.retained)
        await seen.wait(lambda: len(seen.of_type("removed")) == len(ALL))


async def test_removed_group_and_device_are_cleared_with_events(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        commit = example_repo.commit(
            {"groups/gateways.yaml": None, "devices/gw-01.yaml": None}, "retire gateways"
        )
        await seen.wait(
            lambda: "group/gateways" not in seen.retained and "device/gw-01" not in seen.retained
        )
        await seen.wait(lambda: len(seen.of_type("removed")) == 2)
    removed = {(e["kind"], e["target"]): e for e in seen.of_type("removed")}
    assert set(removed) == {("group", "gateways"), ("device", "gw-01")}
    assert removed[("group", "gateways")]["commit"] == commit
    assert removed[("group", "gateways")]["version"] == 1
    # The device's clear reached the broker before its group's.
    cleared = [t for _, t, p in seen.arrivals if not p]
    assert cleared == ["device/gw-01", "group/gateways"]


async def test_removed_target_that_comes_back_continues_its_versions(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        example_repo.commit({"devices/gw-01.yaml": None})
        await seen.wait(lambda: "device/gw-01" not in seen.retained)
        example_repo.commit({"devices/gw-01.yaml": "group: gateways\n"})
        await seen.wait(lambda: "device/gw-01" in seen.retained)
        assert seen.bundle("device/gw-01").version == 2


async def test_force_push_rewriting_history_versions_only_go_up(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    first = example_repo.head()
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        example_repo.commit({"devices/kiosk-01.yaml": KIOSK_01_HALL}, "v2")
        await seen.wait(lambda: seen.version("device/kiosk-01") == 2)
        example_repo.git("reset", "-q", "--hard", first)  # history rewritten
        await seen.wait(lambda: seen.version("device/kiosk-01") == 3)
        bundle = seen.bundle("device/kiosk-01")
        assert bundle.vars == {"site": "lobby"} and bundle.commit == first
        await controller.settle(10)
    assert {t: v for t, v in seen.versions().items() if v != 1} == {"device/kiosk-01": 3}


async def test_two_commits_in_quick_succession_the_later_wins(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        example_repo.commit({"devices/kiosk-01.yaml": KIOSK_01_HALL}, "one")
        last = example_repo.commit(
            {
                "devices/kiosk-02.yaml": "group: kiosks\nvars: {site: dock}\n",
                "groups/gateways.yaml": "mode: enforce\n",
            },
            "two",
        )
        await seen.wait(
            lambda: (
                seen.holds("device/kiosk-02", lambda b: b.commit == last)
                and seen.holds("group/gateways", lambda b: b.mode == "enforce")
            )
        )
        await controller.settle(10)
    # Nothing lost in between: the first commit's change is there too.
    assert seen.bundle("device/kiosk-01").vars == {"site": "hall"}
    assert seen.bundle("device/kiosk-02").vars == {"site": "dock"}
    # Versions went up by one per change seen, never down.
    for target in ("device/kiosk-01", "device/kiosk-02", "group/gateways"):
        versions = [
            v for _, t, p in seen.arrivals if t == target and p for v in [seen_version(seen, t, p)]
        ]
        assert versions == sorted(versions) and versions[-1] == 2


def seen_version(seen: Any, target: str, payload: bytes) -> int:
    from .conftest import verify

    return verify(target, payload, seen.trusted).version


CANARY_GROUP = (
    "branch: canary\nmode: enforce\n"
    "resources:\n  - {id: motd, kind: file, path: etc/motd, content: v1}\n"
)


async def test_change_on_canary_republishes_only_canary_groups(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    example_repo.commit(
        {"groups/ring.yaml": CANARY_GROUP, "devices/c1.yaml": "group: ring\n"}, "a canary ring"
    )
    example_repo.commit({}, "canary branch", branch="canary")
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        await seen.wait(lambda: set(seen.retained) == ALL | {"group/ring", "device/c1"})
        before = len(seen.arrivals)
        changed = {
            "groups/ring.yaml": CANARY_GROUP.replace("v1", "v2"),
            "groups/kiosks.yaml": "mode: observe\n",  # kiosks track main: ignored here
        }
        commit = example_repo.commit(changed, "try on canary", branch="canary")
        await seen.wait(lambda: seen.version("group/ring") == 2)
        await controller.settle(10)
        assert seen.bundle("group/ring").commit == commit
        assert [t for _, t, _ in seen.arrivals[before:]] == ["group/ring"]
        assert seen.bundle("group/kiosks").mode == "enforce"


async def test_moving_a_device_between_groups(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        await seen.wait(lambda: set(seen.retained) == ALL)
        before = len(seen.arrivals)
        example_repo.commit({"devices/kiosk-01.yaml": "group: gateways\n"}, "move")
        await seen.wait(lambda: seen.holds("device/kiosk-01", lambda b: b.group == "gateways"))
        await controller.settle(10)
    assert [t for _, t, _ in seen.arrivals[before:]] == ["device/kiosk-01"]
    assert seen.bundle("device/kiosk-01").version == 2


async def test_a_retained_bundle_overwritten_by_someone_is_put_back(
    example_repo: Any, run_controller: Any, observe: Any, broker: Any, unique_prefix: str
) -> None:
    import aiomqtt

    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        good = seen.retained["group/kiosks"]
        topic = Target("group", "kiosks").topic(controller.topics)

        def arrived(payload: bytes, since: int) -> bool:
            return any(t == "group/kiosks" and p == payload for _, t, p in seen.arrivals[since:])

        async with aiomqtt.Client(broker.host, broker.port) as intruder:
            for bad in (b"forged", b""):  # a forgery, then a clear by hand
                mark = len(seen.arrivals)
                await intruder.publish(topic, bad, qos=1, retain=True)
                await seen.wait(lambda b=bad, m=mark: arrived(b, m))
                await seen.wait(lambda m=mark: seen.arrivals[-1][1:] == ("group/kiosks", good))
        await controller.settle(10)
        assert seen.retained["group/kiosks"] == good


async def test_bundles_are_refreshed_before_they_expire(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    example_repo.commit({"fleet.yaml": "bundle_ttl: 2s\n"}, "short-lived bundles")
    async with observe() as seen, run_controller(example_repo):
        await seen.wait(lambda: set(seen.retained) == ALL)
        first = seen.bundle("group/kiosks")
        assert first.expires_at - first.issued_at == 2
        await seen.wait(
            lambda: seen.holds("group/kiosks", lambda b: b.issued_at > first.issued_at), timeout=5
        )
        refreshed = seen.bundle("group/kiosks")
        assert refreshed.version == first.version
        assert refreshed.content_digest() == first.content_digest()
        assert refreshed.expires_at > first.expires_at
        await seen.wait(lambda: any(e["reason"] == "refresh" for e in seen.of_type("published")))


async def test_signing_key_readable_by_others_is_warned_about(
    example_repo: Any, run_controller: Any, signing_key: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(signing_key, 0o644)
    async with run_controller(example_repo) as controller:
        await controller.settle(10)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("group or others can read" in w and "chmod 600" in w for w in warnings)
    pem = signing_key.read_text()
    assert not any(pem.splitlines()[1] in r.getMessage() for r in caplog.records)


async def test_empty_repository_publishes_nothing_until_the_first_commit(
    make_repo: Any, run_controller: Any, observe: Any
) -> None:
    repo = make_repo()  # `git init`, no commit yet
    async with observe() as seen, run_controller(repo) as controller:
        await controller.settle(10)
        assert controller.desired() == {}
        repo.commit(FLEET, "first fleet")
        await seen.wait(lambda: set(seen.retained) == ALL)


async def test_the_drift_engine_sees_every_publication_and_the_desired_bundles(
    example_repo: Any,
    broker: Any,
    signing_key: Path,
    unique_prefix: str,
    tmp_path: Path,
) -> None:
    from setpoint.controller import BrokerSettings, Controller, ControllerConfig
    from setpoint.controller.drifting import DriftSettings

    config = ControllerConfig(
        repo=str(example_repo.path),
        broker=BrokerSettings(broker.host, broker.port),
        key_path=signing_key,
        state_dir=tmp_path / "state",
        prefix=unique_prefix,
    )
    async with Controller(config, drift=DriftSettings(tick=0.2)) as controller:
        engine = controller.drift
        assert engine is not None
        await asyncio.wait_for(engine.ready.wait(), 10)
        await controller.settle(10)
        counted = engine.metrics.publications
        assert counted.labels("device", "change")._value.get() == 3
        assert counted.labels("group", "change")._value.get() == 2
        await engine.wait_for(
            lambda: set(engine._fleet.desired) == {"kiosk-01", "kiosk-02", "gw-01"}
        )
        desired = controller.desired()
        assert desired[Target("device", "kiosk-02")].vars == {"site": "cafeteria"}
        example_repo.commit({"devices/gw-01.yaml": None})
        await controller.settle(10)
        await engine.wait_for(lambda: "gw-01" not in engine._fleet.desired)
        assert counted.labels("device", "removed")._value.get() == 1
        assert Target("device", "gw-01") not in controller.desired()


async def test_one_loop_runs_the_drift_step_and_keeps_refresh_times_by_publication(
    example_repo: Any,
    broker: Any,
    signing_key: Path,
    unique_prefix: str,
    tmp_path: Path,
) -> None:
    """The controller's one loop decides drift too (no task of the drift engine's own),
    and the earliest refresh it waits for, kept as publications happen, is what a scan
    of every published bundle gives."""
    from setpoint.controller import BrokerSettings, Controller, ControllerConfig, planning
    from setpoint.controller.drifting import DriftSettings

    config = ControllerConfig(
        repo=str(example_repo.path),
        broker=BrokerSettings(broker.host, broker.port),
        key_path=signing_key,
        state_dir=tmp_path / "state",
        prefix=unique_prefix,
        bundle_ttl=3600,
    )
    async with Controller(config, drift=DriftSettings(tick=0.2)) as controller:
        engine = controller.drift
        assert engine is not None
        await asyncio.wait_for(engine.ready.wait(), 10)
        await controller.settle(10)
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert "reconcile" in names and "drift" not in names
        passes = engine.passes
        await engine.wait_for(lambda: engine.passes > passes + 1)  # the tick, in the loop
        assert controller._next_refresh() == planning.next_refresh(controller.published())
        await asyncio.sleep(1.1)  # the next bundle is issued a second later
        example_repo.commit({"devices/gw-01.yaml": None})
        example_repo.commit(
            {"devices/kiosk-01.yaml": FLEET["devices/kiosk-01.yaml"].replace("lobby", "hall")}
        )
        await controller.settle(10)
        assert controller._next_refresh() == planning.next_refresh(controller.published())
        assert controller._next_refresh() is not None


async def test_refused_commit_is_retained_in_the_repository_status(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        first = example_repo.head()
        await seen.wait(lambda: (v := seen.verdict()) is not None and v.head == first)
        verdict = seen.verdict()
        assert verdict is not None and verdict.accepted and not verdict.problems
        assert verdict.subject == "example fleet"
        kiosks = FLEET["groups/kiosks.yaml"].replace("kind: file", "kind: fiel", 1)
        bad = example_repo.commit({"groups/kiosks.yaml": kiosks}, "typo")
        await seen.wait(lambda: (v := seen.verdict()) is not None and v.head == bad)
        refused = seen.verdict()
        assert refused is not None and not refused.accepted
        [problem] = refused.problems
        assert (problem.file, problem.line) == ("groups/kiosks.yaml", 5)
        assert str(problem) == (
            "groups/kiosks.yaml:5: resource 'motd': unknown kind 'fiel'"
            " (known: command, file, setting)"
        )
        fixed = example_repo.commit({"groups/kiosks.yaml": FLEET["groups/kiosks.yaml"]})
        await seen.wait(lambda: (v := seen.verdict()) is not None and v.head == fixed)
        assert seen.verdict().accepted  # type: ignore[union-attr]


async def test_a_commit_with_an_empty_tree_is_a_loud_repository_error(
    make_repo: Any, run_controller: Any, observe: Any, caplog: Any
) -> None:
    # `setpoint init` before its fix: the files were written but the commit's tree is empty.
    repo = make_repo()
    empty = repo.commit({}, "empty")
    async with observe() as seen, run_controller(repo) as controller:
        await controller.settle(10)
        await seen.wait(lambda: (v := seen.verdict()) is not None and v.head == empty)
    verdict = seen.verdict()
    assert verdict is not None and not verdict.accepted
    [problem] = verdict.problems
    assert problem.file is None and problem.message.startswith(
        "no fleet.yaml, groups/ or devices/ at the top of the repository"
    )
    [error] = seen.of_type("repository-error")
    assert error["commit"] == empty
    assert controller.last_render is not None and controller.last_render.problems
    assert f"repository error on main@{empty[:12]}" in caplog.text
    assert not seen.retained


async def test_a_publication_acknowledged_but_not_recorded_is_announced_after_a_restart(
    example_repo: Any, run_controller: Any, observe: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from setpoint.controller.service import Controller

    async with run_controller(example_repo) as controller:
        await controller.settle(10)
    # The controller dies after the broker acknowledged kiosk-01 v2 and before it saved its
    # state and audit line: that saving is what never happens.
    real_persist = Controller._persist
    monkeypatch.setattr(Controller, "_persist", lambda self, done: None)
    async with observe() as seen, run_controller(example_repo) as controller:
        example_repo.commit({"devices/kiosk-01.yaml": KIOSK_01_HALL}, "kiosk-01 to the hall")
        await seen.wait(lambda: seen.version("device/kiosk-01") == 2)
        await controller.settle(10)
    monkeypatch.setattr(Controller, "_persist", real_persist)
    audit = tmp_path / "state" / "audit.jsonl"
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        await seen.wait(lambda: bool(seen.of_type("published")))
        [event] = seen.of_type("published")
        assert (event["target"], event["version"], event["reason"]) == ("kiosk-01", 2, "change")
        assert event["digest"] and event["author"]
    lines = [json.loads(x) for x in audit.open()]
    [entry] = [e for e in lines if e["target"] == "device/kiosk-01" and e["version"] == 2]
    assert entry["reason"] == "change" and entry["digest"] == event["digest"]


async def test_an_adopted_bundle_is_audited_with_its_digest(
    example_repo: Any, run_controller: Any, tmp_path: Path
) -> None:
    async with run_controller(example_repo, state_dir=tmp_path / "s1") as controller:
        await controller.settle(10)
    async with run_controller(example_repo, state_dir=tmp_path / "s2") as controller:
        await controller.settle(10)
    adopted = [json.loads(x) for x in (tmp_path / "s2" / "audit.jsonl").open()]
    assert adopted and all(e["reason"] == "adopted" and e["digest"] for e in adopted)


async def test_gating_is_part_of_every_controller(
    make_repo: Any, run_controller: Any, observe: Any
) -> None:
    """``Controller(config)``, nothing else wired in: a gated ring's content still waits."""
    from rolloutkit import ringed_files

    repo = make_repo(ringed_files())
    repo.git("branch", "canary")
    repo.git("branch", "production")
    async with observe() as seen, run_controller(repo) as controller:
        await controller.settle(10)
        # Groups go out before devices, in order on one connection: once qa-1's bundle is
        # here, any group bundle published with it would be too.
        await seen.wait(lambda: "device/qa-1" in seen.retained)
        assert "group/qa" in seen.retained
        assert "group/canaries" not in seen.retained
        assert "group/prod" not in seen.retained
        assert controller.rollouts.views  # the gates' statuses are published


def test_a_publication_names_the_head_of_its_branch_not_the_commit_it_was_rendered_from() -> None:
    """A render keeps an unchanged target's bundle as it was rendered (the commit that last
    changed it, not content); what a later commit does publish (a rollout's pin moving a
    device's group_version) names that commit and its author, stamped at publication.
    Restores and refreshes re-sign what was published, as it was."""
    from setpoint.controller import service
    from setpoint.controller.commits import CommitInfo
    from setpoint.controller.planning import Adopt, Plan, Publish
    from setpoint.controller.rendering import Render
    from setpoint.proto.bundles import Bundle

    old, new = "a" * 40, "b" * 40
    head = CommitInfo(id=new, author="Bob <bob@example.com>", summary="", time=0, tree=b"t" * 40)
    render = Render("main", commits={"main": new}, head=head, heads={"main": head})
    pinned = Bundle("device", "k1", 3, old, 0, 1, group="kiosks", group_version=2)
    kept = Bundle("device", "k2", 3, old, 0, 1, group="kiosks")
    plan = Plan(
        (
            Publish(Target("device", "k1"), pinned, "change", "Alice", "main"),
            Publish(Target("device", "k2"), kept, "refresh", "Alice", "main"),
            Adopt(Target("device", "k3"), kept, "Alice", "main"),
        )
    )
    stamped = service._stamped(plan, render).actions
    change, refresh, adopt = stamped
    assert isinstance(change, Publish) and change.bundle.commit == new
    assert change.author == "Bob <bob@example.com>"
    assert change.bundle.content_digest() == pinned.content_digest()
    assert refresh == plan.actions[1]
    assert isinstance(adopt, Adopt) and adopt.author == "Bob <bob@example.com>"
