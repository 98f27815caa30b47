"""Taking over the controller's MQTT client id, against the real ``setpoint controller``
command on the secure broker: mosquitto drops the session that held the id, so a storm of
takeovers disconnects the controller again and again. It must come back once the storm
ends, not spin (it once held a core at 100% and published nothing, for good)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import Client, LiveController, commit

from setpoint.controller.pki import Pki
from setpoint.mosquitto import SecureBroker

pytestmark = pytest.mark.broker

FIXED_ID = "setpoint-controller-main"


@pytest.fixture
def live(secure_broker: SecureBroker, pki: Pki, tmp_path: Path) -> Iterator[LiveController]:
    controller = LiveController(
        secure_broker, pki, tmp_path, "--client-id", FIXED_ID, "--poll-interval", "0.2"
    )
    yield controller
    controller.close()


def test_client_id_takeover_storm_does_not_wedge_the_controller(
    live: LiveController, secure_broker: SecureBroker, pki: Pki
) -> None:
    # A device certificate (dev2) takes the controller's fixed client id, over and over,
    # while dev1 goes on and offline: the controller has drift statuses to publish when
    # its session drops under it.
    dev1 = Client(secure_broker, pki.device("dev1"), "setpoint-shim-dev1")
    for i in range(200):
        dev1.publish(live.topics.device_presence("dev1"), b"online" if i % 2 else b"offline")
        thief = Client(secure_broker, pki.device("dev2"), FIXED_ID)
        thief.close()
    # The storm is over: the next commit must go out.
    commit(live.repo, "two")
    live.wait_motd(b"two")
    assert live.proc.poll() is None


_WAITER = """
import asyncio, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from setpoint.controller.broker import Backoff, BrokerSettings, Link
from setpoint.proto.topics import Topics

host, port, prefix, ca, cert, key, dev_cert, dev_key = sys.argv[1:]

async def main():
    link = Link(
        BrokerSettings(host, int(port), tls=True, ca=ca, cert=cert, key=key,
                       client_id="setpoint-controller-fixed"),
        Topics(prefix), [], lambda fact: None, backoff=Backoff(base=0.2, cap=0.5),
    )
    runner = asyncio.create_task(link.run())
    first = await link.wait_connected()
    thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="setpoint-controller-fixed")
    thief.tls_set(ca_certs=ca, certfile=dev_cert, keyfile=dev_key)
    thief.connect(host, int(port))
    thief.loop_start()
    await first.lost.wait()
    thief.disconnect()
    thief.loop_stop()
    # Right after the loss, before the link has cleaned up: wait for the next session.
    ticks = 0
    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)
    ticker = asyncio.create_task(tick())
    second = await link.wait_connected()
    assert second is not first and not second.lost.is_set()
    assert ticks > 0, "the event loop never ran while waiting"
    ticker.cancel()
    runner.cancel()
    print("reconnected", flush=True)

asyncio.run(main())
"""


def test_client_id_takeover_does_not_make_the_link_spin(
    secure_broker: SecureBroker, pki: Pki, tmp_path: Path
) -> None:
    # The controller's Link waits for its next session the moment a takeover dropped the
    # one it had (what the drift engine and the rollouts do after a failed publish). It
    # used to spin without yielding right there: the event loop froze for good.
    creds, dev = pki.controller, pki.device("dev2")
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    try:
        result = subprocess.run(
            [
                sys.executable, str(script), secure_broker.host, str(secure_broker.port),
                secure_broker.prefix, str(creds.ca), str(creds.cert), str(creds.key),
                str(dev.cert), str(dev.key),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the link spun after its session was taken over (no reconnect in 60 s)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reconnected" in result.stdout


def test_operator_flood_does_not_grow_the_controller(
    live: LiveController, secure_broker: SecureBroker, pki: Pki
) -> None:
    # The operator's one writable topic that the controller reads is operators/commands:
    # 200 MiB of junk there, as fast as the broker takes it. The broker caps what it holds
    # for the controller (secure.conf), the controller holds at most 64 MiB unread
    # (broker.MAX_INBOX_BYTES) and refuses each command by its size before decoding it.
    before = peak = live.rss_mib()
    operator = Client(secure_broker, pki.operator, "flooder")
    junk = b"\x00" * (1 << 20)
    for _ in range(200):
        operator.client.publish(live.topics.operator_commands(), junk, qos=0)
        peak = max(peak, live.rss_mib())
    operator.barrier(live.topics.barrier("flooder"))
    peak = max(peak, live.rss_mib())
    assert peak - before < 150, f"the controller grew by {peak - before:.0f} MiB"
    commit(live.repo, "two")  # and it still does its job
    live.wait_motd(b"two")
