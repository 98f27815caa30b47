"""Validating the fleet repository: one test per kind of mistake, each message checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from setpoint.controller import examples, fleet
from setpoint.controller.trees import DirectoryTree

KIOSK = "mode: enforce\nresources: []\n"


def load(tmp_path: Path, files: dict[str, str]) -> fleet.Snapshot:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return fleet.load(DirectoryTree(tmp_path))


def messages(snapshot: fleet.Snapshot) -> list[str]:
    return [str(p) for p in snapshot.problems]


def test_example_fleet_validates(tmp_path: Path) -> None:
    snap = load(tmp_path, examples.FILES)
    assert snap.ok, messages(snap)
    assert sorted(snap.groups) == ["gateways", "kiosks"]
    assert sorted(snap.devices) == ["gw-01", "kiosk-01"]
    kiosks = snap.groups["kiosks"]
    assert kiosks.mode == "enforce"
    config = next(r for r in kiosks.resources if r.id == "kiosk-config")
    assert config.content.startswith(b"[kiosk]")  # type: ignore[union-attr]
    assert config.mode == 0o640  # type: ignore[union-attr]
    assert snap.settings is not None and snap.settings.bundle_ttl == 7 * 86400


def test_empty_tree_is_not_a_fleet_and_says_what_to_do(tmp_path: Path) -> None:
    # An empty commit, the wrong folder, or files that were written but never committed.
    snap = fleet.load(DirectoryTree(tmp_path))
    [problem] = snap.problems
    assert problem.file == ""
    assert str(problem).startswith(
        "no fleet.yaml, groups/ or devices/ at the top of the repository: this is not a fleet"
        " repository, or the fleet is in a subfolder (point at that folder)"
    )
    assert "`setpoint init DIR`" in str(problem)


def test_fleet_without_groups_and_devices_is_refused_unless_allowed(tmp_path: Path) -> None:
    # A commit that deletes every group and device: the controller would clear everything.
    snap = load(tmp_path, {"fleet.yaml": "description: x\n"})
    assert messages(snap) == [
        "fleet.yaml: the fleet has no groups and no devices, so the controller would remove"
        " every retained bundle; add groups/<group>.yaml and devices/<device>.yaml, or set"
        " 'allow_empty: true' in fleet.yaml if the fleet is meant to be empty"
    ]
    allowed = load(tmp_path, {"fleet.yaml": "allow_empty: true\n"})
    assert allowed.ok and not allowed.groups and not allowed.devices


def test_problems_carry_the_line_where_the_loader_knows_it(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "mode: enforce\nresources:\n  - id: motd\n    kind: fiel\n",
            "devices/kiosk-09.yaml": "vars: {}\ngroup: kiosk\n",
            "groups/bad.yaml": "mode: enforce\nmode: observe\n",
        },
    )
    located = sorted(p.located() for p in snap.problems)
    assert located == [
        "devices/kiosk-09.yaml:2: group 'kiosk' does not exist (groups: bad, kiosks); create"
        " groups/kiosk.yaml or fix the name",
        "groups/bad.yaml:2: line 2: duplicate key 'mode'; keep one of them",
        "groups/kiosks.yaml:4: resource 'motd': unknown kind 'fiel' (known: command, file,"
        " setting)",
    ]
    # The standard message (file, item, fix) is unchanged; the line is extra.
    assert any(m.startswith("groups/kiosks.yaml: resource 'motd': unknown") for m in messages(snap))


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/kiosks.yaml": "mode: enforce\nresources: [\n"})
    assert snap.broken_groups == {"kiosks"}
    [message] = messages(snap)
    assert message.startswith("groups/kiosks.yaml: invalid YAML: line ")


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/kiosks.yaml": "modes: enforce\n"})
    assert messages(snap) == [
        "groups/kiosks.yaml: unknown key 'modes' (known: branch, description, mode, resources,"
        " rollout, window)"
    ]


def test_unknown_resource_kind(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosk.yaml": "resources:\n  - {id: motd, kind: fiel, path: etc/motd}\n",
        },
    )
    assert messages(snap) == [
        "groups/kiosk.yaml: resource 'motd': unknown kind 'fiel' (known: command, file, setting)"
    ]


def test_unknown_key_in_resource(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n"
            "  - {id: motd, kind: file, path: etc/motd, contnet: hi}\n",
        },
    )
    [message] = messages(snap)
    assert message.startswith("groups/kiosks.yaml: resource 'motd': unknown key 'contnet' (known:")


def test_bad_group_id_in_file_name(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/Kiosks.yaml": KIOSK})
    [message] = messages(snap)
    assert message.startswith("groups/Kiosks.yaml: group id 'Kiosks' is not valid")
    assert message.endswith("rename the file")
    assert not snap.groups


def test_bad_resource_id(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n  - {id: 'My Motd', kind: setting, key: k}\n",
        },
    )
    [message] = messages(snap)
    assert message.startswith("groups/kiosks.yaml: resource #1: resource id 'My Motd' is not valid")


def test_bad_group_reference_id(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/kiosks.yaml": KIOSK, "devices/d1.yaml": "group: Kiosks\n"})
    [message] = messages(snap)
    assert message.startswith("devices/d1.yaml: group: group id 'Kiosks' is not valid")


def test_duplicate_resource_id(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n"
            "  - {id: motd, kind: setting, key: a, value: 1}\n"
            "  - {id: motd, kind: setting, key: b, value: 2}\n",
        },
    )
    assert messages(snap) == [
        "groups/kiosks.yaml: resource 'motd': duplicate id (resource #1 has it too); resource"
        " ids must be unique in a file"
    ]


def test_device_in_missing_group(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/kiosks.yaml": KIOSK, "devices/k1.yaml": "group: kiosk\n"})
    assert messages(snap) == [
        "devices/k1.yaml: group 'kiosk' does not exist (groups: kiosks); create"
        " groups/kiosk.yaml or fix the name"
    ]
    assert snap.broken_devices == {"k1"}


def test_device_without_group(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/kiosks.yaml": KIOSK, "devices/k1.yaml": "vars: {a: 1}\n"})
    assert messages(snap) == ["devices/k1.yaml: missing key 'group'"]


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "etc/../../x", "etc//x", "."])
def test_path_escaping_the_device_root(tmp_path: Path, path: str) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n"
            f"  - {{id: f, kind: file, path: '{path}', content: x}}\n",
        },
    )
    [message] = messages(snap)
    assert message.startswith(f"groups/kiosks.yaml: resource 'f': path {path!r}")
    assert "device root" in message


def test_missing_content_file(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n"
            "  - {id: cfg, kind: file, path: etc/cfg, source: files/missing.ini}\n",
        },
    )
    assert messages(snap) == [
        "groups/kiosks.yaml: resource 'cfg': source 'files/missing.ini' does not exist in the"
        " repository; add and commit it, or fix the path (relative to the repository root)"
    ]


def test_source_outside_the_repository(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n"
            "  - {id: cfg, kind: file, path: etc/cfg, source: ../secret}\n",
        },
    )
    [message] = messages(snap)
    assert "must be a normalised path inside the repository" in message


def test_source_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "link").symlink_to("/etc/hostname")
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": "resources:\n"
            "  - {id: cfg, kind: file, path: etc/cfg, source: files/link}\n",
        },
    )
    [message] = messages(snap)
    assert "symlink" in message


def test_content_and_source_together(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "files/a": "x",
            "groups/kiosks.yaml": "resources:\n"
            "  - {id: cfg, kind: file, path: etc/cfg, source: files/a, content: y}\n",
        },
    )
    [message] = messages(snap)
    assert "exactly one of 'content'" in message


@pytest.mark.parametrize(
    ("text", "mode"), [("'0644'", 0o644), ("0600", 0o600), ("755", 0o755), ("'0o640'", 0o640)]
)
def test_file_mode_is_octal(tmp_path: Path, text: str, mode: int) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n"
            f"  - {{id: f, kind: file, path: a, content: x, mode: {text}}}\n",
        },
    )
    assert snap.ok, messages(snap)
    assert snap.groups["g"].resources[0].mode == mode  # type: ignore[union-attr]


def test_bad_file_mode(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n"
            "  - {id: f, kind: file, path: a, content: x, mode: rwx}\n",
        },
    )
    [message] = messages(snap)
    assert message == (
        "groups/g.yaml: resource 'f': mode: 'rwx' is not octal permission bits: write it like"
        " '0644'"
    )


@pytest.mark.parametrize(
    ("text", "what"),
    [("'4755'", "setuid"), ("'2755'", "setgid"), ("'1777'", "sticky and world-writable"),
     ("'0666'", "world-writable"), ("'6755'", "setuid and setgid")],
)  # fmt: skip
def test_special_file_modes_are_refused_unless_meant(tmp_path: Path, text: str, what: str) -> None:
    resource = f"  - {{id: f, kind: file, path: a, content: x, mode: {text}}}\n"
    snap = load(tmp_path, {"groups/g.yaml": "resources:\n" + resource})
    [message] = messages(snap)
    mode = text.strip("'")
    assert message == (
        f"groups/g.yaml: resource 'f': mode: {mode} is {what}: devices refuse it unless their"
        " own policy allows it (allow_special_modes); if it is meant, say so with"
        " 'special_mode: true', else use a mode like 0755"
    )
    meant = resource.replace("}", ", special_mode: true}")
    assert load(tmp_path / "2", {"groups/g.yaml": "resources:\n" + meant}).ok


def test_setting_value_must_be_scalar(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n  - {id: s, kind: setting, key: k, value: [1, 2]}\n",
        },
    )
    [message] = messages(snap)
    assert message.startswith("groups/g.yaml: resource 's': value: must be a string, number")


def test_command_timeout_range(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n"
            "  - {id: c, kind: command, check: 'true', apply: 'true', timeout: 0}\n",
        },
    )
    assert messages(snap) == ["groups/g.yaml: resource 'c': timeout: must be 1-3600 seconds"]


def test_strict_types_no_coercion(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n"
            "  - {id: c, kind: command, check: 'true', apply: 'true', timeout: '60'}\n",
        },
    )
    [message] = messages(snap)
    assert message.startswith("groups/g.yaml: resource 'c': timeout:")


def test_bad_mode_value(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/g.yaml": "mode: enforced\n"})
    [message] = messages(snap)
    assert message.startswith("groups/g.yaml: mode: Input should be 'enforce' or 'observe'")


def test_var_names_are_checked(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/g.yaml": KIOSK, "devices/d.yaml": "group: g\nvars: {a-b: 1}\n"})
    [message] = messages(snap)
    assert "var name 'a-b' is not valid" in message


def test_two_files_on_one_path_after_merge(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n  - {id: a, kind: file, path: etc/x, content: a}\n",
            "devices/d.yaml": "group: g\nresources:\n"
            "  - {id: b, kind: file, path: etc/x, content: b}\n",
        },
    )
    [message] = messages(snap)
    assert message.startswith("devices/d.yaml: resources 'a' and 'b' both manage path 'etc/x'")


def test_device_replaces_group_resource_by_id(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/g.yaml": "resources:\n  - {id: a, kind: file, path: etc/x, content: a}\n",
            "devices/d.yaml": "group: g\nresources:\n"
            "  - {id: a, kind: file, path: etc/x, content: b}\n",
        },
    )
    assert snap.ok, messages(snap)


def test_same_id_in_yaml_and_yml(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/g.yaml": KIOSK, "groups/g.yml": KIOSK})
    [message] = messages(snap)
    assert message == "groups/g.yml: group 'g' is also defined in groups/g.yaml; keep one file"


def test_fleet_yaml_settings(tmp_path: Path) -> None:
    snap = load(tmp_path, {"fleet.yaml": "allow_empty: true\nbundle_ttl: 12h\n"})
    assert snap.settings == fleet.FleetSettings(allow_empty=True, bundle_ttl=12 * 3600)


def test_fleet_yaml_unknown_key(tmp_path: Path) -> None:
    snap = load(tmp_path, {"fleet.yaml": "alow_empty: true\n"})
    [message] = messages(snap)
    assert message.startswith("fleet.yaml: unknown key 'alow_empty' (known: allow_empty,")
    assert snap.settings is None


def test_a_list_instead_of_a_mapping(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/g.yaml": "- a\n- b\n"})
    [message] = messages(snap)
    assert message.startswith("groups/g.yaml: the file must hold a mapping of keys, not a list")


def test_alias_bomb_in_a_group_file(tmp_path: Path) -> None:
    snap = load(tmp_path, {"groups/g.yaml": "a: &a [x, x]\nb: [*a, *a]\n"})
    [message] = messages(snap)
    assert message == "groups/g.yaml: line 1: anchors (&a) are not allowed; write the value out"


def test_one_broken_file_breaks_only_its_targets(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/good.yaml": KIOSK,
            "groups/bad.yaml": "mode: nope\n",
            "devices/a.yaml": "group: good\n",
            "devices/b.yaml": "group: bad\n",
        },
    )
    assert set(snap.groups) == {"good"} and snap.broken_groups == {"bad"}
    assert set(snap.devices) == {"a"} and snap.broken_devices == {"b"}
    assert len(snap.problems) == 1  # the device in a broken group adds no noise


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90), ("45s", 45), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600)],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert fleet.parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -1, "soon", True, "7y"])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        fleet.parse_duration(value)
