"""Bundles: round trips, stable digests, strict schema, path escapes, merge and ${var}."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from setpoint.proto import InvalidId, PayloadTooLarge, ProtocolError, SchemaError, bundles, codec
from setpoint.proto.bundles import Bundle, CommandResource, FileResource, SettingResource

MakeBundle = Callable[..., Bundle]

MOTD = FileResource("motd", "etc/motd", b"hello\n", 0o644)
TZ = SettingResource("tz", "time.zone", "UTC")
NTP = CommandResource("ntp", "test -f /run/ntp", "touch /run/ntp", 30)


def refused(cls: type[ProtocolError], data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        bundles.decode(data)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def edited(bundle: Bundle, **changes: Any) -> bytes:
    """The encoded bundle with raw fields changed (``None`` removes a field)."""
    raw = codec.unpack(bundles.encode(bundle), max_size=bundles.MAX_BUNDLE_BYTES)
    for name, value in changes.items():
        if value is None:
            raw.pop(name, None)
        else:
            raw[name] = value
    return codec.pack(raw)


def with_resource(bundle: Bundle, **fields: Any) -> bytes:
    """The encoded bundle whose only resource is the raw map ``fields``."""
    return edited(bundle, resources=[fields])


# --- round trips and digests ------------------------------------------------------------


def test_group_bundle_round_trip(group_bundle: MakeBundle) -> None:
    bundle = group_bundle()
    assert bundles.decode(bundles.encode(bundle)) == bundle


def test_device_bundle_round_trip(device_bundle: MakeBundle) -> None:
    bundle = device_bundle()
    assert bundles.decode(bundles.encode(bundle)) == bundle


def test_device_bundle_with_group_version_round_trip(device_bundle: MakeBundle) -> None:
    bundle = device_bundle(group_version=7)
    assert bundles.decode(bundles.encode(bundle)).group_version == 7


def test_observe_mode_round_trip(group_bundle: MakeBundle) -> None:
    assert bundles.decode(bundles.encode(group_bundle(mode="observe"))).mode == "observe"


def test_encoding_is_canonical(group_bundle: MakeBundle) -> None:
    bundle = group_bundle()
    data = bundles.encode(bundle)
    assert data == bundles.encode(bundles.decode(data))
    assert data == codec.pack(codec.unpack(data, max_size=len(data)))


def test_group_payload_has_exactly_the_contract_fields(group_bundle: MakeBundle) -> None:
    raw = codec.unpack(bundles.encode(group_bundle()), max_size=1 << 20)
    assert sorted(raw) == sorted(
        ["schema", "kind", "target", "version", "commit", "issued_at", "expires_at",
         "resources", "mode"]
    )  # fmt: skip
    assert raw["schema"] == 1


def test_device_payload_has_exactly_the_contract_fields(device_bundle: MakeBundle) -> None:
    raw = codec.unpack(bundles.encode(device_bundle()), max_size=1 << 20)
    assert sorted(raw) == sorted(
        ["schema", "kind", "target", "version", "commit", "issued_at", "expires_at",
         "resources", "group", "vars"]
    )  # fmt: skip


def test_resource_digests_are_stable() -> None:
    # Devices and the controller compare these across versions and implementations.
    assert bundles.resource_digest(MOTD) == (
        "1b8acb08d8353f09db19123905b43a000c9ab4c22b2a17d92837aed9d85e717a"
    )
    assert bundles.resource_digest(TZ) == (
        "1851675a29d858597e2eb7bbed93193543e43828599f5a040c8c95adad026939"
    )
    assert bundles.resource_digest(NTP) == (
        "97b66fb853ee1ea31af47698b4b908e323447edd779718972e9db0f8c62f880a"
    )


def test_resource_digest_is_the_digest_of_what_it_asks_for() -> None:
    assert bundles.resource_digest(MOTD) == codec.digest({"content": b"hello\n", "mode": 0o644})
    assert bundles.resource_digest(TZ) == codec.digest({"key": "time.zone", "value": "UTC"})
    assert bundles.resource_digest(NTP) == codec.digest(
        {"check": "test -f /run/ntp", "apply": "touch /run/ntp"}
    )


def test_content_digest_is_stable() -> None:
    bundle = Bundle("group", "kiosks", 1, "abc", 1, 2, (MOTD, TZ, NTP))
    assert bundle.content_digest() == (
        "e7c4aed0c5eda337b499c45f23c5f5f200a8fa478ef13c67a58098dd97c8f3e7"
    )


def test_content_digest_ignores_version_times_and_commit(group_bundle: MakeBundle) -> None:
    bundle = group_bundle()
    again = bundle.with_version(99, 5, 6)
    assert again.version == 99 and again.issued_at == 5 and again.expires_at == 6
    assert again.content_digest() == bundle.content_digest()
    other_commit = group_bundle(commit="f" * 40)
    assert other_commit.content_digest() == bundle.content_digest()


def test_content_digest_follows_the_content(
    group_bundle: MakeBundle, device_bundle: MakeBundle
) -> None:
    assert group_bundle(mode="observe").content_digest() != group_bundle().content_digest()
    assert group_bundle(resources=()).content_digest() != group_bundle().content_digest()
    assert device_bundle(vars={}).content_digest() != device_bundle().content_digest()
    assert device_bundle(group="other").content_digest() != device_bundle().content_digest()


# --- schema -------------------------------------------------------------------------------


def test_unknown_kind_names_the_known_kinds(group_bundle: MakeBundle) -> None:
    data = with_resource(group_bundle(), id="motd", kind="fiel", path="etc/motd")
    error = refused(SchemaError, data)
    assert "unknown kind 'fiel' (known: command, file, setting)" in str(error)
    assert "'motd'" in str(error)


@pytest.mark.parametrize(
    "path",
    ["../x", "/etc/x", "a/../../b", "a/../b", "..", ".", "./a", "a//b", "a/", "a\x00b",
     "a\\b", "", "etc/./motd"],
    ids=repr,
)  # fmt: skip
def test_path_escapes_are_refused(group_bundle: MakeBundle, path: str) -> None:
    data = with_resource(group_bundle(), id="f", kind="file", path=path, content=b"", mode=0o644)
    refused(SchemaError, data)
    with pytest.raises(SchemaError):
        bundles.validate_path(path, "here")


@pytest.mark.parametrize("path", ["motd", "etc/motd", "a/b/c.txt", "..hidden", "a..b/c"])
def test_normal_relative_paths_are_allowed(path: str) -> None:
    assert bundles.validate_path(path, "here") == path


def test_path_of_the_wrong_type(group_bundle: MakeBundle) -> None:
    data = with_resource(group_bundle(), id="f", kind="file", path=5, content=b"", mode=0o644)
    refused(SchemaError, data)


def test_duplicate_resource_ids(group_bundle: MakeBundle) -> None:
    error = refused(SchemaError, bundles.encode(group_bundle(resources=(MOTD, TZ, MOTD))))
    assert "duplicate resource id(s) ['motd']" in str(error)


def test_resource_id_must_be_an_id(group_bundle: MakeBundle) -> None:
    data = with_resource(
        group_bundle(), id="Bad Id", kind="setting", key="k", value=1, secret=False
    )
    refused(InvalidId, data)


@pytest.mark.parametrize(
    "resource",
    [
        {"id": "f", "kind": "file", "path": "x", "content": "text, not bin", "mode": 0o644},
        {"id": "f", "kind": "file", "path": "x", "content": b"", "mode": 0o10000},
        {"id": "f", "kind": "file", "path": "x", "content": b"", "mode": -1},
        {"id": "f", "kind": "file", "path": "x", "content": b"", "mode": True},
        {"id": "f", "kind": "file", "path": "x", "content": b""},
        {"id": "f", "kind": "file", "path": "x", "content": b"", "mode": 420, "owner": "root"},
        {"id": "s", "kind": "setting", "key": "", "value": 1, "secret": False},
        {"id": "s", "kind": "setting", "key": "k" * 257, "value": 1, "secret": False},
        {"id": "s", "kind": "setting", "key": "k", "value": [1], "secret": False},
        {"id": "s", "kind": "setting", "key": "k", "value": {"a": 1}, "secret": False},
        {"id": "s", "kind": "setting", "key": "k", "value": b"bin", "secret": False},
        {"id": "s", "kind": "setting", "key": "k", "value": 1, "secret": 0},
        {"id": "s", "kind": "setting", "key": "k", "value": 1},
        {"id": "c", "kind": "command", "check": "true", "apply": "true", "timeout": 0},
        {"id": "c", "kind": "command", "check": "true", "apply": "true", "timeout": 3601},
        {"id": "c", "kind": "command", "check": "true", "timeout": 5},
        {"id": "c", "kind": "command", "check": b"true", "apply": "true", "timeout": 5},
        {"kind": "setting", "key": "k", "value": 1, "secret": False},
        {"id": "s", "key": "k", "value": 1, "secret": False},
        {"id": 5, "kind": "setting", "key": "k", "value": 1, "secret": False},
    ],
    ids=repr,
)
def test_bad_resources(group_bundle: MakeBundle, resource: dict[str, Any]) -> None:
    refused(SchemaError, with_resource(group_bundle(), **resource))


def test_resource_that_is_not_a_map(group_bundle: MakeBundle) -> None:
    refused(SchemaError, edited(group_bundle(), resources=["motd"]))


@pytest.mark.parametrize(
    "changes",
    [
        {"schema": 2},
        {"schema": None},
        {"kind": "fleet"},
        {"kind": None},
        {"version": 0},
        {"version": -1},
        {"version": True},
        {"version": "3"},
        {"version": 1.0},
        {"commit": None},
        {"commit": b"bin"},
        {"issued_at": None},
        {"expires_at": 1.5},
        {"resources": None},
        {"resources": {"motd": {}}},
        {"mode": "enforcing"},
        {"mode": None},
        {"extra": 1},
        {"group": "kiosks"},
        {"vars": {}},
    ],
    ids=repr,
)
def test_bad_group_bundle_fields(group_bundle: MakeBundle, changes: dict[str, Any]) -> None:
    refused(SchemaError, edited(group_bundle(), **changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"group": None},
        {"group": 5},
        {"vars": None},
        {"vars": ["a"]},
        {"vars": {"a": [1]}},
        {"vars": {"a": {"b": 1}}},
        {"group_version": "1"},
        {"group_version": True},
        {"mode": "enforce"},
    ],
    ids=repr,
)
def test_bad_device_bundle_fields(device_bundle: MakeBundle, changes: dict[str, Any]) -> None:
    refused(SchemaError, edited(device_bundle(), **changes))


@pytest.mark.parametrize("target", ["Kiosks", "a/b", "+", "", "x" * 65])
def test_bad_target(group_bundle: MakeBundle, target: str) -> None:
    refused(InvalidId, edited(group_bundle(), target=target))


def test_bad_group_in_a_device_bundle(device_bundle: MakeBundle) -> None:
    refused(InvalidId, edited(device_bundle(), group="Kiosks"))


def test_bundle_that_is_not_a_map() -> None:
    refused(SchemaError, codec.pack(["group"]))


def test_bundle_over_the_size_cap(group_bundle: MakeBundle) -> None:
    data = bundles.encode(group_bundle())
    with pytest.raises(PayloadTooLarge):
        bundles.decode(data, max_size=len(data) - 1)


def test_too_many_resources(group_bundle: MakeBundle) -> None:
    many = [
        {"id": f"s{i}", "kind": "setting", "key": f"k{i}", "value": i, "secret": False}
        for i in range(bundles.MAX_RESOURCES + 1)
    ]
    refused(SchemaError, edited(group_bundle(), resources=many))


def test_absent_setting_value_reads_as_nil(group_bundle: MakeBundle) -> None:
    data = with_resource(group_bundle(), id="s", kind="setting", key="k", secret=True)
    [resource] = bundles.decode(data).resources
    assert resource == SettingResource("s", "k", None, True)


# --- merge and ${var} ---------------------------------------------------------------------


def test_effective_group_alone_keeps_the_group_order(group_bundle: MakeBundle) -> None:
    group = group_bundle()
    assert bundles.effective(group, None) == list(group.resources)


def test_effective_device_alone(device_bundle: MakeBundle) -> None:
    assert bundles.effective(None, device_bundle()) == [
        SettingResource("tz", "time.zone", "Europe/Paris")
    ]


def test_effective_of_nothing_is_empty() -> None:
    assert bundles.effective(None, None) == []


def test_effective_merge_replaces_by_id_in_place_and_appends(
    group_bundle: MakeBundle, device_bundle: MakeBundle
) -> None:
    extra = FileResource("extra", "etc/extra", b"site=${site} screens=${screens}", 0o600)
    device = device_bundle(resources=(SettingResource("tz", "time.zone", "Europe/Paris"), extra))
    merged = bundles.effective(group_bundle(), device)
    assert bundles.resource_ids(merged) == ["motd", "tz", "ntp", "extra"]
    assert merged[0] == FileResource("motd", "etc/motd", b"welcome to lobby\n", 0o644)
    assert merged[1] == SettingResource("tz", "time.zone", "Europe/Paris")
    assert merged[2] == group_bundle().resources[2]
    assert merged[3] == FileResource("extra", "etc/extra", b"site=lobby screens=2", 0o600)


def test_a_device_may_replace_a_resource_with_another_kind(
    group_bundle: MakeBundle, device_bundle: MakeBundle
) -> None:
    device = device_bundle(resources=(SettingResource("motd", "motd.text", "hi"),))
    merged = bundles.effective(group_bundle(), device)
    assert merged[0] == SettingResource("motd", "motd.text", "hi")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${site}", "lobby"),
        ("a ${site} b ${site}", "a lobby b lobby"),
        ("${n}", "2"),
        ("${ratio}", "0.5"),
        ("${on}/${off}", "true/false"),
        ("${nothing}", ""),
        ("${unknown}", "${unknown}"),
        ("$site", "$site"),
        ("$$ ${site}", "$$ lobby"),
        ("$${site}", "$lobby"),
        ("${ site }", "${ site }"),
        ("${site", "${site"),
        ("${Site}", "${Site}"),
        ("${site}${site}", "lobbylobby"),
    ],
)
def test_var_substitution_in_files_and_settings(text: str, expected: str) -> None:
    variables = {"site": "lobby", "n": 2, "ratio": 0.5, "on": True, "off": False, "nothing": None}
    file = bundles.render(FileResource("f", "f", text.encode(), 0o644), variables)
    assert isinstance(file, FileResource)
    assert file.content == expected.encode()
    setting = bundles.render(SettingResource("s", "k", text), variables)
    assert isinstance(setting, SettingResource)
    assert setting.value == expected


def test_substitution_is_not_recursive() -> None:
    rendered = bundles.render(SettingResource("s", "k", "${a}"), {"a": "${b}", "b": "x"})
    assert isinstance(rendered, SettingResource) and rendered.value == "${b}"


def test_no_substitution_in_paths_keys_commands_or_binary_files() -> None:
    variables = {"x": "1"}
    binary = FileResource("b", "${x}/f", b"\xff${x}", 0o644)
    assert bundles.render(binary, variables) == binary
    number = SettingResource("s", "${x}", 5)
    assert bundles.render(number, variables) == number
    command = CommandResource("c", "echo ${x}", "echo ${x}", 5)
    assert bundles.render(command, variables) == command
    text = bundles.render(FileResource("f", "${x}/f", b"${x}", 0o644), variables)
    assert isinstance(text, FileResource) and text.path == "${x}/f"


def test_shell_script_without_vars_is_untouched(group_bundle: MakeBundle) -> None:
    script = FileResource("run", "bin/run", b"#!/bin/sh\necho $$ $HOME ${HOME}\n", 0o755)
    device = Bundle("device", "kiosk-01", 1, "c", 1, 2, (script,), group="kiosks",
                    vars={"site": "lobby"})  # fmt: skip
    assert bundles.effective(None, device) == [script]


def test_var_text() -> None:
    assert [bundles.var_text(v) for v in (None, True, False, 3, "s", 1.25)] == [
        "", "true", "false", "3", "s", "1.25"
    ]  # fmt: skip
