"""The dashboard is safe by default: attacker-controlled text renders as text, pages carry a
strict CSP, the token is required off loopback, and a wrong token gets 401.

Real mosquitto, the real ``setpoint dashboard`` process, a real Chromium.
"""

from __future__ import annotations

import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from dashkit import ENV, SETPOINT, publish

from setpoint.commands.demo import start_dashboard
from setpoint.proto import status
from setpoint.proto.repository import BranchStatus, Problem, RepositoryStatus
from setpoint.proto.status import DriftStatus, GroupStatus, ResourceDiff
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker
WAIT = 30_000
SCRIPT = "<script>window.__xss=1</script>"
IMG = '"><img src=x onerror="window.__xss=2">'
EVIL = f"{SCRIPT} {IMG}"


def get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.fixture
def evil_dashboard(broker_session: Any, tmp_path: Path) -> Iterator[tuple[str, str]]:
    prefix = f"setpoint-test/{secrets.token_hex(4)}/v1"
    t = Topics(prefix)
    now = time.time()
    drift = DriftStatus(
        "evil-01", "kiosks", "drifted", 2, 1, "c0ffee" * 6, now - 5,
        (ResourceDiff("motd", f"drifted: {EVIL}"),), f"reason {EVIL}", now,
    )  # fmt: skip
    group = GroupStatus("kiosks", 2, "c0ffee" * 6, "enforce", 1, {"drifted": 1}, 0.0, None, now)
    repo = RepositoryStatus(
        {
            "main": BranchStatus(
                "main", "ab" * 20, False, now, f"subject {EVIL}",
                (Problem(f"groups/{IMG}.yaml", 3, f"message {EVIL}"),),
            )
        }
    )  # fmt: skip
    rollout = {"type": "rollout-status", "group": "kiosks", "branch": "canary",
               "state": "gated", "reason": f"waiting {EVIL}", "missing": [f"missing {EVIL}"],
               "batches": []}  # fmt: skip
    gate = {"type": "rollout-status", "ring": "canary", "from": "main", "state": "waiting",
            "reason": EVIL, "missing": [f"gate {EVIL}"], "evidence": {}}  # fmt: skip
    import json

    publish(
        broker_session,
        [
            (t.device_drift("evil-01"), drift.to_json(), True),
            (t.group_status("kiosks"), group.to_json(), True),
            (t.repository_status(), repo.to_json(), True),
            (t.group_rollout("kiosks"), json.dumps(rollout).encode(), True),
            (t.ring_gate("canary"), json.dumps(gate).encode(), True),
        ],
    )
    with ExitStack() as stack:
        url = start_dashboard(
            stack, tmp_path / "dashboard.log", broker_session.url, "--prefix", prefix
        )
        yield url, prefix


def test_attacker_text_renders_as_text_on_every_page(
    evil_dashboard: tuple[str, str], broker_session: Any, page: Any
) -> None:
    url, prefix = evil_dashboard
    page.goto(url + "events")
    page.wait_for_selector("header .ok", timeout=WAIT)  # subscribed: events will arrive
    event = status.event("drift", time.time(), device="evil-01", state="drifted",
                         previous="in_sync", reason=EVIL,
                         resources=[{"id": "motd", "why": EVIL}])  # fmt: skip
    publish(broker_session, [(Topics(prefix).event("drift"), event, False)])
    page.wait_for_selector("#events tr.event-drift", timeout=WAIT)
    for path, where in [
        ("", "#repository"),
        ("devices", "#devices"),
        ("devices/evil-01", "#status"),
        ("rollouts", "#ring-canary"),
        ("events", "#events"),
    ]:
        page.goto(url + path)
        text = page.wait_for_selector(where, timeout=WAIT).inner_text()
        assert SCRIPT in text and IMG in text, (path, text)  # shown, as text
        assert page.query_selector("#live img") is None, path
        assert page.query_selector("#live script") is None, path
        assert page.evaluate("window.__xss") is None, path
    # a device id cannot carry markup: it is refused where it enters, as plain text
    code, body, headers = get(url + "devices/%3Cscript%3E")
    assert code == 404 and headers["Content-Type"].startswith("text/plain")
    assert "is not valid" in body


def test_every_response_has_a_strict_csp(evil_dashboard: tuple[str, str]) -> None:
    url, _ = evil_dashboard
    for path in ("", "devices", "rollouts", "events", "static/dashboard.js"):
        code, _, headers = get(url + path)
        assert code == 200, path
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
    code, html, _ = get(url)
    assert "<script>" not in html and " on" not in html.split("<body")[1].split(">")[0]
    assert html.count("<script") == 1 and 'src="/static/dashboard.js"' in html


def dashboard_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SETPOINT, "dashboard", *args], env=ENV, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_off_loopback_without_a_token_is_refused(broker_session: Any) -> None:
    done = dashboard_cli("--broker", broker_session.url, "--listen", "0.0.0.0:0")
    assert done.returncode == 2
    assert "--listen 0.0.0.0:0 is not a loopback address" in done.stderr
    assert "--token-file FILE" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nonsense"], "--listen 'nonsense': use HOST:PORT, e.g. 127.0.0.1:8080"),
        (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], "--tls-cert /no/cert.pem"),
        (["--commit-url", "javascript:alert(1)"], "use an http(s) URL with {commit} in it"),
        (["--prefix", "a/+/b"], "--prefix: topic prefix 'a/+/b' is not valid"),
        (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token:"),
    ],
)
def test_bad_flags_say_what_to_do(broker_session: Any, args: list[str], message: str) -> None:
    done = dashboard_cli("--broker", broker_session.url, *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_a_short_token_is_refused(broker_session: Any, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("short\n")
    done = dashboard_cli("--broker", broker_session.url, "--token-file", str(tmp_path / "token"))
    assert done.returncode == 2
    assert "the token has 5 characters, use at least 16" in done.stderr


def test_off_loopback_the_token_is_required_and_a_wrong_one_gets_401(
    broker_session: Any, tmp_path: Path, page: Any
) -> None:
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token + "\n")
    prefix = f"setpoint-test/{secrets.token_hex(4)}/v1"
    with ExitStack() as stack:
        url = start_dashboard(
            stack, tmp_path / "dashboard.log", broker_session.url, "--prefix", prefix,
            "--listen", "0.0.0.0:0", "--token-file", str(tmp_path / "token"),
        )  # fmt: skip
        local = url.replace("0.0.0.0", "127.0.0.1")  # only ever talk to loopback
        for path in ("", "devices", "stream?page=fleet", "devices/kiosk-01"):
            assert get(local + path)[0] == 401, path
            assert get(local + path, Authorization="Bearer wrong-" + token)[0] == 401, path
        code, _, headers = get(local, Authorization="Bearer " + token[:-1])
        assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert get(local + "devices", Authorization="Bearer " + token)[0] == 200
        # A browser gets the login form; a wrong token stays out, the right one gets in.
        response = page.goto(local + "devices")
        assert response.status == 401
        page.fill("input[name=token]", "not-the-token-at-all")
        page.click("button[type=submit]")
        assert "That token is not the dashboard's." in page.inner_text("form.login")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#devices", timeout=WAIT)
        assert page.url.endswith("/devices")
        assert token not in page.content()


def test_https_and_client_certificates(broker_session: Any, tmp_path: Path) -> None:
    import ssl

    from setpoint.controller import pki

    fleet_pki = pki.init(tmp_path / "pki")  # its server certificate is for 127.0.0.1
    server, operator = fleet_pki.broker, fleet_pki.operator
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    # TLS alone proves the dashboard to the browser, not the browser to the dashboard.
    done = dashboard_cli("--broker", broker_session.url, "--listen", "0.0.0.0:0", *tls)
    assert done.returncode == 2 and "not a loopback address" in done.stderr
    prefix = f"setpoint-test/{secrets.token_hex(4)}/v1"
    with ExitStack() as stack:
        url = start_dashboard(
            stack, tmp_path / "dashboard.log", broker_session.url, "--prefix", prefix,
            *tls, "--tls-client-ca", str(fleet_pki.ca),
        )  # fmt: skip
        assert url.startswith("https://127.0.0.1:")
        with_cert = ssl.create_default_context(cafile=str(fleet_pki.ca))
        with_cert.load_cert_chain(str(operator.cert), str(operator.key))
        with urllib.request.urlopen(url + "devices", context=with_cert, timeout=30) as response:
            assert response.status == 200
        without = ssl.create_default_context(cafile=str(fleet_pki.ca))
        with pytest.raises(OSError):  # the handshake, or the first read, is refused
            urllib.request.urlopen(url + "devices", context=without, timeout=30).read()


def test_a_port_in_use_says_so(broker_session: Any) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = dashboard_cli("--broker", broker_session.url, "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert f"setpoint dashboard: cannot listen on 127.0.0.1:{port}:" in done.stderr
