"""An id the engine cannot carry isolates its target: on a NATS cluster, with
``engine: nats`` in fleet.yaml, the controller refuses the dotted device (naming its file)
and still publishes every other target."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.engines import NatsCluster
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.engine
sys.path.insert(0, str(Path(__file__).parent))

from enginekit import git, setpoint  # noqa: E402


def retained_desired(url: str, prefix: str, want: str, timeout: float = 60) -> set[str]:
    """The device ids with a retained desired bundle, once ``want`` is among them."""
    topics = Topics(prefix)
    host, port = url.removeprefix("mqtt://").split(":")
    seen: set[str] = set()
    cond = threading.Condition()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with cond:
            if message.payload:
                seen.add(topics.parse(message.topic).name)
            cond.notify_all()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topics.all_device_desired(), qos=0)
    client.connect(host, int(port))
    client.loop_start()
    try:
        with cond:
            assert cond.wait_for(lambda: want in seen, timeout), seen
        time.sleep(0.5)  # let the rest of the retained set arrive (only widens `seen`)
        with cond:
            return set(seen)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_dotted_device_is_refused_alone_and_the_rest_is_published(
    nats_cluster: NatsCluster, unique_prefix: str, tmp_path: Path
) -> None:
    repo = tmp_path / "fleet"
    assert setpoint("init", str(repo)).returncode == 0
    assert setpoint("keys", "generate", "--out", str(tmp_path / "keys")).returncode == 0
    fleet_yaml = repo / "fleet.yaml"
    fleet_yaml.write_text(fleet_yaml.read_text() + "engine: nats\n")
    (repo / "devices" / "kiosk.02.yaml").write_text("group: kiosks\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "a dotted kiosk on nats")
    result = setpoint(
        "controller", "--repo", str(repo), "--broker", nats_cluster.urls[1],
        "--key", str(tmp_path / "keys" / "signing.key"), "--state-dir", str(tmp_path / "state"),
        "--prefix", unique_prefix, "--once", "--timeout", "120",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # the commit has a problem ...
    assert "devices/kiosk.02.yaml: device id 'kiosk.02' cannot be used on engine nats" in (
        result.stderr
    )
    # ... and every other target was published, read back from another node.
    seen = retained_desired(nats_cluster.urls[2], unique_prefix, "kiosk-01")
    assert "gw-01" in seen and "kiosk.02" not in seen
