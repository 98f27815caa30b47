"""Hostile YAML in the fleet repository: Python object tags and alias bombs are refused
by the loader the controller and `setpoint validate` use, with nothing executed or
expanded."""

from __future__ import annotations

from pathlib import Path

import pytest

from setpoint.cli import main
from setpoint.controller import examples, safeyaml

BOMB = b"""\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def python_tags(marker: Path) -> list[bytes]:
    return [
        f'mode: !!python/object/apply:os.system ["touch {marker}"]\n'.encode(),
        f"mode: !!python/object/new:subprocess.Popen [[touch, {marker}]]\n".encode(),
        b"mode: !!python/name:os.system\n",
        b"mode: !!python/module:os\n",
        b"mode: !!python/tuple [1, 2]\n",
    ]


def test_yaml_with_python_tags(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for document in python_tags(marker):
        with pytest.raises(safeyaml.YamlError):
            safeyaml.load(document)
    assert not marker.exists()


def test_yaml_alias_bomb() -> None:
    with pytest.raises(safeyaml.YamlError, match=r"alias|anchor"):
        safeyaml.load(BOMB)


@pytest.mark.parametrize("attack", ["python-tag", "alias-bomb"])
def test_hostile_yaml_in_a_fleet_repository(
    tmp_path: Path, attack: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    for name, text in examples.FILES.items():
        (tmp_path / "fleet" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fleet" / name).write_text(text)
    hostile = python_tags(marker)[0] if attack == "python-tag" else BOMB
    (tmp_path / "fleet" / "groups" / "evil.yaml").write_bytes(hostile)
    assert main(["validate", str(tmp_path / "fleet")]) != 0
    captured = capsys.readouterr()
    assert "groups/evil.yaml" in captured.out + captured.err
    assert not marker.exists()
