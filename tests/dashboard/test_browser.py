"""The dashboard in a real Chromium against a live fleet: real mosquitto, real git, the real
controller, real shims and the real ``setpoint dashboard``, each running the real CLI.

Every wait is on the page's DOM with a generous timeout; no test compares times.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from dashkit import SECRET_VALUE, LiveFleet, publish
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.proto.repository import BranchStatus, Problem, RepositoryStatus
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker
WAIT = 30_000  # ms: generous, the machine is shared


@pytest.fixture(scope="module")
def fleet(broker_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    prefix = f"setpoint-test/{secrets.token_hex(4)}/v1"
    with ExitStack() as stack:
        live = LiveFleet(stack, tmp_path_factory.mktemp("live-fleet"), broker_session, prefix)
        try:
            yield live
        except BaseException:
            print(live.logs_text())
            raise


def read_retained(broker: Any, topic: str, timeout: float = 5.0) -> bytes | None:
    """The retained message on ``topic``, or None when the broker has none."""
    import threading

    got: list[bytes] = []
    done = threading.Event()
    mark = secrets.token_hex(8).encode()
    client_id = f"probe-{secrets.token_hex(4)}"
    barrier = Topics(topic.split("/repository/")[0]).barrier(client_id)

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.topic == barrier and message.payload == mark:
            done.set()
        elif message.topic == topic and message.payload:
            got.append(bytes(message.payload))

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=mqtt.MQTTv5,
    )  # fmt: skip
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe([(topic, 0), (barrier, 0)])
        time.sleep(0)  # the SUBSCRIBE goes first on the one connection, then the barrier
        client.publish(barrier, mark, qos=0)
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1] if got else None


def test_fleet_converges_and_a_hand_edit_turns_the_row_drifted_live(
    fleet: LiveFleet, page: Any, screenshots: Path
) -> None:
    page.goto(fleet.url + "devices")
    page.wait_for_selector('#device-gw-01[data-state="in_sync"]', timeout=WAIT)
    page.wait_for_selector('#device-kiosk-01[data-state="in_sync"]', timeout=WAIT)
    page.evaluate("window.__noReload = 'still the same page'")
    fleet.edit_setting("gw-01", "uplink_interval_s", 5)
    row = page.wait_for_selector('#device-gw-01[data-state="drifted"]', timeout=WAIT)
    assert "uplink-interval" in row.inner_text()
    assert page.evaluate("window.__noReload") == "still the same page"  # no reload happened
    page.screenshot(path=str(screenshots / "dashboard-devices.png"), full_page=True)
    assert page.console_errors == []


def test_device_page_shows_the_diff_and_never_the_secret(
    fleet: LiveFleet, page: Any, screenshots: Path
) -> None:
    page.goto(fleet.url + "devices")
    page.wait_for_selector('#device-gw-01[data-state="drifted"]', timeout=WAIT)
    page.click("#device-gw-01 a")
    page.wait_for_selector("#resources", timeout=WAIT)
    assert page.inner_text("#resource-uplink-interval .verdict") == "drifted"
    assert page.inner_text("#resource-api-token .verdict") == "same"
    assert "<secret>" in page.inner_text("#resource-api-token")
    assert SECRET_VALUE not in page.content()
    assert "signatures not verified" not in page.content()  # the dashboard has --trust
    page.screenshot(path=str(screenshots / "dashboard-device.png"), full_page=True)


def test_a_refused_commit_shows_on_the_fleet_page(
    fleet: LiveFleet, page: Any, screenshots: Path
) -> None:
    page.goto(fleet.url)
    page.wait_for_selector("#group-gateways", timeout=WAIT)
    subject = 'kiosks: <script>window.__xss=1</script> "><img src=x onerror="window.__xss=2">'
    bad = "mode: enforce\nresources:\n  - {id: motd, kind: fiel, path: etc/motd, content: x}\n"
    head = fleet.commit({"groups/kiosks.yaml": bad}, subject)
    topic = Topics(fleet.prefix).repository_status()
    # The controller publishes the repository status where it already does (another
    # change); until then this test publishes the status a refusing controller would.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        current = read_retained(fleet.broker, topic, timeout=2)
        if current is not None and head in current.decode(errors="replace"):
            print("the controller published the repository status itself")
            break
    else:
        print("the controller published no repository status: the test publishes it")
        status = RepositoryStatus(
            {
                "main": BranchStatus(
                    "main", head, False, time.time(), subject,
                    (Problem("groups/kiosks.yaml", 4,
                             "resource 'motd': unknown kind 'fiel' (known: command, file,"
                             " setting)"),),
                )
            }
        )  # fmt: skip
        publish(fleet.broker, [(topic, status.to_json(), True)])
    refused = page.wait_for_selector("#repository tr.refused", timeout=WAIT)
    assert head[:12] in refused.inner_text()
    assert "<script>window.__xss=1</script>" in refused.inner_text()  # shown as text
    problem = page.inner_text("#repository .problem")
    assert "groups/kiosks.yaml" in problem and "unknown kind 'fiel'" in problem
    assert page.evaluate("window.__xss") is None
    assert page.query_selector("#repository img") is None
    link = page.get_attribute("#repository tr.refused a.commit", "href")
    assert link == f"https://git.example/fleet/commit/{head}"
    page.screenshot(path=str(screenshots / "dashboard-fleet.png"), full_page=True)


def test_a_gated_ring_shows_what_is_missing(fleet: LiveFleet, page: Any, screenshots: Path) -> None:
    page.goto(fleet.url + "rollouts")
    missing = page.wait_for_selector("#ring-canary .gate .missing li", timeout=WAIT)
    # gw-01 drifted in an earlier test, so main is either not all in sync or not yet
    # healthy for the hour the gate asks: either way the gate says what it waits for.
    assert "on main" in missing.inner_text()
    assert "devices in sync on main" in missing.inner_text() or "3600s" in missing.inner_text()
    assert page.inner_text("#ring-canary .gate-state") == "waiting"
    assert page.inner_text("#rollout-lobby .rollout-state") == "gated"
    page.screenshot(path=str(screenshots / "dashboard-rollouts.png"), full_page=True)


def test_events_page_lists_the_drift_events(fleet: LiveFleet, page: Any, screenshots: Path) -> None:
    page.goto(fleet.url + "events")
    page.wait_for_selector("#events tr.event-drift", timeout=WAIT)
    # A new event appears without a reload.
    page.evaluate("window.__noReload = 1")
    rows = len(page.query_selector_all("#events tbody tr"))
    fleet.edit_setting("gw-01", "uplink_interval_s", 30)  # put back by hand: resolved
    # (wait_for_function would need 'unsafe-eval', which the page's CSP rightly refuses)
    page.wait_for_selector(f"#events tbody tr:nth-child({rows + 1})", timeout=WAIT)
    assert page.evaluate("window.__noReload") == 1
    page.screenshot(path=str(screenshots / "dashboard-events.png"), full_page=True)


def test_pages_work_with_javascript_off(fleet: LiveFleet, chromium: Any) -> None:
    context = chromium.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(fleet.url + "devices?group=gateways")
        assert page.query_selector("#device-gw-01") is not None
        assert page.query_selector("#device-kiosk-01") is None  # filtered out, server-side
        refresh = page.query_selector('noscript meta[http-equiv="refresh"]')
        assert refresh is not None
    finally:
        context.close()
