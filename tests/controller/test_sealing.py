"""Sealed values in the fleet repository: validation, the warnings about recipients, and
sealing into a file without disturbing the rest of it. Real age (pyrage) for encryption."""

from __future__ import annotations

from pathlib import Path

import pyrage
import pytest
from test_fleet import load

from setpoint.controller import sealing
from setpoint.controller.trees import DirectoryTree
from setpoint.proto import sealed
from setpoint.proto.bundles import FileResource, SettingResource

IDENTITIES = {name: pyrage.x25519.Identity.generate() for name in ("k1", "k2", "k3")}
RECIPIENTS = {name: str(i.to_public()) for name, i in IDENTITIES.items()}


def device(group: str, name: str | None = None) -> str:
    return f"group: {group}\n" + (f"recipient: {RECIPIENTS[name]}\n" if name else "")


def sealed_group(plaintext: bytes, *names: str, extra: str = "") -> str:
    value = sealing.seal(plaintext, {n: RECIPIENTS[n] for n in names})
    text = "mode: enforce\nresources: []\n" + extra
    return sealing.place(text, "token", value, new={"kind": "file", "path": "etc/token"})


def texts(problems: tuple[object, ...]) -> list[str]:
    return [str(p) for p in problems]


def test_plaintext_secret_in_a_group_file_is_refused(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {"groups/kiosks.yaml": "resources:\n  - {id: tok, kind: setting, key: t, value: x,"
         " secret: true}\n"},
    )  # fmt: skip
    assert snap.broken_groups == {"kiosks"}
    assert texts(snap.problems) == [
        "groups/kiosks.yaml: resource 'tok': 'secret: true' with a plaintext value in a group"
        " file: every device can read the group's bundle; seal it instead (`setpoint secrets"
        " seal --group kiosks --resource tok --write --from-stdin`, docs/secrets.md)"
    ]


@pytest.mark.parametrize("allowed", [False, True])
def test_plaintext_secret_in_a_device_file_needs_allow_plaintext_secret(
    tmp_path: Path, allowed: bool
) -> None:
    snap = load(
        tmp_path,
        {
            "fleet.yaml": f"allow_plaintext_secret: {str(allowed).lower()}\n",
            "groups/kiosks.yaml": "resources: []\n",
            "devices/k1.yaml": "group: kiosks\nresources:\n"
            "  - {id: tok, kind: setting, key: t, value: x, secret: true}\n",
        },
    )
    if allowed:
        assert snap.ok and snap.devices["k1"].resources == (SettingResource("tok", "t", "x", True),)
    else:
        assert texts(snap.problems) == [
            "devices/k1.yaml: resource 'tok': 'secret: true' with a plaintext value: seal it"
            " (`setpoint secrets seal --device k1 --resource tok --write --from-stdin`), or set"
            " 'allow_plaintext_secret: true' in fleet.yaml to accept plaintext secrets in"
            " device files"
        ]


def test_a_private_plaintext_file_in_a_group_file_is_a_warning(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {"groups/kiosks.yaml": "resources:\n  - {id: key, kind: file, path: etc/key,"
         " content: x, mode: '0600'}\n"},
    )  # fmt: skip
    assert snap.ok
    [warning] = texts(snap.warnings)
    assert warning.startswith(
        "groups/kiosks.yaml: resource 'key': mode 0600 says this file is private, but its"
        " content is plaintext in the group's bundle, which every device can read; seal it"
    )


def test_a_sealed_file_is_0600_by_default_and_needs_no_warning(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {"groups/kiosks.yaml": sealed_group(b"s", "k1"), "devices/k1.yaml": device("kiosks", "k1")},
    )
    assert snap.ok and not snap.warnings, texts(snap.warnings)
    [token] = snap.groups["kiosks"].resources
    assert isinstance(token, FileResource) and token.mode == 0o600 and token.content == b""
    assert token.sealed is not None and token.sealed.recipients == sealed.keyids([RECIPIENTS["k1"]])


def test_a_device_added_without_reseal_is_warned_about(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": sealed_group(b"s", "k1"),
            "devices/k1.yaml": device("kiosks", "k1"),
            "devices/k2.yaml": device("kiosks", "k2"),
            "devices/k3.yaml": device("kiosks"),
        },
    )
    assert snap.ok  # warnings never stop a publication
    assert texts(snap.warnings) == [
        "groups/kiosks.yaml: resource 'token': not sealed for device(s) k2, which will refuse the"
        " bundle (not-a-recipient) until it is resealed: setpoint secrets reseal --group kiosks"
        " --resource token",
        "devices/k3.yaml: no 'recipient:', but sealed value(s) 'token' are meant for this device:"
        " run `setpoint shim keygen` on the device, add the printed age1... line here as"
        " 'recipient:', then reseal",
    ]


def test_a_device_that_left_the_group_is_warned_about(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": sealed_group(b"s", "k1", "k2"),
            "groups/other.yaml": "resources: []\n",
            "devices/k1.yaml": device("kiosks", "k1"),
            "devices/k2.yaml": device("other", "k2"),
        },
    )
    [warning] = texts(snap.warnings)
    assert "also sealed for 1 recipient(s) no longer in the group" in warning


def test_a_device_overriding_the_sealed_resource_needs_no_recipient(tmp_path: Path) -> None:
    snap = load(
        tmp_path,
        {
            "groups/kiosks.yaml": sealed_group(b"s", "k1"),
            "devices/k1.yaml": device("kiosks", "k1"),
            "devices/k2.yaml": device("kiosks") + "resources:\n"
            "  - {id: token, kind: file, path: etc/token, content: public}\n",
        },
    )
    assert not snap.warnings, texts(snap.warnings)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("recipient: age1nope\n", "recipient: 'age1nope' is not an age X25519 recipient"),
        (
            "resources:\n  - id: t\n    kind: setting\n    key: k\n    value: v\n    sealed:\n"
            "      age: x\n      recipients: []\n",
            "give 'value' or 'sealed', not both",
        ),
        (
            "resources:\n  - id: t\n    kind: setting\n    key: k\n    sealed:\n"
            "      age: hunter2\n      recipients: []\n",
            "sealed: 'age' must start with '-----BEGIN AGE ENCRYPTED FILE-----'",
        ),
        (
            "resources:\n  - id: t\n    kind: file\n    path: p\n    content: c\n    sealed:\n"
            "      age: x\n      recipients: []\n",
            "give exactly one of 'content' (the text inline), 'source' (a file in the"
            " repository) or 'sealed' (from `setpoint secrets seal`)",
        ),
    ],
)
def test_bad_sealed_values_and_recipients_name_the_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    snap = load(
        tmp_path, {"groups/g.yaml": "resources: []\n", "devices/d.yaml": "group: g\n" + text}
    )
    [problem] = texts(snap.problems)
    assert problem.startswith("devices/d.yaml: ") and message in problem, problem


def test_sealing_opens_only_for_its_recipients() -> None:
    value = sealing.seal(b"hunter2", {"k1": RECIPIENTS["k1"], "k2": RECIPIENTS["k2"]})
    for name in ("k1", "k2"):
        assert pyrage.decrypt(value.armor.encode(), [IDENTITIES[name]]) == b"hunter2"
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(value.armor.encode(), [IDENTITIES["k3"]])
    assert "hunter2" not in value.armor


def test_sealing_refuses_a_bad_recipient_checksum() -> None:
    broken = RECIPIENTS["k1"][:-1] + ("q" if RECIPIENTS["k1"][-1] != "q" else "p")
    with pytest.raises(sealing.SealingError, match=r"device 'k1': recipient .* is not valid"):
        sealing.seal(b"x", {"k1": broken})


def test_recipients_of_a_group_name_the_devices_that_lack_one(tmp_path: Path) -> None:
    files = {"groups/g.yaml": "", "devices/a.yaml": device("g", "k1")}
    load(tmp_path, {**files, "devices/b.yaml": device("g"), "devices/c.yaml": device("h", "k2")})
    tree = DirectoryTree(tmp_path)
    with pytest.raises(sealing.SealingError, match=r"no 'recipient:' in devices/b.yaml"):
        sealing.recipients(tree, group="g")
    assert sealing.recipients(tree, device="a") == {"a": RECIPIENTS["k1"]}
    with pytest.raises(sealing.SealingError, match=r"group 'nope' has no file groups/nope\.yaml"):
        sealing.recipients(tree, group="nope")


KEEP = """\
# The kiosks. This comment stays.
mode: enforce
resources:
  - id: motd   # and this one
    kind: file
    path: etc/motd
    content: |
      hello
  - id: token
    kind: setting
    key: api_token
    value: plaintext-to-replace
# the end
"""


def test_place_replaces_the_value_and_keeps_everything_else() -> None:
    value = sealing.seal(b"x", {"k1": RECIPIENTS["k1"]})
    out = sealing.place(KEEP, "token", value)
    assert "plaintext-to-replace" not in out
    head, tail = KEEP.split("    value: plaintext-to-replace\n")
    assert out.startswith(head) and out.endswith(tail)
    again = sealing.place(out, "token", sealing.seal(b"y", {"k1": RECIPIENTS["k1"]}))
    assert again.startswith(head) and again.endswith(tail) and again.count("sealed:") == 1


def test_place_adds_a_new_resource_after_the_last_one() -> None:
    value = sealing.seal(b"x", {"k1": RECIPIENTS["k1"]})
    out = sealing.place(
        KEEP, "key", value, new={"kind": "file", "path": "etc/k: v", "mode": "0600"}
    )
    assert out.startswith(KEEP.removesuffix("# the end\n")) and out.endswith("-\n# the end\n")
    assert '    path: "etc/k: v"\n' in out


def test_place_without_a_resource_or_its_kind_says_what_to_give() -> None:
    value = sealing.seal(b"x", {"k1": RECIPIENTS["k1"]})
    with pytest.raises(sealing.SealingError, match=r"--key KEY .* or --path PATH"):
        sealing.place(KEEP, "missing", value)
    with pytest.raises(sealing.SealingError, match="flow style"):
        sealing.place("resources:\n  - {id: t, kind: setting, key: k, value: v}\n", "t", value)
