"""What a user meets in the first hour, through the real command: typos, exit codes,
revisions, key folders, closed pipes, shell completion and ``--json``.

The broker-backed verbs (environment and config precedence, ``diff`` on a device that
never reported, ``wait``) are in test_cli_broker.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from clikit import SETPOINT, environment, git, run


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty config folder for the command (no operator config file)."""
    return tmp_path / "config"


def test_a_typo_gets_did_you_mean(home: Path) -> None:
    done = run(home, "stauts", "--broker", "mqtt://127.0.0.1:1")
    assert done.returncode == 2
    assert "unknown verb 'stauts'; did you mean 'status'?" in done.stderr
    assert "Traceback" not in done.stderr
    done = run(home, "xyzzy")
    assert done.returncode == 2 and "unknown verb 'xyzzy'" in done.stderr
    assert "did you mean" not in done.stderr and "verbs: init, validate" in done.stderr


def test_keys_generate_refuses_a_missing_parent_and_creates_the_last_level(
    home: Path, tmp_path: Path
) -> None:
    done = run(home, "keys", "generate", "--out", str(tmp_path / "no" / "such" / "keys"))
    assert done.returncode == 2
    assert f"the folder {tmp_path / 'no' / 'such'} does not exist; create it first" in done.stderr
    assert not (tmp_path / "no").exists()
    done = run(home, "keys", "generate", "--out", str(tmp_path / "keys"), "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert Path(body["private"]).stat().st_mode & 0o777 == 0o600
    again = run(home, "keys", "id", body["public"], "--json")
    assert json.loads(again.stdout)["key_id"] == body["key_id"]
    exists = run(home, "keys", "generate", "--out", str(tmp_path / "keys"))
    assert exists.returncode == 2 and "exists: pass --force to replace it" in exists.stderr


def test_history_says_what_is_missing(home: Path, tmp_path: Path) -> None:
    from setpoint.controller import audit

    done = run(home, "history", "--state-dir", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert f"no controller state directory {tmp_path / 'nowhere'}" in done.stderr
    state = tmp_path / "state"
    state.mkdir()
    empty = run(home, "history", "--state-dir", str(state))
    assert empty.returncode == 0 and "no publications recorded" in empty.stdout
    entry = audit.Entry(1.0, "group/kiosks", "group", "kiosks", 1, "c" * 40, "a", "d", "change")
    audit.AuditLog(state).append([entry])
    done = run(home, "history", "kiosk", "--state-dir", str(state))
    assert done.returncode == 1
    assert "no publication of 'kiosk'" in done.stderr
    assert "did you mean 'kiosks'?" in done.stderr and "targets: group/kiosks" in done.stderr
    found = run(home, "history", "kiosks", "--state-dir", str(state), "--json")
    assert found.returncode == 0 and json.loads(found.stdout)["target"] == "group/kiosks"


def test_history_reads_the_state_dir_of_the_context(home: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = home / "setpoint" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f'current-context = "lab"\n[contexts.lab]\nbroker = "mqtt://127.0.0.1:1"\n'
        f'state-dir = "{state}"\n'
    )
    done = run(home, "history")
    assert done.returncode == 0 and f"no publications recorded in {state}" in done.stdout


def test_validate_rev_takes_short_ids_and_head_tilde(home: Path, tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    assert run(home, "init", str(repo), "--json").returncode == 0
    first = git(repo, "rev-parse", "HEAD")
    (repo / "groups" / "kiosks.yaml").write_text(
        (repo / "groups" / "kiosks.yaml").read_text().replace("info", "warning")
    )
    git(repo, "commit", "-qam", "louder kiosks")
    for rev in (first[:7], "HEAD~1", "main~1", "HEAD"):
        done = run(home, "validate", str(repo), "--rev", rev)
        assert done.returncode == 0, (rev, done.stderr)
        assert "ok:" in done.stdout
    assert f"({first[:12]})" in run(home, "validate", str(repo), "--rev", "HEAD~1").stdout
    done = run(home, "validate", str(repo), "--rev", "nosuchbranch")
    assert done.returncode == 2
    assert "no branch or commit 'nosuchbranch'" in done.stderr and "HEAD~N" in done.stderr


def test_a_closed_pipe_is_not_a_traceback(home: Path) -> None:
    # The reader is gone before the first byte is written (`setpoint ... | head` once head
    # has had its lines): the command ends quietly with 141, like one killed by SIGPIPE.
    proc = subprocess.Popen(
        [*SETPOINT, "completion", "bash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(home),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_bash_completion_is_valid_and_completes_verbs_and_options(home: Path) -> None:
    done = run(home, "completion", "bash")
    assert done.returncode == 0
    script = done.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    for verb in ("status", "wait", "config", "completion", "keys"):
        assert verb in script

    def complete(*words: str) -> list[str]:
        probe = (
            f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)});"
            f" COMP_CWORD={len(words) - 1}; _setpoint; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
        return out.stdout.split()

    assert complete("setpoint", "sta") == ["status"]
    assert complete("setpoint", "wa") == ["wait"]
    assert complete("setpoint", "keys", "gen") == ["generate"]
    assert complete("setpoint", "wait", "--for", "") == ["in_sync"]
    assert "--follow" in complete("setpoint", "drift", "--broker", "mqtt://x:1", "--fo")
    assert complete("setpoint", "config", "") == ["view", "use", "set-context", "delete-context"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_other_shells_get_a_script_from_the_parser(home: Path, shell: str) -> None:
    done = run(home, "completion", shell)
    assert done.returncode == 0
    assert "wait" in done.stdout and "session-expiry" in done.stdout


def test_every_help_that_takes_a_broker_documents_the_environment(home: Path) -> None:
    from setpoint.cli import VERBS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb in VERBS:
        text = sub.choices[verb].format_help()
        if "--broker" in text:
            assert "SETPOINT_BROKER" in text, verb
            assert "--context" in text, verb


def test_init_and_validate_speak_json(home: Path, tmp_path: Path) -> None:
    done = run(home, "init", str(tmp_path / "fleet"), "--json")
    body = json.loads(done.stdout)
    assert body["branch"] == "main" and len(body["commit"]) == 40
    assert "fleet.yaml" in body["files"]
    checked = json.loads(run(home, "validate", str(tmp_path / "fleet"), "--json").stdout)
    assert checked["ok"] is True and checked["problems"] == []


def test_no_broker_anywhere_says_the_three_ways_to_give_one(home: Path) -> None:
    done = run(home, "status")
    assert done.returncode == 2
    assert "no broker: pass --broker mqtt://host:port, set SETPOINT_BROKER" in done.stderr
    assert "setpoint config set-context NAME --broker" in done.stderr
