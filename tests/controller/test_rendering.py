"""Rendering views of branches into bundles: determinism, branches, what breaks what."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleetkit import FLEET

from setpoint.controller import fleet, rendering
from setpoint.controller.commits import CommitInfo
from setpoint.controller.rendering import Target, View
from setpoint.controller.trees import DirectoryTree

KIOSKS = "mode: enforce\nresources:\n  - {id: motd, kind: file, path: etc/motd, content: hi}\n"
CANARY = (
    "branch: canary\nmode: enforce\n"
    "resources:\n  - {id: motd, kind: file, path: etc/motd, content: new}\n"
)


@pytest.fixture
def view(tmp_path: Path):  # type: ignore[no-untyped-def]
    counter = iter(range(1000))

    def make(files: dict[str, str], branch: str = "main") -> View:
        root = tmp_path / f"v{next(counter)}"
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        root.mkdir(exist_ok=True)
        commit = f"{next(counter):040x}"
        info = CommitInfo(commit, "Alice <a@example.com>", 0, "msg", b"")
        return View(branch, info, fleet.load(DirectoryTree(root)))

    return make


def test_example_renders_one_bundle_per_group_and_device(view) -> None:  # type: ignore[no-untyped-def]
    main = view(FLEET)
    out = rendering.render("main", {"main": main})
    assert sorted(map(str, out.desired)) == [
        "device/gw-01",
        "device/kiosk-01",
        "device/kiosk-02",
        "group/gateways",
        "group/kiosks",
    ]
    assert out.removals_allowed and not out.problems
    device = out.desired[Target("device", "kiosk-02")].bundle
    assert device.group == "kiosks" and device.vars == {"site": "cafeteria"}
    assert [r.id for r in device.resources] == ["log-level"]
    group = out.desired[Target("group", "gateways")].bundle
    assert group.mode == "observe" and group.version == 0
    assert all(r.bundle.commit == main.commit.id for r in out.desired.values())


def test_rendering_is_deterministic(view) -> None:  # type: ignore[no-untyped-def]
    a = rendering.render("main", {"main": view(FLEET)})
    b = rendering.render("main", {"main": view(FLEET)})
    digests_a = {t: r.bundle.content_digest() for t, r in a.desired.items()}
    digests_b = {t: r.bundle.content_digest() for t, r in b.desired.items()}
    assert digests_a == digests_b


def test_unchanged_target_keeps_its_digest_when_another_changes(view) -> None:  # type: ignore[no-untyped-def]
    before = rendering.render("main", {"main": view(FLEET)})
    changed = dict(FLEET)
    changed["devices/kiosk-01.yaml"] = "group: kiosks\nvars:\n  site: hall\n"
    after = rendering.render("main", {"main": view(changed)})
    diff = {
        t
        for t in before.desired
        if before.desired[t].bundle.content_digest() != after.desired[t].bundle.content_digest()
    }
    assert diff == {Target("device", "kiosk-01")}


def test_no_commit_on_default_branch_knows_nothing() -> None:
    out = rendering.render("main", {"main": None})
    assert not out.desired and not out.removals_allowed and out.head is None


def test_broken_group_breaks_its_devices_and_blocks_removals(view) -> None:  # type: ignore[no-untyped-def]
    files = dict(FLEET)
    files["groups/kiosks.yaml"] = "mode: nope\n"
    out = rendering.render("main", {"main": view(files)})
    assert Target("group", "kiosks") in out.broken
    assert {Target("device", "kiosk-01"), Target("device", "kiosk-02")} <= out.broken
    assert Target("group", "gateways") in out.desired
    assert not out.removals_allowed
    [problem] = out.problems
    assert problem.branch == "main" and problem.problem.file == "groups/kiosks.yaml"


def test_canary_group_content_comes_from_canary(view) -> None:  # type: ignore[no-untyped-def]
    main_files = {
        "groups/kiosks.yaml": KIOSKS,
        "groups/ring.yaml": CANARY,
        "devices/k1.yaml": "group: kiosks\n",
        "devices/c1.yaml": "group: ring\n",
    }
    canary_files = dict(main_files)
    canary_files["groups/ring.yaml"] = CANARY.replace("content: new", "content: newer")
    canary_files["groups/kiosks.yaml"] = KIOSKS.replace("hi", "changed on canary")
    canary_files["devices/c1.yaml"] = "group: ring\nvars: {x: 1}\n"
    main, canary = view(main_files), view(canary_files, "canary")
    assert rendering.branches_needed(main.snapshot, "main") == ["main", "canary"]
    out = rendering.render("main", {"main": main, "canary": canary})
    assert not out.problems
    ring = out.desired[Target("group", "ring")]
    assert ring.branch == "canary" and ring.bundle.resources[0].content == b"newer"  # type: ignore[union-attr]
    assert ring.bundle.commit == canary.commit.id
    kiosks = out.desired[Target("group", "kiosks")]
    assert kiosks.branch == "main" and kiosks.bundle.resources[0].content == b"hi"  # type: ignore[union-attr]
    assert out.desired[Target("device", "c1")].bundle.vars == {"x": 1}
    assert out.desired[Target("device", "k1")].branch == "main"


def test_tracked_branch_missing_breaks_the_group(view) -> None:  # type: ignore[no-untyped-def]
    main = view({"groups/ring.yaml": CANARY, "devices/c1.yaml": "group: ring\n"})
    out = rendering.render("main", {"main": main, "canary": None})
    assert out.broken == {Target("group", "ring"), Target("device", "c1")}
    [problem] = out.problems
    assert "tracks branch 'canary', which does not exist" in problem.problem.message


def test_device_moved_on_tracked_branch_only_is_a_problem(view) -> None:  # type: ignore[no-untyped-def]
    main_files = {
        "groups/kiosks.yaml": KIOSKS,
        "groups/ring.yaml": CANARY,
        "devices/c1.yaml": "group: ring\n",
    }
    canary_files = dict(main_files, **{"devices/c1.yaml": "group: kiosks\n"})
    out = rendering.render(
        "main", {"main": view(main_files), "canary": view(canary_files, "canary")}
    )
    assert Target("device", "c1") in out.broken
    [problem] = out.problems
    assert problem.branch == "canary"
    assert "move devices between groups on 'main'" in problem.problem.message


def test_group_only_on_canary_is_owned_by_canary(view) -> None:  # type: ignore[no-untyped-def]
    main_files = {"groups/ring.yaml": CANARY}
    canary_files = dict(
        main_files, **{"groups/extra.yaml": "branch: canary\n", "devices/e1.yaml": "group: extra\n"}
    )
    out = rendering.render(
        "main", {"main": view(main_files), "canary": view(canary_files, "canary")}
    )
    assert out.desired[Target("group", "extra")].branch == "canary"
    assert out.desired[Target("device", "e1")].branch == "canary"


def test_device_moves_between_groups(view) -> None:  # type: ignore[no-untyped-def]
    files = {"groups/a.yaml": KIOSKS, "groups/b.yaml": KIOSKS, "devices/d.yaml": "group: a\n"}
    before = rendering.render("main", {"main": view(files)})
    after = rendering.render(
        "main", {"main": view(dict(files, **{"devices/d.yaml": "group: b\n"}))}
    )
    assert before.desired[Target("device", "d")].bundle.group == "a"
    assert after.desired[Target("device", "d")].bundle.group == "b"
    assert (
        before.desired[Target("group", "a")].bundle.content_digest()
        == after.desired[Target("group", "a")].bundle.content_digest()
    )


def test_oversized_bundle_is_a_problem(view) -> None:  # type: ignore[no-untyped-def]
    big = "x" * 200_000
    resources = "".join(
        f"  - {{id: f{i}, kind: file, path: f{i}, content: '{big}'}}\n" for i in range(6)
    )
    out = rendering.render("main", {"main": view({"groups/g.yaml": "resources:\n" + resources})})
    assert Target("group", "g") in out.broken
    assert "over the" in out.problems[0].problem.message


def test_repository_status_per_branch_with_lines_and_a_stable_time(view) -> None:  # type: ignore[no-untyped-def]
    main = view(
        {**FLEET, "groups/kiosks.yaml": "mode: enforce\nresources:\n  - {id: m, kind: fiel}\n"}
    )
    canary = view({**FLEET, "groups/kiosks.yaml": CANARY}, "canary")
    out = rendering.render("main", {"main": main, "canary": canary})
    first = rendering.repository_status(out, None, now=10.0)
    refused, fine = first.branches["main"], first.branches["canary"]
    assert (refused.head, refused.accepted, fine.accepted) == (main.commit.id, False, True)
    [problem] = refused.problems
    assert (problem.file, problem.line) == ("groups/kiosks.yaml", 3)
    assert str(problem).startswith("groups/kiosks.yaml:3: resource 'm': unknown kind 'fiel'")
    again = rendering.repository_status(out, None, now=99.0, previous=first)
    assert again.to_json() == first.to_json()  # nothing changed: not published again
    planner = rendering.repository_status(out, "this commit removes every group", 99.0, first)
    assert planner.branches["main"].checked_at == 99.0
    assert planner.branches["main"].problems[-1].message == "this commit removes every group"
    assert planner.branches["canary"] == fine


def test_sealing_warnings_are_reported_on_the_branch_whose_file_holds_the_value(
    view,  # type: ignore[no-untyped-def]
) -> None:
    import pyrage

    from setpoint.controller import sealing

    r1, r2 = (str(pyrage.x25519.Identity.generate().to_public()) for _ in range(2))
    sealed_for_k1 = sealing.place(
        "branch: canary\nresources: []\n",
        "token",
        sealing.seal(b"s", {"k1": r1}),
        new={"kind": "setting", "key": "token"},
    )
    devices = {
        "devices/k1.yaml": f"group: kiosks\nrecipient: {r1}\n",
        "devices/k2.yaml": f"group: kiosks\nrecipient: {r2}\n",
    }
    main = view({"groups/kiosks.yaml": "branch: canary\nresources: []\n", **devices})
    canary = view({"groups/kiosks.yaml": sealed_for_k1, **devices}, "canary")
    out = rendering.render("main", {"main": main, "canary": canary})
    assert not out.problems and Target("device", "k2") in out.desired  # published anyway
    [warning] = out.warnings
    assert (warning.branch, warning.commit) == ("canary", canary.commit.id)
    assert str(warning.problem).startswith(
        "groups/kiosks.yaml: resource 'token': not sealed for device(s) k2"
    )
