"""Start a private 3-node NATS cluster (JetStream + MQTT) on free loopback ports.

Tests and benchmarks use this to run setpoint on a clustered engine; it never touches a
NATS the machine happens to run (that one listens on 4222; every port here is picked
free by the kernel). ``NatsCluster`` is a context manager::

    with NatsCluster(tmp / "nats") as cluster:
        cluster.urls            # ['mqtt://127.0.0.1:P1', ...], one per node
        cluster.broker_list     # the same, comma-separated, for --broker
        cluster.nodes[0].kill() # SIGKILL one node, as a power cut would
        cluster.nodes[0].start()
        cluster.wait_ready()    # every node serves MQTT again

``python -m setpoint.engines.cluster`` runs one in the foreground and prints its URLs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.mosquitto.broker import (
    config_template,
    end_process,
    find_program,
    free_port,
    render,
    stop_on_signals,
)

INSTALL_HINT = (
    "nats-server is not installed. Install it with:\n"
    "    sudo apt-get install -y nats-server\n"
    "or point SETPOINT_NATS_SERVER at the binary."
)
HOST = "127.0.0.1"


class EngineError(RuntimeError):
    """The private engine could not be started or stopped."""


class EngineNotInstalled(EngineError):
    """No ``nats-server`` binary on this machine; the message says how to install it."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def find_nats_server() -> str:
    """The path of ``nats-server`` (``$SETPOINT_NATS_SERVER`` wins), or raise."""
    return str(find_program("nats-server", "SETPOINT_NATS_SERVER", EngineNotInstalled, EngineError))


class NatsNode:
    """One ``nats-server`` process of a cluster: its ports, store directory and lifecycle."""

    def __init__(self, name: str, directory: Path, binary: str) -> None:
        self.name = name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.client_port = free_port(HOST)
        self.cluster_port = free_port(HOST)
        self.mqtt_port = free_port(HOST)
        self.http_port = free_port(HOST)
        self.conf = self.dir / "nats.conf"
        self.log = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    @property
    def route(self) -> str:
        return f"nats-route://{HOST}:{self.cluster_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def configure(self, peers: list[NatsNode], template: str = "nats-cluster.conf") -> None:
        routes = ", ".join(f'"{peer.route}"' for peer in peers if peer is not self)
        values = {
            "NAME": self.name,
            "CLIENT_PORT": self.client_port,
            "CLUSTER_PORT": self.cluster_port,
            "MQTT_PORT": self.mqtt_port,
            "HTTP_PORT": self.http_port,
            "DATADIR": self.dir,
            "ROUTES": routes,
        }
        text = render(config_template_of(template), values)
        self.conf.write_text(text, encoding="utf-8")

    def start(self) -> NatsNode:
        """Start the process (returns at once; the cluster waits for readiness)."""
        if self.running:
            return self
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: nothing flushed, as on a crash or a power cut."""
        end_process(self.proc, hard=True)
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        end_process(self.proc, timeout=timeout, hard=False)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the node holds its sockets but answers nothing (a network split, seen
        from its peers and clients)."""
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def healthy(self) -> bool:
        """The node's monitoring endpoint says JetStream is current (``/healthz``)."""
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.http_port}/healthz", timeout=1.0
            ) as response:
                body = json.loads(response.read() or b"{}")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return bool(body.get("status") == "ok")

    def serves_mqtt(self, timeout: float = 3.0) -> bool:
        """One MQTT 3.1.1 CONNECT gets CONNACK 0 (JetStream has the MQTT streams ready)."""
        done = threading.Event()
        result: list[int] = []

        def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
            result.append(int(getattr(rc, "value", rc)))  # type: ignore[call-overload]
            done.set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"setpoint-probe-{os.getpid()}-{self.mqtt_port}",
            protocol=mqtt.MQTTv311,
        )
        client.on_connect = on_connect
        try:
            client.connect(HOST, self.mqtt_port, keepalive=10)
        except OSError:
            return False
        client.loop_start()
        try:
            return done.wait(timeout) and result == [0]
        finally:
            client.disconnect()
            client.loop_stop()

    def tail_log(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsNode {self.name} {self.url} {state}>"


def config_template_of(name: str) -> str:
    return str(config_template(name, package=__package__ or "setpoint.engines"))


class NatsCluster:
    """Three ``nats-server`` nodes routed to each other, JetStream and MQTT on each."""

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        size: int = 3,
        startup_timeout: float = 60.0,
        template: str = "nats-cluster.conf",
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="setpoint-nats-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        binary = find_nats_server()
        self.nodes = [NatsNode(f"n{i + 1}", self.dir / f"n{i + 1}", binary) for i in range(size)]
        for node in self.nodes:
            node.configure(self.nodes, template)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def broker_list(self) -> str:
        """Every node's URL, comma-separated, as ``--broker`` takes them."""
        return ",".join(self.urls)

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Return once every running node is healthy and answers an MQTT CONNECT."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        pending = [node for node in self.nodes if node.running]
        while pending:
            for node in list(pending):
                if node.proc is not None and node.proc.poll() is not None:
                    raise EngineError(f"nats-server {node.name} exited at start: {node.tail_log()}")
                if node.healthy() and node.serves_mqtt():
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.tail_log()}" for n in pending)
                raise EngineError(
                    f"NATS nodes {[n.name for n in pending]} not ready within "
                    f"{timeout or self.startup_timeout:.0f}s:\n{logs}"
                )
            if pending:
                time.sleep(0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.resume()
            node.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NatsCluster {self.broker_list} dir={self.dir}>"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m setpoint.engines.cluster",
        description="Run a private 3-node NATS cluster (JetStream + MQTT) on loopback until"
        " Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--dir", type=Path, default=None, help="data directory (default: temp)")
    args = parser.parse_args(argv)
    stop = stop_on_signals()
    try:
        cluster = NatsCluster(args.dir).start()
    except EngineError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        print(cluster.broker_list, flush=True)
        while all(node.running for node in cluster.nodes) and not stop.wait(0.5):
            pass
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
