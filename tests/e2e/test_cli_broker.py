"""Where the broker settings come from (flag, environment, config file), the config verbs,
and ``diff`` on a device that never reported: the real command against a real mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from clikit import SETPOINT, environment, retain, run
from dnskit import dns_server

from setpoint.proto.status import GroupStatus
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker
NOWHERE = "mqtt://127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "config"


def write_config(home: Path, text: str) -> Path:
    path = home / "setpoint" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_setpoint_broker_from_the_environment_is_used(
    broker_session: Any, unique_prefix: str, home: Path
) -> None:
    env = {"SETPOINT_BROKER": broker_session.url, "SETPOINT_PREFIX": unique_prefix}
    done = run(home, "status", env=env)
    assert done.returncode == 0, done.stderr
    assert "fleet: 0 devices" in done.stdout


def test_flags_beat_the_environment_which_beats_the_config_file(
    broker: Any, unique_prefix: str, home: Path
) -> None:
    group = GroupStatus("kiosks", 1, "c0ffee" * 6, "enforce", 0, {}, 100.0)
    retain(broker, Topics(unique_prefix).group_status("kiosks"), group.to_json())
    write_config(
        home,
        f'current-context = "dead"\n'
        f'[contexts.dead]\nbroker = "{NOWHERE}"\nprefix = "{unique_prefix}"\n'
        f'[contexts.live]\nbroker = "{broker.url}"\nprefix = "{unique_prefix}"\n',
    )
    # The file alone: its current context (a broker nobody runs).
    done = run(home, "status")
    assert done.returncode == 2 and f"cannot connect to {NOWHERE}" in done.stderr
    # The environment beats the context's broker; the context's prefix still applies.
    done = run(home, "status", "--json", "--context", "dead",
               env={"SETPOINT_BROKER": broker.url})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [g["group"] for g in json.loads(done.stdout)["groups"]] == ["kiosks"]
    done = run(home, "status", "--context", "live", env={"SETPOINT_BROKER": NOWHERE})
    assert done.returncode == 2 and f"cannot connect to {NOWHERE}" in done.stderr
    # A flag beats the environment.
    done = run(home, "status", "--broker", broker.url, "--prefix", unique_prefix,
               env={"SETPOINT_BROKER": NOWHERE})  # fmt: skip
    assert done.returncode == 0, done.stderr
    # A broker named without a context is not mixed with the current context's prefix
    # (a fresh broker: nothing is retained under the default prefix).
    done = run(home, "status", "--json", "--broker", broker.url)
    assert done.returncode == 0 and json.loads(done.stdout)["groups"] == []
    # --context and SETPOINT_CONTEXT choose another context of the file.
    assert run(home, "status", "--context", "live").returncode == 0
    assert run(home, "status", env={"SETPOINT_CONTEXT": "live"}).returncode == 0
    done = run(home, "status", "--context", "lve")
    assert done.returncode == 2
    assert "no context 'lve'" in done.stderr and "did you mean 'live'?" in done.stderr


def test_config_verbs_write_a_file_that_status_uses(
    broker_session: Any, unique_prefix: str, home: Path, tmp_path: Path
) -> None:
    (tmp_path / "ops.password").write_text("not-used-by-anonymous-broker\n")
    done = run(home, "config", "set-context", "lab", "--broker", broker_session.url,
               "--prefix", unique_prefix, "--password-file", str(tmp_path / "ops.password"),
               "--username", "ops")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "context 'lab' created" in done.stdout and "(current)" in done.stdout
    path = home / "setpoint" / "config.toml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "not-used" not in path.read_text()  # the path is stored, never the password
    assert run(home, "status").returncode == 0
    assert run(home, "config", "set-context", "other", "--broker", NOWHERE).returncode == 0
    done = run(home, "config", "use", "other")
    assert done.returncode == 0 and "now using context 'other'" in done.stdout
    assert run(home, "status").returncode == 2
    view = json.loads(run(home, "config", "view", "--json").stdout)
    assert view["current-context"] == "other"
    assert view["contexts"]["lab"]["password-file"] == str(tmp_path / "ops.password")
    done = run(home, "config", "use", "lba")
    assert done.returncode == 2 and "did you mean 'lab'?" in done.stderr
    done = run(home, "config", "set-context", "third", "--prefix", "x/y")
    assert done.returncode == 2 and "a new context needs --broker" in done.stderr
    done = run(home, "config", "set-context", "lab", "--broker", "http://x")
    assert done.returncode == 2 and "use mqtt://host:port" in done.stderr


def test_a_password_in_the_config_file_is_refused(home: Path) -> None:
    path = write_config(home, '[contexts.lab]\nbroker = "mqtt://h:1"\npassword = "hunter2"\n')
    done = run(home, "status", "--context", "lab")
    assert done.returncode == 2
    assert f"{path}: context 'lab': 'password' is not allowed in the config file" in done.stderr
    assert "password-file = PATH" in done.stderr and "hunter2" not in done.stderr
    write_config(home, '[contexts.lab]\nbroker = "mqtt://h:1"\nbrokr = "x"\n')
    done = run(home, "status")
    assert done.returncode == 2 and "unknown setting 'brokr'" in done.stderr
    write_config(home, "not toml [")
    done = run(home, "status")
    assert done.returncode == 2 and "not valid TOML" in done.stderr


@pytest.fixture
def published(broker: Any, unique_prefix: str, home: Path, tmp_path: Path) -> list[str]:
    """The example fleet's bundles retained by the real controller; no device runs."""
    assert run(home, "init", str(tmp_path / "fleet")).returncode == 0
    assert run(home, "keys", "generate", "--out", str(tmp_path / "keys")).returncode == 0
    base = ["--broker", broker.url, "--prefix", unique_prefix]
    done = run(home, "controller", "--repo", str(tmp_path / "fleet"), *base,
               "--key", str(tmp_path / "keys" / "signing.key"),
               "--state-dir", str(tmp_path / "state"), "--once")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return base


def test_diff_on_a_device_that_never_reported_exits_2(published: list[str], home: Path) -> None:
    done = run(home, "diff", "kiosk-01", *published)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the device has not reported yet" in done.stdout
    assert "motd" in done.stdout  # the desired side is still shown
    done = run(home, "diff", "kiosk-01", *published, "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["reported"] is None


def test_diff_into_a_closed_pipe_ends_quietly(published: list[str], home: Path) -> None:
    proc = subprocess.Popen(
        [*SETPOINT, "diff", "kiosk-01", *published],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(home),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head` that has already gone
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_context_keeps_the_broker_list_of_a_cluster(home: Path) -> None:
    nodes = "mqtt://127.0.0.1:1,mqtt://127.0.0.1:2"
    done = run(home, "config", "set-context", "cluster", "--broker", nodes)
    assert done.returncode == 0, done.stderr
    view = json.loads(run(home, "config", "view", "--json").stdout)
    assert view["contexts"]["cluster"]["broker"] == nodes
    done = run(home, "config", "set-context", "cluster", "--broker", f"{nodes},http://x")
    assert done.returncode == 2 and "'http://x': use mqtt://host:port" in done.stderr


def test_a_dead_broker_is_named_once_with_where_to_fix_it(home: Path) -> None:
    done = run(home, "status", "--broker", NOWHERE)
    assert done.returncode == 2, done.stderr
    # The URL heads the message and is not repeated for each protocol tried.
    assert done.stderr.count(NOWHERE) == 1, done.stderr
    assert "(MQTT 5): [Errno 111] Connection refused" in done.stderr
    assert "--broker, SETPOINT_BROKER or the context" in done.stderr


def test_status_finds_the_nodes_in_dns_srv(
    broker_session: Any, unique_prefix: str, home: Path
) -> None:
    from setpoint.mosquitto import free_port

    dead = free_port()
    with dns_server() as dns:
        dns.zone["_mqtt._tcp.ops.example.test"] = [
            (0, 0, dead, "localhost."), (1, 0, broker_session.port, "localhost."),
        ]  # fmt: skip
        done = run(home, "status", "--broker", "mqtt+srv://ops.example.test",
                   "--prefix", unique_prefix, env=dns.env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "fleet: 0 devices" in done.stdout
        # A context keeps the name, not the nodes: DNS is asked at each use.
        done = run(home, "config", "set-context", "srv", "--broker",
                   "mqtt+srv://ops.example.test", "--prefix", unique_prefix)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert run(home, "status", env=dns.env).returncode == 0
        assert dns.queries == ["_mqtt._tcp.ops.example.test"] * 2
        # Every node dead: each is named.
        dns.zone["_mqtt._tcp.ops.example.test"] = [(0, 0, dead, "localhost.")]
        done = run(home, "status", env=dns.env)
        assert done.returncode == 2
        assert "cannot connect to mqtt+srv://ops.example.test:" in done.stderr
        assert f"mqtt://localhost:{dead} (MQTT 5): [Errno 111]" in done.stderr


@pytest.mark.parametrize(("zone", "message"), [
    ({}, "_mqtt._tcp.none.example.test does not exist (resolver 127.0.0.1:"),
    ({"_mqtt._tcp.none.example.test": []}, "_mqtt._tcp.none.example.test has no SRV records"),
], ids=["nxdomain", "no-records"])  # fmt: skip
def test_a_srv_name_without_nodes_exits_2_naming_it(
    home: Path, zone: dict[str, Any], message: str
) -> None:
    with dns_server() as dns:
        dns.zone.update(zone)
        done = run(home, "status", "--broker", "mqtt+srv://none.example.test", env=dns.env)
    assert done.returncode == 2
    assert f"setpoint status: mqtt+srv://none.example.test: {message}" in done.stderr
    assert "publish SRV records for _mqtt._tcp.none.example.test" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_controller_finds_its_nodes_in_dns_srv_and_skips_a_dead_one(
    broker: Any, unique_prefix: str, home: Path, tmp_path: Path
) -> None:
    from setpoint.mosquitto import free_port

    assert run(home, "init", str(tmp_path / "fleet")).returncode == 0
    assert run(home, "keys", "generate", "--out", str(tmp_path / "keys")).returncode == 0
    with dns_server() as dns:
        dns.zone["_mqtt._tcp.ops.example.test"] = [
            (0, 0, free_port(), "localhost."), (1, 0, broker.port, "localhost."),
        ]  # fmt: skip
        done = run(home, "controller", "--repo", str(tmp_path / "fleet"),
                   "--broker", "mqtt+srv://ops.example.test", "--prefix", unique_prefix,
                   "--key", str(tmp_path / "keys" / "signing.key"),
                   "--state-dir", str(tmp_path / "state"), "--once", env=dns.env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert dns.queries == ["_mqtt._tcp.ops.example.test"]
    # The first node (dead) was tried, then the second took the controller's publications.
    assert "cannot connect" in done.stderr
    found = run(home, "status", "--broker", broker.url, "--prefix", unique_prefix)
    assert found.returncode == 0 and "branch main: HEAD" in found.stdout, found.stdout
    assert "accepted" in found.stdout
