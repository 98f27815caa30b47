"""The layers cannot leak: what the shim and the protocol actually import, measured.

import-linter checks the import statements; this test imports the real packages in a
fresh interpreter and lists ``sys.modules``, so a dependency pulled in indirectly (or at
import time by a third-party package) is caught too. Every submodule is imported, so the
check stays true as the shim grows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# What a device installs (README, proto/SPEC.md): paho-mqtt, msgpack, cryptography,
# inotify-simple (on Linux), and their own dependencies (cryptography's cffi backend).
SHIM_ALLOWED = {
    "setpoint", "paho", "msgpack", "cryptography", "inotify_simple", "cffi", "_cffi_backend"
}  # fmt: skip
PROTO_ALLOWED = {"setpoint", "msgpack", "cryptography", "cffi", "_cffi_backend"}
# paho imports dnspython (and its idna) by itself whenever it is installed, for a
# connect_srv setpoint does not use; the controller and dashboard extras install it.
# `setpoint shim` stops that import unless --broker names an mqtt+srv:// domain
# (hide_dnspython_from_paho; tests/e2e/test_shim_cli.py), and setpoint's own code imports
# it only to resolve such a name (setpoint.kit.brokers).
PAHO_OPTIONAL = {"dns", "idna"}
CONTROLLER_ONLY = {
    "aiomqtt", "gmqtt", "pydantic", "pydantic_core", "dulwich", "yaml", "prometheus_client"
}  # fmt: skip

_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    if {hide_dns!r}:
        sys.modules["dns"] = None  # what `setpoint shim` does without a +srv URL
    before = set(sys.modules)
    imported = []
    for name in {packages!r}:
        package = importlib.import_module(name)
        imported.append(name)
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            if info.name.endswith(".__main__"):
                continue  # importing it would run the program
            importlib.import_module(info.name)
            imported.append(info.name)
    new = {{}}
    for name in set(sys.modules) - before:
        top = sys.modules.get(name.split(".")[0])
        where = getattr(top, "__file__", None) or list(getattr(top, "__path__", []) or [None])[0]
        new[name.split(".")[0]] = where
    ours = sorted(m for m in sys.modules if m.startswith("setpoint."))
    print(json.dumps({{"imported": imported, "new": new, "ours": ours}}))
    """
)


def probe(*packages: str, hide_dns: bool = False) -> tuple[list[str], set[str], list[str]]:
    """Import ``packages`` and all their submodules in a fresh interpreter.

    Returns the modules imported on purpose, every ``setpoint.*`` module loaded, and the
    top-level names of every module
    that appeared in ``sys.modules`` meanwhile and lives in a file. Modules with no file
    at all are made in memory by an extension that is already counted (msgpack's Cython
    runtime ``_cython_3_x``/``cython_runtime``, cryptography's ``_openssl``): nothing
    installs them, so they are not dependencies.
    """
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(packages=list(packages), hide_dns=hide_dns)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    top_level = {name for name, where in found["new"].items() if where}
    return found["imported"], top_level, found["ours"]


def outside(top_level: set[str], allowed: set[str]) -> set[str]:
    return {n for n in top_level if n not in sys.stdlib_module_names and n not in allowed}


def test_shim_imports_only_its_three_dependencies() -> None:
    # With dnspython out of paho's reach, as in `setpoint shim` without a +srv URL: an
    # eager `import dns` of setpoint's own would fail the probe here.
    imported, top_level, _ours = probe("setpoint.device_shim", "setpoint.proto", hide_dns=True)
    assert "setpoint.device_shim" in imported
    assert "setpoint.proto.envelopes" in imported  # the walk did reach the submodules
    assert not outside(top_level, SHIM_ALLOWED)
    assert not top_level & CONTROLLER_ONLY


def test_shim_does_not_import_the_controller_or_the_command() -> None:
    _imported, _top_level, ours = probe("setpoint.device_shim")
    for layer in ("setpoint.controller", "setpoint.cli", "setpoint.commands"):
        assert not [m for m in ours if m == layer or m.startswith(layer + ".")]


def test_proto_imports_no_mqtt_git_or_controller_library() -> None:
    imported, top_level, ours = probe("setpoint.proto")
    assert "setpoint.proto.trust" in imported
    assert not outside(top_level, PROTO_ALLOWED)
    assert not top_level & ({"paho"} | CONTROLLER_ONLY)
    assert all(m.startswith("setpoint.proto") for m in ours)


def test_the_checker_would_notice_a_leak() -> None:
    # The probe must be able to see a forbidden import, or the tests above prove nothing.
    _imported, top_level, _ours = probe("setpoint.proto", "yaml", "paho")
    assert {"yaml", "paho"} <= outside(top_level, PROTO_ALLOWED)


def test_dashboard_sits_on_proto_alone() -> None:
    imported, top_level, ours = probe("setpoint.dashboard")
    assert "setpoint.dashboard.serving" in imported
    assert not top_level & {"dulwich", "pydantic", "yaml", "prometheus_client"}
    for layer in ("setpoint.controller", "setpoint.device_shim", "setpoint.commands"):
        assert not [m for m in ours if m == layer or m.startswith(layer + ".")], layer


def test_the_conformance_kit_judges_from_outside() -> None:
    # It runs where only the device's dependencies are installed, and never imports the
    # controller or the shim: it must judge any agent, ours included, over MQTT alone.
    imported, top_level, ours = probe("setpoint.conformance")
    assert "setpoint.conformance.running" in imported
    assert not outside(top_level, SHIM_ALLOWED | PAHO_OPTIONAL)
    for layer in ("setpoint.controller", "setpoint.device_shim", "setpoint.commands"):
        assert not [m for m in ours if m == layer or m.startswith(layer + ".")]


def test_the_controllers_decisions_load_no_io_library() -> None:
    # What import-linter's contract says about the import statements, measured: the pure
    # modules (and ``setpoint.controller`` itself, which imports nothing eagerly) load no
    # MQTT, git, HTTP server, metrics or event loop.
    code = (
        "import sys, json\n"
        "import setpoint.controller.rendering, setpoint.controller.planning\n"
        "import setpoint.controller.detecting, setpoint.controller.gating\n"
        "import setpoint.controller.rollouts, setpoint.controller.leadership\n"
        "import setpoint.controller.sharding, setpoint.controller.resending\n"
        "import setpoint.controller.rereading\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "setpoint" in loaded and "pydantic" in loaded  # it did load the fleet's models
    assert not loaded & {"aiomqtt", "paho", "gmqtt", "dulwich", "asyncio", "prometheus_client"}


def test_the_transport_is_io_below_the_sides() -> None:
    # setpoint.transport is what the controller and the simulator speak MQTT with: it
    # loads gmqtt and the kit, and nothing of the controller, the simulator or the shim.
    imported, top_level, ours = probe("setpoint.transport")
    assert "setpoint.transport.client" in imported and "gmqtt" in top_level
    assert not top_level & {"aiomqtt", "paho", "dulwich", "pydantic", "yaml"}
    for layer in ("setpoint.controller", "setpoint.sim", "setpoint.device_shim",
                  "setpoint.commands", "setpoint.proto"):  # fmt: skip
        assert not [m for m in ours if m == layer or m.startswith(layer + ".")], layer
