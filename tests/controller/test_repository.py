"""Reading the fleet repository with dulwich: local (work tree, bare), mirrored remotes."""

from __future__ import annotations

from pathlib import Path

import pytest

from setpoint.controller import examples
from setpoint.controller.errors import ConfigError, RepositoryUnavailable
from setpoint.controller.repository import Repository, is_remote, redact

ALICE = "Alice Operator <alice@example.com>"


def test_local_repository_reads_commits_not_the_work_tree(example_repo, tmp_path: Path) -> None:
    repo = Repository(str(example_repo.path), tmp_path / "state")
    (example_repo.path / "groups" / "kiosks.yaml").write_text("mode: broken-in-work-tree\n")
    head = repo.heads()["main"]
    info, snapshot = repo.load(head)
    assert snapshot.ok and info.author == ALICE and info.summary == "example fleet"
    assert repo.default_branch() == "main"
    repo.close()


def test_bare_repository(tmp_path: Path, example_repo) -> None:
    bare = tmp_path / "bare.git"
    example_repo.git("clone", "-q", "--bare", str(example_repo.path), str(bare))
    repo = Repository(str(bare), tmp_path / "state")
    assert repo.heads() == {"main": example_repo.head()}
    refs, git_dir = repo.watch_paths()
    assert git_dir == bare and refs == bare / "refs"
    repo.close()


def test_missing_or_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Repository(str(tmp_path / "nope"), tmp_path / "state")
    with pytest.raises(ConfigError, match="not a git repository"):
        Repository(str(tmp_path), tmp_path / "state")


def test_remote_is_mirrored_and_follows_force_push(tmp_path: Path, example_repo) -> None:
    url = f"file://{example_repo.path}"
    repo = Repository(url, tmp_path / "state")
    assert repo.remote and repo.heads() == {}
    assert repo.refresh() is True
    first = example_repo.head()
    assert repo.heads() == {"main": first} and repo.default_branch() == "main"
    assert repo.refresh() is False
    example_repo.commit({"fleet.yaml": "allow_empty: true\n"}, "second")
    example_repo.commit({}, "on canary", branch="canary")
    assert repo.refresh() is True
    assert set(repo.heads()) == {"main", "canary"}
    # Force-push: main goes back to the first commit; canary is deleted.
    example_repo.git("update-ref", "refs/heads/main", first)
    example_repo.git("branch", "-D", "canary")
    repo.refresh()
    assert repo.heads() == {"main": first}
    _, snapshot = repo.load(first)
    assert snapshot.ok
    repo.close()


def test_unreachable_remote_is_unavailable(tmp_path: Path) -> None:
    repo = Repository(f"file://{tmp_path}/missing.git", tmp_path / "state")
    with pytest.raises(RepositoryUnavailable):
        repo.refresh()


def test_mirror_of_another_url_starts_afresh(tmp_path: Path, example_repo, make_repo) -> None:
    other = make_repo({"groups/x.yaml": "mode: observe\n"}, name="other")
    state = tmp_path / "state"
    first = Repository(f"file://{example_repo.path}", state)
    first.refresh()
    first.close()
    second = Repository(f"file://{other.path}", state)
    second.refresh()
    assert second.heads() == {"main": other.head()}
    second.close()


def test_resolve_branch_or_commit(example_repo, tmp_path: Path) -> None:
    repo = Repository(str(example_repo.path), tmp_path / "state")
    assert repo.resolve("main") == example_repo.head()
    assert repo.resolve(example_repo.head()) == example_repo.head()
    assert repo.resolve(example_repo.head()[:7]) == example_repo.head()
    assert repo.resolve("HEAD~0") == example_repo.head()
    with pytest.raises(ConfigError, match="no branch or commit 'nope'"):
        repo.resolve("nope")
    repo.close()


@pytest.mark.parametrize(
    ("location", "remote"),
    [
        ("https://git.example.com/fleet.git", True),
        ("ssh://git@host/fleet", True),
        ("git@host:fleet.git", True),
        ("git://host/fleet", True),
        ("file:///srv/fleet", True),
        ("/srv/fleet", False),
        ("./fleet", False),
        ("C:fleet", False),
    ],
)
def test_is_remote(location: str, remote: bool) -> None:
    assert is_remote(location) is remote


def test_redact_hides_passwords() -> None:
    assert redact("https://bob:hunter2@host/x.git") == "https://bob:***@host/x.git"


def test_init_creates_a_valid_repository(tmp_path: Path) -> None:
    commit = examples.create(tmp_path / "new")
    repo = Repository(str(tmp_path / "new"), tmp_path / "state")
    assert repo.heads() == {"main": commit}
    info, snapshot = repo.load(commit)
    assert snapshot.ok and "setpoint init" in info.author
    with pytest.raises(FileExistsError):
        examples.create(tmp_path / "new")
    repo.close()


def test_a_commit_reads_again_only_the_device_files_it_changed(make_repo, tmp_path: Path) -> None:
    """Work proportional to what changed: a device file that is as it was (and every file
    it names) is not parsed again, and the render re-uses its bundle; the result is the
    same as reading and rendering everything afresh."""
    from setpoint.controller import fleet, rendering
    from setpoint.controller.rendering import Target, View

    devices = {f"devices/d{i}.yaml": "group: kiosks\n" for i in range(5)}
    devices["devices/d0.yaml"] = (
        "group: kiosks\nresources:\n  - {id: cfg, kind: file, path: etc/cfg, source: files/cfg}\n"
    )
    group = "mode: enforce\nresources:\n  - {id: motd, kind: file, path: etc/motd, content: '%s'}\n"
    files = {"fleet.yaml": "{}\n", "groups/kiosks.yaml": group % "v1", "files/cfg": "a\n"}
    git = make_repo({**files, **devices})
    repo = Repository(str(git.path), tmp_path / "state")
    memo = fleet.Memo()

    def render(previous: rendering.Render | None) -> tuple[rendering.Render, rendering.Render]:
        info, snapshot = repo.load(repo.heads()["main"], memo=memo)
        incremental = rendering.render("main", {"main": View("main", info, snapshot)}, previous)
        _, fresh = repo.load(info.id)
        return incremental, rendering.render("main", {"main": View("main", info, fresh)})

    first, _ = render(None)
    assert memo.reused == 0
    git.commit({"groups/kiosks.yaml": group % "v2"}, "group only")
    second, fresh = render(first)
    assert memo.reused == 5  # no device file was read again
    assert _contents(second) == _contents(fresh)  # same bundles (an unchanged one keeps
    git.commit({"files/cfg": "b\n"}, "a file d0 names")  # the commit that last changed it)
    third, fresh = render(second)
    assert memo.reused == 5 + 4  # d0 was read again: a file it names changed
    assert _contents(third) == _contents(fresh)
    cfg = third.desired[Target("device", "d0")].bundle
    assert cfg.content_digest() != second.desired[Target("device", "d0")].bundle.content_digest()
    repo.close()


def test_a_commit_of_group_or_device_files_is_worked_out_from_the_tree_diff(
    make_repo, tmp_path: Path
) -> None:
    """Work proportional to what changed: when only group or device files were modified,
    the snapshot comes from the previous one and the git tree diff (fleet.update); every
    other commit is read whole. Either way it is the snapshot a whole reading gives."""
    from setpoint.controller import fleet

    group = "resources:\n  - {id: motd, kind: file, path: etc/motd, content: '%s'}\n"
    files = {
        "fleet.yaml": "{}\n",
        "groups/kiosks.yaml": group % "v1",
        "groups/gateways.yaml": group % "gw",
        **{f"devices/d{i}.yaml": "group: kiosks\n" for i in range(4)},
    }
    git = make_repo(files)
    repo = Repository(str(git.path), tmp_path / "state")
    memo = fleet.Memo()
    updated: list[bool] = []
    real_update = fleet.update

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        found = real_update(*args, **kw)
        updated.append(found is not None)
        return found

    info, snapshot = repo.load(repo.heads()["main"], memo=memo)
    steps = [
        ({"groups/kiosks.yaml": group % "v2"}, True),  # one group
        ({"devices/d1.yaml": "group: gateways\n"}, True),  # a device moves group
        ({"devices/d2.yaml": "group: kiosks\nvars: {a: 1}\n"}, True),  # a device's vars
        ({"devices/d4.yaml": "group: kiosks\n"}, False),  # a device added
        ({"groups/kiosks.yaml": "mode: wrong\n"}, False),  # a group broken: its problem shows
        ({"groups/kiosks.yaml": group % "v3"}, False),  # from a broken snapshot: whole
        ({"fleet.yaml": "description: x\n"}, False),  # fleet.yaml
        ({"devices/d3.yaml": None}, False),  # a device removed
        (  # two resources on one path once merged with the group: the device breaks
            {"groups/gateways.yaml": group % "gw2", "devices/d1.yaml": (
                "group: gateways\nresources:\n"
                "  - {id: other, kind: file, path: etc/motd, content: x}\n")},
            False,
        ),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fleet, "update", spy)
        for change, incremental in steps:
            updated.clear()
            commit = git.commit(change)
            info2, snapshot2 = repo.load(commit, memo=memo, since=(info, snapshot))
            _, whole = repo.load(commit)
            assert snapshot2 == whole, change
            assert any(updated) == incremental, change
            info, snapshot = info2, snapshot2
    assert not snapshot.ok  # the last one: d1's problem is found
    repo.close()


def test_a_group_commit_checks_the_devices_that_moved_into_it(make_repo, tmp_path: Path) -> None:
    """fleet.update finds a changed group's members in an index that follows devices
    moving group (not a scan of every device): a device that moved into a group is
    checked against that group's next change, and breaks as a whole reading says."""
    group = "resources:\n  - {id: motd, kind: file, path: etc/motd, content: '%s'}\n"
    files = {
        "fleet.yaml": "{}\n",
        "groups/kiosks.yaml": group % "v1",
        "groups/gateways.yaml": group % "gw",
        **{f"devices/d{i}.yaml": "group: kiosks\n" for i in range(3)},
    }
    from setpoint.controller import fleet

    git = make_repo(files)
    repo = Repository(str(git.path), tmp_path / "state")
    memo = fleet.Memo()
    info, snapshot = repo.load(repo.heads()["main"], memo=memo)
    own = "group: gateways\nresources:\n  - {id: own, kind: file, path: etc/own, content: x}\n"
    clash = "resources:\n  - {id: motd, kind: file, path: etc/own, content: gw}\n"
    for change in ({"devices/d1.yaml": own}, {"groups/gateways.yaml": clash}):
        commit = git.commit(change)
        info, snapshot = repo.load(commit, memo=memo, since=(info, snapshot))
        assert snapshot == repo.load(commit)[1], change
    assert snapshot.broken_devices == {"d1"}
    repo.close()


def _contents(render):  # type: ignore[no-untyped-def]
    """What a render wants published, commits aside (not content: proto/SPEC.md 4.2)."""
    return {t: (r.branch, r.bundle.content_digest()) for t, r in render.desired.items()}


def test_a_one_group_commit_renders_only_that_groups_targets(make_repo, tmp_path: Path) -> None:
    """Work proportional to what changed: a commit of one group's file renders that group's
    bundle alone (a device bundle holds none of its group's content), one of a device file
    that device's alone; every other target keeps the very object the last render had.
    What comes out wants what a whole render of the commit wants; a commit of fleet.yaml
    is rendered whole."""
    from setpoint.controller import fleet, rendering
    from setpoint.controller.rendering import Target, View

    group = "resources:\n  - {id: motd, kind: file, path: etc/motd, content: '%s'}\n"
    files = {"fleet.yaml": "{}\n"}
    for g in range(4):
        files[f"groups/g{g}.yaml"] = group % f"g{g}"
        files.update({f"devices/g{g}d{i}.yaml": f"group: g{g}\n" for i in range(5)})
    git = make_repo(files)
    repo = Repository(str(git.path), tmp_path / "state")
    memo = fleet.Memo()
    rendered: list[str] = []
    real_group, real_device = rendering._group_bundle, rendering._device_bundle

    def group_bundle(g, commit):  # type: ignore[no-untyped-def]
        rendered.append(g.id)
        return real_group(g, commit)

    def device_bundle(d, commit):  # type: ignore[no-untyped-def]
        rendered.append(d.id)
        return real_device(d, commit)

    info, snapshot = repo.load(repo.heads()["main"], memo=memo)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rendering, "_group_bundle", group_bundle)
        mp.setattr(rendering, "_device_bundle", device_bundle)
        last = rendering.render("main", {"main": View("main", info, snapshot)})
        assert len(rendered) == 4 + 20
        steps = [
            ({"groups/g1.yaml": group % "new"}, ["g1"]),
            ({"devices/g2d3.yaml": "group: g2\nvars: {a: 1}\n"}, ["g2d3"]),
            ({"devices/g0d0.yaml": "group: g3\n"}, ["g0d0"]),  # moves group
            ({"fleet.yaml": "description: x\n"}, None),  # whole
        ]
        for change, expected in steps:
            rendered.clear()
            commit = git.commit(change)
            info, snapshot = repo.load(commit, memo=memo, since=(info, snapshot))
            now = rendering.render("main", {"main": View("main", info, snapshot)}, last)
            _, whole = repo.load(commit)
            fresh = rendering.render("main", {"main": View("main", info, whole)})
            assert _contents(now) == _contents(fresh), change
            assert now.removals_allowed and not now.problems and now.head == info
            if expected is None:
                assert now.since is None and rendered[:4] == ["g0", "g1", "g2", "g3"]
                last = now
                continue
            assert rendered[: len(expected)] == expected, change  # then the whole one
            kept = [t for t in now.desired if t.kind == "device" and t.id not in expected]
            assert all(now.desired[t] is last.desired[t] for t in kept), change
            assert now.changed == {Target("group" if e.startswith("g") and "d" not in e
                                          else "device", e) for e in expected}  # fmt: skip
            groups = [r for t, r in now.desired.items() if t.kind == "group"]
            assert all(r.commit == info.id for r in groups)  # as a whole render stamps them
            last = now
    repo.close()
