"""``setpoint controller``: git commits in, signed retained bundles out.

    setpoint controller --repo PATH_OR_URL --broker mqtt://host:port --key signing.key

Runs until SIGTERM or Ctrl-C (clean shutdown), or, with ``--once``, until everything the
repository wants is retained on the broker, then exits (0: done, 1: the repository has
errors, 2: could not get there in ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from setpoint.kit.brokers import discovery_of
from setpoint.proto.topics import Topics

from ._common import CommandError, add_broker_arguments, brokers_from_args, require_controller
from .history import explicit_state_dir, state_base

log = logging.getLogger("setpoint.controller")


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:8780")
    if not host.strip("[]"):
        # An empty host would mean every interface; say it, do not assume it.
        raise argparse.ArgumentTypeError(
            f"{value!r}: name the address to listen on: 127.0.0.1:{port} (this machine only)"
            f" or 0.0.0.0:{port} (every interface)"
        )
    return host.strip("[]"), int(port)


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < 1e9:
        raise argparse.ArgumentTypeError(f"{value!r}: use a positive number of seconds")
    return number


def _slow_ack(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < 1e9:  # NaN too
        raise argparse.ArgumentTypeError(
            f"{value!r}: use a number of seconds, e.g. 3 (0: never read again)"
        )
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo",
        required=True,
        help="fleet repository: a local path, or a URL (file, http(s), ssh, git)",
    )
    add_broker_arguments(parser)
    parser.add_argument(
        "--key",
        required=True,
        type=Path,
        action="append",
        help="the fleet's signing key (PEM Ed25519, mode 0600); repeat to sign with old"
        " and new key during a key rotation (docs/security.md)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="versions, bundles, audit log, mirror: one fleet's (env SETPOINT_STATE_DIR;"
        " default ~/.local/state/setpoint/controller/<repository>-<hash of repository,"
        " broker and prefix>)",
    )
    parser.add_argument("--branch", help="the default branch (default: the branch HEAD names)")
    parser.add_argument(
        "--config-branch",
        help="the protected branch whose fleet.yaml gives rings, gates and operator keys"
        " (default: the most protected ring, chosen once and remembered; docs/security.md)",
    )
    parser.add_argument(
        "--bundle-ttl",
        default=None,
        help="bundle lifetime, e.g. 7d or 3600 (fleet.yaml's bundle_ttl wins;"
        " default 7d); bundles are re-signed at half-life",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="seconds between fetches of a remote (default 60), or polls of a"
        " local repository when given",
    )
    parser.add_argument(
        "--no-watch", action="store_true", help="do not watch a local repository with inotify"
    )
    parser.add_argument(
        "--webhook-listen",
        type=_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve the push webhook (POST, HMAC-SHA256) on HOST:PORT",
    )
    parser.add_argument(
        "--webhook-secret-file",
        type=Path,
        default=None,
        help="file holding the webhook secret (or env SETPOINT_WEBHOOK_SECRET)",
    )
    parser.add_argument(
        "--client-id",
        default=None,
        help="MQTT client id (default: random; a fixed one can be taken over by any client"
        " that knows it, which disconnects the controller: docs/security.md)",
    )
    parser.add_argument(
        "--slow-ack",
        type=_slow_ack,
        default=None,
        metavar="SECONDS",
        help="a bundle the broker acknowledges slower than this may not have been stored (a"
        " clustered engine electing a leader: docs/scale-out.md); once the broker answers"
        " promptly again, the controller reads its retained bundles afresh and publishes"
        " again what the broker holds older (default 3: under NATS's 4 s JetStream"
        " timeout; under 10; 0: never)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="publish what the repository wants (and its rollout gates allow), then exit",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="with --once: give up after this many seconds (default 60)",
    )
    replicas = parser.add_argument_group("replicas (docs/scale-out.md)")
    replicas.add_argument(
        "--lease",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="run as one of several replicas of this fleet's controller: only the one holding"
        " the lead (a signed, retained record renewed every third of SECONDS) publishes"
        " bundles and group statuses; the others take over when it has not renewed for"
        " SECONDS (e.g. 6). The replicas split the 16 report shards: each decides and"
        " publishes the drift of its shards' devices (docs/scale-out.md)",
    )
    replicas.add_argument(
        "--replica-id",
        default=None,
        help="this replica's name in the leader record (default: host name and process id)",
    )
    drift = parser.add_argument_group("drift engine (docs/drift.md)")
    drift.add_argument(
        "--no-drift", action="store_true", help="do not run the drift engine (bundles only)"
    )
    drift.add_argument(
        "--grace",
        type=_seconds,
        default=300.0,
        help="seconds a device may take to apply a new version before it is overdue (default 300)",
    )
    drift.add_argument(
        "--silent-after",
        type=_seconds,
        default=2700.0,
        help="seconds without a report after which a device is offline even if no will came"
        " (a broker node that dies loses its clients' wills; default 2700: three of the"
        " reference shim's heartbeats; 0: trust presence alone)",
    )
    drift.add_argument(
        "--tick",
        type=_seconds,
        default=1.0,
        help="seconds between checks for overdue devices and reconcile retries (default 1)",
    )
    drift.add_argument(
        "--reconcile-interval",
        type=_seconds,
        default=30.0,
        help="at most one reconcile command per drifted enforce-mode device per this many"
        " seconds (default 30)",
    )
    drift.add_argument(
        "--resend-after",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="publish again, unchanged and retained, the bundle a device that keeps reporting"
        " stays pending on this many seconds after it was published (an engine may have lost"
        " it: docs/scale-out.md); at most once per target per backoff of 60 s doubling to"
        " 15 min; must be under --grace (default: 60, or half of --grace if that is less)",
    )
    drift.add_argument(
        "--share",
        metavar="NAME",
        default=None,
        help="take live reports through the MQTT 5 shared subscription $share/NAME/...,"
        " so several controllers split the stream",
    )
    drift.add_argument(
        "--metrics-listen",
        type=_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def _config(args: argparse.Namespace) -> object:
    service = require_controller("setpoint.controller.service")
    broker_mod = require_controller("setpoint.controller.broker")
    fleet = require_controller("setpoint.controller.fleet")
    # Several nodes (comma-separated, or a +srv name's): tried in turn (controller.broker).
    url, *others = brokers_from_args(args)
    if args.lease is not None and args.once:
        raise CommandError("--lease runs a replica until stopped; it cannot be used with --once")
    if args.lease is not None and args.share is not None:
        raise CommandError(
            "--share and --lease do not mix: replicas split the reports by shard"
            " (docs/scale-out.md); drop --share"
        )
    if args.lease is not None and args.lease < 1:
        raise CommandError("--lease: a lease shorter than 1s would expire between renewals")
    if args.resend_after is None:
        # The controller's default, or half of --grace when that is shorter: a device must
        # not be overdue before its lost bundle is sent again.
        resending = require_controller("setpoint.controller.resending")
        args.resend_after = min(resending.DEFAULT_RESEND_AFTER, args.grace / 2)
    elif not args.no_drift and args.resend_after >= args.grace:
        raise CommandError(
            f"--resend-after {args.resend_after:g} is not under --grace {args.grace:g}: a"
            " device would be overdue before its lost bundle is sent again; use a smaller"
            " --resend-after (by default 60, or half of --grace if that is less) or a larger"
            " --grace"
        )
    if args.slow_ack is None:
        args.slow_ack = require_controller("setpoint.controller.rereading").DEFAULT_SLOW_ACK
    elif args.slow_ack >= service.DEFAULT_PUBLISH_TIMEOUT:
        raise CommandError(
            f"--slow-ack {args.slow_ack:g} is not under {service.DEFAULT_PUBLISH_TIMEOUT:g}s,"
            " the time the controller waits for any acknowledgement (a slower one fails the"
            " publication, and it is tried again after a reconnect); use a smaller"
            " --slow-ack (default 3), or 0 to never read the retained bundles again"
        )
    ttl = fleet.DEFAULT_BUNDLE_TTL
    if args.bundle_ttl is not None:
        try:
            ttl = fleet.parse_duration(
                int(args.bundle_ttl) if args.bundle_ttl.isdigit() else args.bundle_ttl
            )
        except ValueError as exc:
            raise CommandError(f"--bundle-ttl: {exc}") from None
    secret = None
    if args.webhook_listen is not None:
        if args.webhook_secret_file is not None:
            try:
                secret = args.webhook_secret_file.read_bytes().strip()
            except OSError as exc:
                raise CommandError(f"--webhook-secret-file: {exc.strerror}") from None
        elif os.environ.get("SETPOINT_WEBHOOK_SECRET"):
            secret = os.environ["SETPOINT_WEBHOOK_SECRET"].encode("utf-8")
        if not secret:
            raise CommandError(
                "--webhook-listen needs a secret: pass --webhook-secret-file"
                " or set SETPOINT_WEBHOOK_SECRET"
            )
    config = service.ControllerConfig(
        repo=args.repo,
        broker=broker_mod.BrokerSettings(
            host=url.host,
            port=url.port,
            tls=url.tls,
            username=url.username,
            password=url.password,
            ca=args.ca,
            cert=args.cert,
            key=args.client_key,
            client_id=args.client_id or "",
            others=tuple((u.host, u.port) for u in others),
            discovery=discovery_of(args.broker),
        ),
        key_path=args.key[0],
        extra_key_paths=tuple(args.key[1:]),
        state_dir=args.state_dir or explicit_state_dir() or Path(),
        prefix=args.prefix,
        branch=args.branch,
        config_branch=args.config_branch,
        bundle_ttl=ttl,
        follow=not args.once,
        watch=not args.no_watch,
        poll_interval=args.poll_interval,
        webhook_listen=args.webhook_listen,
        webhook_secret=secret,
        slow_ack=args.slow_ack or None,
    )
    if config.state_dir == Path():
        # One directory per fleet, so two fleets on one host never share versions or history.
        state = require_controller("setpoint.controller.state")
        fleet_dir = state.default_dir(state_base(), service.identity(config))
        if args.lease is not None:  # and one per replica: each holds its state dir's lock
            fleet_dir = fleet_dir.with_name(f"{fleet_dir.name}-replica-{_replica_id(args)}")
        config = dataclasses.replace(config, state_dir=fleet_dir)
    return config


def _replica_id(args: argparse.Namespace) -> str:
    """``--replica-id``, checked, or one made of the host name and the process id."""
    from setpoint.proto.errors import InvalidId
    from setpoint.proto.topics import validate_id

    if args.replica_id is None:
        host = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-_")
        args.replica_id = f"{host[:48] or 'controller'}-{os.getpid()}"
    try:
        return validate_id(args.replica_id, "--replica-id")
    except InvalidId as exc:
        raise CommandError(str(exc)) from None


def _drift(args: argparse.Namespace) -> object | None:
    """The drift engine's settings, or None without one (--no-drift, --once). Rollouts
    (gates, windows, batches) are part of every controller, --once included."""
    if args.no_drift or args.once:
        return None
    drifting = require_controller("setpoint.controller.drifting")
    if args.share is not None:
        from setpoint.proto.errors import InvalidId
        from setpoint.proto.topics import validate_id

        try:
            validate_id(args.share, "--share name")
        except InvalidId as exc:
            raise CommandError(str(exc)) from None
    return drifting.DriftSettings(
        grace=args.grace,
        silent_after=args.silent_after or None,
        tick=args.tick,
        share=args.share,
        reconcile_interval=args.reconcile_interval,
        resend_after=args.resend_after,
        metrics_listen=args.metrics_listen,
    )


async def _main(args: argparse.Namespace, config: object) -> int:
    service = require_controller("setpoint.controller.service")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("starting: %s", service.describe(config))
    if args.lease is not None:
        return await _replica(args, config, stop)
    async with service.Controller(config, drift=_drift(args)) as controller:
        if args.once:
            settling = asyncio.ensure_future(controller.settle())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait(
                    {settling, stopping}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (settling, stopping):
                    task.cancel()
                await asyncio.gather(settling, stopping, return_exceptions=True)
            if settling not in done:
                reason = controller.last_error or "broker or repository not reachable"
                print(
                    f"setpoint controller: not done after {args.timeout:g}s: {reason}",
                    file=sys.stderr,
                )
                return 2
            return _verdict(controller)
        await stop.wait()
        log.info("stopping")
    return 0


async def _replica(args: argparse.Namespace, config: Any, stop: asyncio.Event) -> int:
    """Run as a replica: the controller runs only while this replica holds the lead."""
    replica_mod = require_controller("setpoint.controller.replica")
    service = require_controller("setpoint.controller.service")
    signing = require_controller("setpoint.controller.signing")
    drift = _drift(args)
    signer = signing.load_signer(config.key_path, *config.extra_key_paths)
    owner = None
    if drift is not None:
        # Replicas split the report shards (docs/decisions/0009-report-shards.md): every
        # replica decides the drift of the shards it owns; the leader summarises the groups
        # from the statuses, and takes no reports itself.
        owning = require_controller("setpoint.controller.owning")
        owner = owning.ShardOwner(
            config.broker,
            Topics(config.prefix),
            signer,
            drift,
            config.state_dir,
            publish_timeout=config.publish_timeout,
            backoff=config.backoff,
        )
        drift = dataclasses.replace(drift, shards=frozenset(), metrics_listen=None)

    async def lead() -> None:
        metrics = owner.metrics if owner is not None else None  # served by the owner
        async with service.Controller(config, drift=drift, metrics=metrics):
            await asyncio.Event().wait()  # until the lease says to step down

    replica = replica_mod.Replica(
        config.broker,
        Topics(config.prefix),
        signer,
        replica_mod.ReplicaSettings(_replica_id(args), args.lease),
        lead,
        owner=owner,
    )
    running = asyncio.ensure_future(replica.run())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (running, stopping):
            task.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await running
    log.info("stopping")
    return 0


def _verdict(controller: object) -> int:
    """``--once``'s exit status: 1, with a summary per refused branch, if any was refused."""
    verdicts = controller.repository_status()  # type: ignore[attr-defined]
    refused = verdicts.refused if verdicts is not None else ()
    for branch in refused:
        print(
            f"setpoint controller: {branch.branch}@{branch.head[:12]} refused"
            f" ({len(branch.problems)} problem(s), first: {branch.problems[0]}); fix it and"
            " commit (check locally with `setpoint validate`)",
            file=sys.stderr,
        )
    return 1 if refused else 0


def run(args: argparse.Namespace) -> int:
    logs = require_controller("setpoint.controller.logs")
    errors = require_controller("setpoint.controller.errors")
    logs.setup(json_lines=args.log_json, level=args.log_level)
    # Everything the controller writes (state, audit, the mirror's objects) is its own.
    os.umask(0o077)
    try:
        config = _config(args)
        return asyncio.run(_main(args, config))
    except (CommandError, errors.ConfigError) as exc:
        print(f"setpoint controller: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # raised by a task of the running controller
        config_errors = group.subgroup(errors.ConfigError)
        if config_errors is None:
            raise
        first: BaseException = config_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"setpoint controller: {first}", file=sys.stderr)
        return 2
