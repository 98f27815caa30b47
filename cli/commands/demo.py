"""``setpoint demo``: the whole loop, end to end, on a private broker.

Starts a private mosquitto from ``mosquitto/`` on a free loopback port, makes a scratch
fleet repository with ``setpoint init``, a signing key, the controller and one shim per
device of the example fleet (every one a real process running the real CLI), then tells
the story: convergence, a commit, a hand edit on a device in each group (healed in
enforce mode, reported in observe mode), and a ``git revert``. It prints what happens
with timings, cleans up every process it started and exits 0, or 1 if a step did not
happen in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

STEP_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenario",
        nargs="?",
        choices=("loop", "rollout"),
        default="loop",
        help="loop: commit, converge, drift, heal, revert (default); rollout: rings,"
        " gates, batches, halt and revert (cli/commands/demo_rollout.py)",
    )
    parser.add_argument(
        "--keep", type=Path, help="work in this directory and keep it (default: a temp dir)"
    )
    parser.add_argument(
        "--timeout", type=float, default=STEP_TIMEOUT, help="seconds to wait for each step"
    )
    parser.add_argument("--no-color", action="store_true", help="plain output")
    parser.add_argument(
        "--devices",
        type=int,
        default=3,
        help="how many device shims to run (at least 2: one per group; default 3)",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="after the story, keep the fleet and the dashboard running until Ctrl-C",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="run on the secure broker: mutual TLS with a fresh fleet PKI, and the ACL",
    )


class DemoFailed(Exception):
    pass


class Narrator:
    def __init__(self, color: bool) -> None:
        self.color = color
        self.t0 = time.monotonic()

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def step(self, text: str) -> None:
        print(f"\n{self._paint('1', '==> ' + text)}", flush=True)

    def say(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.t0:7.2f}s]"
        print(f"{self._paint('2', stamp)} {text}", flush=True)

    def good(self, text: str) -> None:
        self.say(self._paint("32", text))

    def warn(self, text: str) -> None:
        self.say(self._paint("33", text))


class Watcher:
    """Follows drift status and drift events on the broker, as any operator tool could."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        narrator: Narrator,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        from setpoint.proto import status, topics

        self._status = status
        self.topics = topics.Topics(prefix)
        self.narrator = narrator
        self.drift: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"setpoint-demo-watch-{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        if tls is not None:
            ca, cert, key = tls
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(self.topics.all_drift(), 1), (self.topics.event("drift"), 1)])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if not message.payload:
            return
        try:
            ref = self.topics.parse(message.topic)
            if ref.kind == "device-drift":
                drift = self._status.drift_from_json(message.payload)
                with self.cond:
                    self.drift[ref.name] = drift
                    self.cond.notify_all()
            elif ref.kind == "event":
                event = self._status.event_from_json(message.payload)
                self._tell(event)
                with self.cond:
                    self.events.append(event)
                    self.cond.notify_all()
        except Exception as exc:  # a demo watcher must not die on one odd message
            self.narrator.warn(f"ignored a message on {message.topic}: {exc}")

    def _tell(self, event: dict[str, Any]) -> None:
        device, state = event.get("device"), event.get("state")
        previous = event.get("previous") or "(new)"
        change = event.get("change", "")
        line = f"event drift/{change}: {device} {previous} -> {state}"
        resources = event.get("resources") or []
        if resources:
            line += "  (" + ", ".join(f"{r['id']}: {r['why']}" for r in resources) + ")"
        self.narrator.say(line)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float) -> float:
        start = time.monotonic()
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=timeout):
                raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        return time.monotonic() - start

    def settled(self, device: str) -> bool:
        """The retained status and the latest drift event agree that it is in sync."""
        mine = [e for e in self.events if e.get("device") == device]
        return (
            device in self.drift
            and self.drift[device].state == "in_sync"
            and bool(mine)
            and mine[-1].get("state") == "in_sync"
        )

    def states(self, devices: list[str]) -> dict[str, str]:
        return {d: self.drift[d].state if d in self.drift else "?" for d in devices}

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


@contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def setpoint_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "setpoint", *args]


def start_controller(
    stack: ExitStack, work: Path, repo: Path, broker_url: str, *flags: str
) -> None:
    """``setpoint controller`` on ``repo`` for the demo's lifetime: the demo's signing key,
    state under ``work``, its log in ``work/logs``; ``flags`` added."""
    stack.enter_context(
        process(
            setpoint_cmd(
                "controller", "--repo", str(repo), "--broker", broker_url,
                "--key", str(work / "keys" / "signing.key"),
                "--state-dir", str(work / "controller-state"), *flags,
            ),
            work / "logs" / "controller.log",
        )
    )  # fmt: skip


def start_shim(stack: ExitStack, work: Path, device: str, broker_url: str, *flags: str) -> Path:
    """``setpoint shim`` for ``device`` for the demo's lifetime, trusting the demo's key,
    its root and state under ``work/devices/<device>``, its log in ``work/logs``; ``flags``
    added. Returns its root."""
    root = work / "devices" / device / "root"
    root.mkdir(parents=True)
    stack.enter_context(
        process(
            setpoint_cmd(
                "shim", "--device", device, "--broker", broker_url,
                "--trust", str(work / "keys" / "signing.pub"), "--root", str(root),
                "--state-dir", str(work / "devices" / device / "state"), "--heartbeat", "60",
                *flags,
            ),
            work / "logs" / f"shim-{device}.log",
        )
    )  # fmt: skip
    return root


def run_cli(*args: str) -> str:
    done = subprocess.run(setpoint_cmd(*args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DemoFailed(f"setpoint {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def commit_file(repo: Path, relpath: str, text: str, message: str) -> str:
    from dulwich import porcelain

    (repo / relpath).write_text(text)
    porcelain.add(str(repo), paths=[str(repo / relpath)])
    sha = porcelain.commit(
        str(repo),
        message=message.encode(),
        author=b"Demo Operator <ops@example.com>",
        committer=b"Demo Operator <ops@example.com>",
    )
    return sha.decode()[:12]


def revert(repo: Path, sha: str) -> str:
    from dulwich import porcelain

    new = porcelain.revert(str(repo), [sha.encode()], author=b"Demo Operator <ops@example.com>")
    return (new or b"").decode()[:12]


def run(args: argparse.Namespace) -> int:
    from setpoint.commands._common import require_controller

    if args.scenario == "rollout":
        from .demo_rollout import run_rollout

        return run_rollout(args)

    require_controller("dulwich")
    color = sys.stdout.isatty() and not args.no_color
    if not 2 <= args.devices <= 50:
        print("setpoint demo: --devices must be from 2 to 50", file=sys.stderr)
        return 2
    narrator = Narrator(color)
    with ExitStack() as stack:
        work = workspace(stack, args.keep)
        try:
            story(
                stack, work, narrator, args.timeout, args.devices, secure=args.secure,
                hold=args.hold,
            )  # fmt: skip
        except DemoFailed as exc:
            tell_failure(narrator, exc, work, keep=bool(args.keep))
            return 1
    return 0


def workspace(stack: ExitStack, keep: Path | None) -> Path:
    """The demo's working directory: ``keep`` (emptied first), or a temporary one."""
    if keep is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="setpoint-demo-")))
    work = keep.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def tell_failure(narrator: Narrator, exc: DemoFailed, work: Path, *, keep: bool) -> None:
    """Say what failed, and show the tail of every process's log unless they are kept."""
    narrator.warn(f"demo failed: {exc}")
    narrator.warn(f"logs are in {work}/logs (pass --keep DIR to keep them)")
    if keep:
        return
    for log in sorted((work / "logs").glob("*.log")):
        print(f"--- {log.name} (tail)", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)


def story(
    stack: ExitStack,
    work: Path,
    narrator: Narrator,
    timeout: float,
    count: int,
    *,
    secure: bool = False,
    hold: bool = False,
) -> None:
    from setpoint.mosquitto import Broker

    prefix = "setpoint/v1"
    logs = work / "logs"
    logs.mkdir()

    narrator.step("A private mosquitto, a signing key and a fleet repository")
    tls = Tls(work / "pki", prefix) if secure else None
    broker = stack.enter_context(tls.broker(work / "broker") if tls else Broker())
    if tls:
        narrator.say(
            f"mosquitto listening on {broker.url}: mutual TLS only, certificates from a"
            f" fresh fleet PKI in {tls.pki.root}, topics limited by mosquitto/secure.acl"
        )
    else:
        narrator.say(f"mosquitto listening on {broker.url} (config from mosquitto/)")
    keyid = run_cli("keys", "generate", "--out", str(work / "keys")).strip().splitlines()[-1]
    narrator.say(f"fleet signing key: {keyid}")
    repo = work / "fleet"
    run_cli("init", str(repo))
    resize_fleet(repo, count)
    groups = sorted(p.stem for p in (repo / "groups").glob("*.yaml"))
    devices = sorted(p.stem for p in (repo / "devices").glob("*.yaml"))
    narrator.say(f"fleet repository {repo}: groups {groups}, devices {devices}")
    seal_secrets(repo, work, devices, narrator)
    if tls:
        tls.issue(devices)
        narrator.say(f"issued a client certificate per device (CN = device id): {devices}")

    narrator.step("Controller and one shim per device")
    watcher = Watcher(broker.host, broker.port, prefix, narrator, tls.operator if tls else None)
    stack.callback(watcher.close)
    start_controller(
        stack, work, repo, broker.url,
        "--grace", "20", "--tick", "0.5", "--reconcile-interval", "5",
        *(tls.flags("controller") if tls else ()),
    )  # fmt: skip
    device_config = work / "device.json"
    device_config.write_text('{"allow_commands": true}\n')
    roots = {}
    for device in devices:
        flags = ("--config", str(device_config), *(tls.flags(device) if tls else ()))
        roots[device] = start_shim(stack, work, device, broker.url, *flags)
    narrator.say(f"started the controller and {len(devices)} shims")
    url = demo_dashboard(stack, broker.url, logs, narrator, tls.flags("operator") if tls else ())
    if url:
        narrator.good(f"dashboard (read-only, operator identity): {url}  <- open it to watch")

    def all_in_sync(version_of: Callable[[str], int | None] | None = None) -> Callable[[], bool]:
        def check() -> bool:
            for device in devices:
                drift = watcher.drift.get(device)
                if drift is None or not watcher.settled(device):
                    return False
                if version_of is not None and drift.applied_version != version_of(device):
                    return False
            return True

        return check

    took = watcher.wait(all_in_sync(), "every device in_sync", timeout)
    narrator.good(f"fleet converged in {took:.2f}s: {watcher.states(devices)}")
    show_sealed(roots, narrator)

    enforce_group, observe_group = "kiosks", "gateways"
    members = {
        g: [d for d in devices if f"group: {g}" in (repo / "devices" / f"{d}.yaml").read_text()]
        for g in groups
    }
    narrator.step(f"A commit changes group {enforce_group!r}")
    before = {d: watcher.drift[d].desired_version for d in devices}
    group_file = repo / "groups" / f"{enforce_group}.yaml"
    text = group_file.read_text()
    marker = "Welcome"
    if marker not in text:
        raise DemoFailed(f"{group_file} has no {marker!r} line to change")
    t_commit = time.monotonic()
    sha = commit_file(
        repo, f"groups/{enforce_group}.yaml", text.replace(marker, "Welcome back", 1),
        "kiosks: friendlier greeting",
    )  # fmt: skip
    narrator.say(f"committed {sha} (groups/{enforce_group}.yaml)")

    def moved() -> bool:
        return all(
            (d in watcher.drift and watcher.settled(d)
             and watcher.drift[d].desired_version != before[d])
            for d in members[enforce_group]
        )  # fmt: skip

    watcher.wait(moved, f"{enforce_group} to converge on the new version", timeout)
    narrator.good(
        f"commit {sha} -> every {enforce_group} device in_sync on the new version in"
        f" {time.monotonic() - t_commit:.2f}s"
    )

    narrator.step("A hand edit on one device of each group")
    victims = {enforce_group: members[enforce_group][0], observe_group: members[observe_group][0]}
    mark = len(watcher.events)
    for group, device in victims.items():
        what = hand_edit(roots[device], group == enforce_group)
        narrator.say(f"on {device} ({group}): {what}")
    t_edit = time.monotonic()

    def drift_event(device: str, previous: str, state: str) -> Callable[[], bool]:
        return lambda: any(
            (e.get("device"), e.get("previous"), e.get("state")) == (device, previous, state)
            for e in watcher.events[mark:]
        )

    enforce_dev, observe_dev = victims[enforce_group], victims[observe_group]
    watcher.wait(
        drift_event(observe_dev, "in_sync", "drifted"), f"a drift event for {observe_dev}", timeout
    )
    narrator.good(
        f"{observe_dev}: drift event {time.monotonic() - t_edit:.2f}s after the edit"
        " (observe mode: reported, left alone)"
    )
    watcher.wait(
        drift_event(enforce_dev, "in_sync", "drifted"), f"a drift event for {enforce_dev}", timeout
    )
    narrator.good(f"{enforce_dev}: drift event {time.monotonic() - t_edit:.2f}s after the edit")
    watcher.wait(drift_event(enforce_dev, "drifted", "in_sync"), f"{enforce_dev} healed", timeout)
    watcher.wait(all_in_sync_one(watcher, enforce_dev), f"{enforce_dev} in_sync", timeout)
    narrator.good(
        f"{enforce_dev}: healed, resolved and in_sync {time.monotonic() - t_edit:.2f}s after"
        " the edit (enforce mode: the device put it back)"
    )
    still = watcher.drift[observe_dev]
    if still.state != "drifted":
        raise DemoFailed(f"{observe_dev} should still be drifted, is {still.state}")
    narrator.say(
        f"{observe_dev} stays drifted: " + ", ".join(f"{r.id} ({r.why})" for r in still.resources)
    )

    narrator.step(f"git revert {sha}: the fleet walks back through the normal path")
    t_revert = time.monotonic()
    new = revert(repo, sha)
    narrator.say(f"committed revert {new}")
    versions = {d: watcher.drift[d].desired_version for d in members[enforce_group]}

    def reverted() -> bool:
        return all(
            d in watcher.drift and watcher.settled(d)
            and watcher.drift[d].desired_version != versions[d]
            for d in members[enforce_group]
        )  # fmt: skip

    watcher.wait(reverted, "convergence after the revert", timeout)
    narrator.good(
        f"revert converged in {time.monotonic() - t_revert:.2f}s:"
        f" {watcher.states(members[enforce_group])}"
    )
    narrator.step(f"The operator's view: setpoint status --broker {broker.url}")
    operator = tls.flags("operator") if tls else ()
    print(run_cli("status", "--broker", broker.url, "--no-color", *operator).rstrip(), flush=True)
    narrator.step(f"setpoint diff {observe_dev}: desired against reported, per resource")
    done = subprocess.run(
        setpoint_cmd("diff", observe_dev, "--broker", broker.url, "--no-color",
                     "--trust", str(work / "keys" / "signing.pub"),
                     # diff reads bundles and reports: the controller's rights, not the operator's
                     *(tls.flags("controller") if tls else ())),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 1:
        raise DemoFailed(f"setpoint diff {observe_dev} should report a difference: {done.stderr}")
    print(done.stdout.rstrip(), flush=True)

    narrator.step("Done")
    narrator.say(f"final drift states: {watcher.states(devices)}")
    watcher.close()
    if hold:
        narrator.say(f"holding: the fleet and {url or 'no dashboard'} keep running; Ctrl-C stops")
        with suppress(KeyboardInterrupt):
            threading.Event().wait()
    narrator.say("stopping every process the demo started")


def start_dashboard(
    stack: ExitStack, log: Path, broker_url: str, *args: str, timeout: float = 60.0
) -> str:
    """Start ``setpoint dashboard`` on a free loopback port; return the URL it prints."""
    proc = stack.enter_context(
        process(
            setpoint_cmd(
                "dashboard", "--broker", broker_url, "--listen", "127.0.0.1:0", *args
            ),
            log,
        )
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"setpoint dashboard: (https?://\S+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise DemoFailed(f"the dashboard did not start:\n{log.read_text(errors='replace')}")


def demo_dashboard(
    stack: ExitStack, broker_url: str, logs: Path, narrator: Narrator, tls: tuple[str, ...]
) -> str | None:
    """The dashboard for the demo, or None (said) when its extra is not installed."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("aiohttp", "jinja2")):
        narrator.warn("no dashboard: pip install 'setpoint[dashboard]' to watch in a browser")
        return None
    return start_dashboard(stack, logs / "dashboard.log", broker_url, *tls)


class Tls:
    """The secure variant: a fleet PKI, the secure broker, and each process's TLS flags."""

    def __init__(self, root: Path, prefix: str) -> None:
        from setpoint.controller import pki

        self.pki = pki.secure_fleet(root)
        self.prefix = prefix

    def broker(self, directory: Path) -> Any:
        from setpoint.mosquitto import SecureBroker

        return SecureBroker(directory, self.pki.root, prefix=self.prefix)

    def issue(self, devices: list[str]) -> None:
        from setpoint.controller import pki

        pki.secure_fleet(self.pki.root, devices)

    def _credentials(self, who: str) -> Any:
        if who == "controller":
            return self.pki.controller
        if who == "operator":
            return self.pki.operator
        return self.pki.device(who)

    @property
    def operator(self) -> tuple[Path, Path, Path]:
        creds = self.pki.operator
        return creds.ca, creds.cert, creds.key

    def flags(self, who: str) -> tuple[str, ...]:
        creds = self._credentials(who)
        return ("--ca", str(creds.ca), "--cert", str(creds.cert), "--client-key", str(creds.key))


def all_in_sync_one(watcher: Watcher, device: str) -> Callable[[], bool]:
    return lambda: device in watcher.drift and watcher.drift[device].state == "in_sync"


def hand_edit(root: Path, kiosk: bool) -> str:
    """What an operator with a shell on the device might do: change a managed thing."""
    if kiosk:
        motd = root / "etc" / "motd"
        with motd.open("a") as fh:
            fh.write("# edited by hand\n")
        return "appended a line to etc/motd"
    settings = root / ".setpoint" / "settings.json"
    values = json.loads(settings.read_text())
    values["uplink_interval_s"] = 5
    settings.write_text(json.dumps(values))
    return "set uplink_interval_s to 5 in the settings file (the fleet says 30)"


def seal_secrets(repo: Path, work: Path, devices: list[str], narrator: Narrator) -> None:
    """Each device makes its age identity; one secret per group is sealed to its devices."""
    from dulwich import porcelain

    from setpoint.controller import examples

    for device in devices:
        state = work / "devices" / device / "state"
        recipient = run_cli("shim", "keygen", "--state-dir", str(state)).strip()
        with (repo / "devices" / f"{device}.yaml").open("a") as fh:
            fh.write(f"recipient: {recipient}\n")
    (work / "secrets").mkdir(mode=0o700)
    for group, spec in sorted(examples.SEALED.items()):
        plaintext = work / "secrets" / f"{group}.txt"
        plaintext.write_text(f"demo-{group}-secret\n")
        kind = ("--key", spec["key"]) if "key" in spec else ("--path", spec["path"])
        run_cli("secrets", "seal", "--group", group, "--repo", str(repo), "--write",
                "--resource", spec["resource"], *kind, "--from-file", str(plaintext))  # fmt: skip
    porcelain.add(str(repo), paths=[str(p) for p in sorted(repo.glob("*/*.yaml"))])
    porcelain.commit(
        str(repo),
        message=b"demo: device recipients, one sealed secret per group",
        author=b"Demo Operator <ops@example.com>",
        committer=b"Demo Operator <ops@example.com>",
    )
    narrator.say(
        f"each device made its age identity; sealed {sorted(examples.SEALED)} for their"
        " devices (git and the controller hold only ciphertext)"
    )


def show_sealed(roots: dict[str, Path], narrator: Narrator) -> None:
    """The kiosks' sealed file, decrypted on each kiosk and nowhere else."""
    from setpoint.controller import examples

    rel = examples.SEALED["kiosks"]["path"]
    for device, root in sorted(roots.items()):
        if device.startswith("kiosk-"):
            path = root / rel
            if not path.exists() or path.stat().st_mode & 0o777 != 0o600:
                raise DemoFailed(f"{device}: the sealed file {rel} is not there with mode 0600")
            narrator.say(f"{device}: {rel} (0600) decrypted on the device, from the ciphertext")


def resize_fleet(repo: Path, count: int) -> None:
    """Make the example fleet ``count`` devices: remove or add kiosks and gateways."""
    from dulwich import porcelain

    devices = repo / "devices"
    names = sorted(p.stem for p in devices.glob("*.yaml"))
    if count == len(names):
        return
    if count < len(names):
        kiosks = [n for n in names if n.startswith("kiosk-")]
        for name in kiosks[1:][::-1][: len(names) - count]:  # keep kiosk-01 and gw-01
            porcelain.remove(str(repo), paths=[str(devices / f"{name}.yaml")])
    else:
        taken = set(names)
        for n in range(len(names), count):
            group, stem = ("gateways", "gw") if n % 2 else ("kiosks", "kiosk")
            number = next(i for i in range(1, 100) if f"{stem}-{i:02d}" not in taken)
            taken.add(f"{stem}-{number:02d}")
            path = devices / f"{stem}-{number:02d}.yaml"
            path.write_text(f"group: {group}\nvars:\n  site: site-{number}\n")
            porcelain.add(str(repo), paths=[str(path)])
    porcelain.commit(
        str(repo),
        message=f"demo: {count} devices".encode(),
        author=b"Demo Operator <ops@example.com>",
        committer=b"Demo Operator <ops@example.com>",
    )
