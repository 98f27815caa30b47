"""``setpoint shim`` end to end: the real command in a subprocess against a real mosquitto.

Bundles are signed and published retained by the test (as the controller would), reports
are read back with a plain paho subscriber. The fault test kills the shim with SIGKILL in
the middle of an apply and checks that the restarted shim rolls the half-done apply back
and then applies the version cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "device_shim"))
sys.path.insert(0, str(Path(__file__).parent))

from shimkit import (
    Fleet,
    on_versions,
    statuses,
    wait_for,
)

from setpoint.proto.bundles import CommandResource, FileResource, SettingResource

pytestmark = pytest.mark.broker

SETPOINT = [sys.executable, "-m", "setpoint"]


@pytest.fixture
def fleet(broker: Any, unique_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker.host, broker.port, unique_prefix, tmp_path / "fleet")
    yield f
    f.close()


class ShimProcess:
    def __init__(self, args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [*SETPOINT, "shim", *args], stdout=self._out, stderr=self._out, env=env
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout=timeout)
        self._out.close()
        return code

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        if not self._out.closed:
            self._out.close()
        return code


@pytest.fixture
def run_shim(fleet: Fleet, broker: Any, tmp_path: Path) -> Iterator[Any]:
    started: list[ShimProcess] = []

    def start(
        *extra: str,
        root: Path | None = None,
        device: str = "dev1",
        env: dict[str, str] | None = None,
    ) -> ShimProcess:
        root = root or tmp_path / "root"
        root.mkdir(exist_ok=True)
        args = [
            "--device", device,
            "--broker", f"mqtt://{broker.host}:{broker.port}",
            "--prefix", fleet.topics.prefix,
            "--trust", str(fleet.pub),
            "--root", str(root),
            "--state-dir", str(root / ".setpoint" / "state"),
            "--reconnect-min", "0.1",
            "--reconnect-max", "0.5",
            *extra,
        ]  # fmt: skip
        shim = ShimProcess(args, tmp_path / f"shim-{len(started)}.log", env)
        started.append(shim)
        return shim

    yield start
    for shim in started:
        if shim.proc.poll() is None:
            shim.stop(signal.SIGKILL)


def publish_pair(fleet: Fleet, version: int, resources: Any) -> None:
    fleet.publish_bundle(fleet.group("kiosk", version, resources))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", vars={"name": "dev1"}))


def test_converges_heals_and_stops_cleanly(fleet: Fleet, run_shim: Any, tmp_path: Path) -> None:
    secret = SettingResource("token", "api_token", "hunter2-secret", secret=True)
    publish_pair(fleet, 1, [FileResource("motd", "etc/motd", b"hi ${name}\n"), secret])
    shim = run_shim("--log-json", "--log-level", "DEBUG")
    fleet.wait_report("dev1", on_versions(1, 1), timeout=20)
    fleet.wait_presence("dev1", b"online")
    root = tmp_path / "root"
    assert (root / "etc" / "motd").read_text() == "hi dev1\n"
    (root / "etc" / "motd").write_text("by hand\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
    assert shim.stop(signal.SIGTERM) == 0
    fleet.wait_presence("dev1", b"offline")
    lines = [json.loads(line) for line in shim.text().splitlines() if line.strip()]
    assert any("applied group kiosk v1" in line["message"] for line in lines)
    assert any("healed" in line["message"] for line in lines)
    # With the defaults the edit was seen by inotify, not at the next full look in 60 s.
    assert "observing with inotify; a full look every 60s as a safety net" in [
        line["message"] for line in lines
    ]
    assert "hunter2" not in shim.text()


def test_the_shim_defers_what_paho_imports_only_for_proxies() -> None:
    probe = (
        "import sys\n"
        "from setpoint.commands import shim\n"
        "shim.defer_urllib_request()\n"
        "shim.hide_dnspython_from_paho('mqtt://a:1883')\n"
        "import setpoint.device_shim.agent\n"
        "assert 'http.client' not in sys.modules and 'email' not in sys.modules\n"
        "assert sys.modules.get('dns') is None  # paho's import of dnspython failed\n"
        "import urllib.request\n"
        "from urllib.request import getproxies\n"
        "assert isinstance(getproxies(), dict) and 'http.client' in sys.modules\n"
        "assert type(sys.modules['urllib.request']).__name__ == 'module'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bad_device_id_is_refused_at_start(fleet: Fleet, run_shim: Any) -> None:
    shim = run_shim(device="Not/A/Device")
    assert shim.wait() == 2
    assert "device id 'Not/A/Device' is not valid" in shim.text()


def test_missing_trust_file_is_refused_at_start(run_shim: Any, tmp_path: Path) -> None:
    shim = run_shim("--trust", str(tmp_path / "nope.pub"))
    assert shim.wait() == 2
    assert "nope.pub" in shim.text()


def test_killed_during_apply_then_restarted(
    fleet: Fleet, run_shim: Any, broker: Any, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    config = tmp_path / "device.conf"
    config.write_text("[device]\nallow_commands = true\ncommand_timeout_cap = 60\n")
    flags = ("--config", str(config))
    publish_pair(
        fleet, 1, [FileResource("motd", "etc/motd", b"v1\n"), SettingResource("tz", "tz", "UTC")]
    )
    shim = run_shim(*flags)
    fleet.wait_report("dev1", on_versions(1, 1), timeout=20)

    # v2 changes a file, adds one, changes a setting, then runs a command that blocks the
    # first time it runs (it records its process group so the test can clean up).
    started, done = tmp_path / "started", tmp_path / "done"
    blocking = CommandResource(
        "migrate",
        f"test -e {done}",
        f"if [ -e {started} ]; then touch {done}; else echo $$ > {started}; sleep 60; fi",
        60,
    )
    v2 = [
        FileResource("motd", "etc/motd", b"v2\n"),
        FileResource("new", "etc/new.conf", b"new\n"),
        SettingResource("tz", "tz", "CET"),
        blocking,
    ]
    fleet.publish_bundle(fleet.group("kiosk", 2, v2))
    wait_for(lambda: started.exists() and started.read_text().strip(), what="command started")
    assert (root / "etc" / "motd").read_text() == "v2\n"  # files were written first
    shim.stop(signal.SIGKILL)  # a power cut, as far as the shim can tell
    os.killpg(int(started.read_text()), signal.SIGKILL)  # the orphaned `sleep`
    state_dir = root / ".setpoint" / "state"
    assert (state_dir / "journal.json").exists()
    saved = json.loads((state_dir / "state.json").read_text())
    assert saved["trust"]["floors"]["group/kiosk"]["version"] == 1  # never recorded v2

    # Restarted with the broker away: it rolls back to v1, and keeps enforcing it.
    broker.stop()
    shim = run_shim(*flags)
    wait_for(lambda: not (state_dir / "journal.json").exists(), what="journal cleared")
    assert (root / "etc" / "motd").read_text() == "v1\n"
    assert not (root / "etc" / "new.conf").exists()
    assert json.loads((root / ".setpoint" / "settings.json").read_text()) == {"tz": "UTC"}
    wait_for(lambda: "rolled back an interrupted apply" in shim.text(), what="log line")

    # The broker is back: v2 is applied cleanly from the retained bundle.
    broker.start()
    watcher = Fleet(broker.host, broker.port, fleet.topics.prefix, tmp_path / "w", fleet.key)
    try:
        report = watcher.wait_report("dev1", on_versions(2, 1), timeout=20)
        assert statuses(report)["migrate"] == "ok"
    finally:
        watcher.close()
    assert (root / "etc" / "motd").read_text() == "v2\n"
    assert (root / "etc" / "new.conf").read_text() == "new\n"
    assert done.exists()
    assert shim.stop() == 0


def test_a_broker_list_skips_a_dead_node(fleet: Fleet, run_shim: Any, broker: Any) -> None:
    from setpoint.mosquitto import free_port

    dead = f"mqtt://127.0.0.1:{free_port()}"
    publish_pair(fleet, 1, [FileResource("motd", "etc/motd", b"hi ${name}\n")])
    shim = run_shim("--broker", f"{dead}, {broker.url}")
    fleet.wait_report("dev1", on_versions(1, 1), timeout=30)
    assert shim.stop(signal.SIGTERM) == 0
    text = shim.text()
    assert f"{dead},{broker.url}" in text  # the start line names every node
    assert f"broker {dead} unreachable (ConnectionRefusedError" in text
    assert f"connected to {broker.url}" in text


def test_nodes_found_in_dns_srv_skipping_a_dead_first_node(
    fleet: Fleet, run_shim: Any, broker: Any
) -> None:
    from dnskit import dns_server

    from setpoint.mosquitto import free_port

    dead = free_port()
    publish_pair(fleet, 1, [FileResource("motd", "etc/motd", b"hi ${name}\n")])
    with dns_server() as dns:
        # The dead node has the lowest priority number: always tried first.
        dns.zone["_mqtt._tcp.fleet.example.test"] = [
            (10, 0, broker.port, "localhost."), (0, 5, dead, "localhost."),
        ]  # fmt: skip
        shim = run_shim("--broker", "mqtt+srv://fleet.example.test", env=dns.env)
        fleet.wait_report("dev1", on_versions(1, 1), timeout=30)
        assert shim.stop(signal.SIGTERM) == 0
    text = shim.text()
    nodes = f"mqtt://localhost:{dead},mqtt://localhost:{broker.port}"
    assert f"{nodes} (from DNS: mqtt+srv://fleet.example.test)" in text
    assert f"broker mqtt://localhost:{dead} unreachable (ConnectionRefusedError" in text
    assert f"connected to mqtt://localhost:{broker.port}" in text


def test_a_srv_name_without_records_is_refused_at_start(run_shim: Any) -> None:
    from dnskit import dns_server

    with dns_server() as dns:
        dns.zone["_mqtt._tcp.empty.example.test"] = []
        shim = run_shim("--broker", "mqtt+srv://empty.example.test", env=dns.env)
        assert shim.wait() == 2
    text = shim.text()
    assert (
        "setpoint shim: mqtt+srv://empty.example.test: _mqtt._tcp.empty.example.test has no"
        " SRV records (resolver 127.0.0.1:" in text
    )
    assert "publish SRV records for _mqtt._tcp.empty.example.test" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(("flags", "message"), [
    (("--broker", "mqtt://127.0.0.1:1,mqtts://127.0.0.1:2"),
     "the nodes of one cluster share their TLS settings; use mqtts:// for every node or for none"),
    (("--broker", "mqtt://127.0.0.1:1,,mqtt://127.0.0.1:2"),
     "an empty entry in the list; separate the nodes' URLs with single commas"),
    (("--connect-timeout", "0"), "--connect-timeout 0: must be positive"),
    (("--reconnect-min", "5", "--reconnect-max", "2"),
     "--reconnect-max 2: must not be below --reconnect-min (5)"),
    (("--keepalive", "2"), "--keepalive 2: must be from 5 to 65535 seconds"),
], ids=["mixed-tls", "empty-entry", "connect-timeout", "reconnect-max", "keepalive"])  # fmt: skip
def test_bad_broker_list_and_timing_flags_are_refused_at_start(
    run_shim: Any, flags: tuple[str, ...], message: str
) -> None:
    shim = run_shim(*flags)
    assert shim.wait() == 2
    assert message in shim.text()


def test_keepalive_is_the_one_the_broker_gets(fleet: Fleet, run_shim: Any, broker: Any) -> None:
    """--keepalive reaches the CONNECT: mosquitto logs it (``k7``) for the shim's client."""
    publish_pair(fleet, 1, [FileResource("motd", "etc/motd", b"hi\n")])
    shim = run_shim("--keepalive", "7")
    fleet.wait_presence("dev1", b"online")
    connected = [
        line for line in broker.log.read_text().splitlines() if "as setpoint-shim-dev1 (" in line
    ]
    assert connected and ", k7" in connected[-1], connected
    assert shim.stop(signal.SIGTERM) == 0


def test_without_dnspython_the_shim_names_the_extra_to_install(tmp_path: Path) -> None:
    # A device installed without the srv extra: dnspython cannot be imported.
    code = (
        "import sys; sys.modules['dns'] = None; from setpoint.cli import main;"
        " sys.exit(main(sys.argv[1:]))"
    )
    (tmp_path / "k.pub").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-c", code, "shim", "--device", "dev1", "--broker",
         "mqtt+srv://fleet.example.test", "--trust", str(tmp_path / "k.pub"),
         "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        "setpoint shim: mqtt+srv:// and mqtts+srv:// need the dnspython package, which is not"
        " installed: pip install 'setpoint[srv]' (or pip install dnspython)" in done.stderr
    )
    assert "Traceback" not in done.stderr
