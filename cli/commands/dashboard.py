"""``setpoint dashboard``: the read-only web dashboard (``setpoint.dashboard``).

    setpoint dashboard --broker mqtt://127.0.0.1:1883 [--listen 127.0.0.1:8080]
        [--token-file FILE] [--tls-cert F --tls-key F [--tls-client-ca F]]
        [--commit-url 'https://git.example/fleet/commit/{commit}'] [--trust signing.pub]

Connects with the operator's identity (the usual broker flags: ``--ca``/``--cert``/
``--client-key`` of the operator certificate on a secure broker; never the controller's),
subscribes, and serves the pages until SIGTERM or Ctrl-C. It listens on loopback unless
told otherwise, and refuses a non-loopback address without a token or mutual TLS. Prints
``setpoint dashboard: http://HOST:PORT/`` once it listens. The dashboard package is
imported only when this verb runs; it needs the extra ``setpoint[dashboard]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from setpoint.kit.brokers import discovery_of

from ._common import (
    CommandError,
    add_broker_arguments,
    add_trust_argument,
    brokers_from_args,
    load_trust,
)
from ._fleetview import add_protocol_argument

DASHBOARD_EXTRA_HINT = "this verb needs pip install 'setpoint[dashboard]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    add_protocol_argument(parser)
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        help="HOST:PORT to serve on (default 127.0.0.1:8080; port 0 picks a free one)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="require this token (Authorization: Bearer, or the login form); needed off loopback",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require browser certificates from this CA (mutual TLS)"
    )
    parser.add_argument(
        "--commit-url",
        help="link commits: a URL with {commit}, e.g. https://git.example/fleet/commit/{commit}",
    )
    add_trust_argument(
        parser, "verify bundles on the device page with this public key (repeatable)"
    )
    parser.add_argument(
        "--refresh", type=int, default=5, help="seconds between refreshes with JavaScript off"
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except CommandError as exc:
        print(f"setpoint dashboard: {exc}", file=sys.stderr)
        return 2
    import logging

    from setpoint.dashboard import serve

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def ready(url: str) -> None:
        print(f"setpoint dashboard: {url} (read-only; broker {args.broker})", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, ready, stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"setpoint dashboard: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_tls(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the TLS files once here, so a bad one is named before anything starts."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"--tls-cert {cert} / --tls-key {key}: {exc}") from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(f"--tls-client-ca {client_ca}: {exc}") from None


def _settings(args: argparse.Namespace) -> object:
    try:
        from setpoint import dashboard
        from setpoint.proto.errors import ProtocolError
    except ModuleNotFoundError as exc:
        raise CommandError(f"{DASHBOARD_EXTRA_HINT} (missing: {exc.name})") from None
    urls = brokers_from_args(args)
    url = urls[0]
    try:
        from setpoint.proto.topics import validate_prefix

        validate_prefix(args.prefix)
    except ProtocolError as exc:
        raise CommandError(f"--prefix: {exc}") from None
    try:
        listen = dashboard.access.parse_listen(args.listen)
        token = dashboard.access.read_token(args.token_file) if args.token_file else None
        if bool(args.tls_cert) != bool(args.tls_key):
            raise CommandError("--tls-cert and --tls-key go together: pass both, or neither")
        if args.tls_client_ca and not args.tls_cert:
            raise CommandError("--tls-client-ca needs --tls-cert and --tls-key")
        if args.tls_cert:
            _check_tls(args.tls_cert, args.tls_key, args.tls_client_ca)
        dashboard.access.check_listen(
            listen, token=token is not None, mutual_tls=bool(args.tls_client_ca)
        )
    except dashboard.AccessError as exc:
        raise CommandError(str(exc)) from None
    if args.commit_url and (
        "{commit}" not in args.commit_url or not args.commit_url.startswith(("https://", "http://"))
    ):
        raise CommandError(
            f"--commit-url {args.commit_url!r}: use an http(s) URL with {{commit}} in it"
        )
    if args.refresh < 1:
        raise CommandError("--refresh: at least 1 second")
    trusted = load_trust(args.trust)
    others = tuple((u.host, u.port) for u in urls[1:])
    broker = dashboard.BrokerSettings(
        url.host, url.port, tls=url.tls, username=url.username, password=url.password,
        ca=args.ca, cert=args.cert, key=args.client_key, protocol=args.mqtt_version,
        others=others, discovery=discovery_of(args.broker),
    )  # fmt: skip
    return dashboard.Settings(
        broker=broker,
        listen=listen,
        prefix=args.prefix,
        token=token,
        tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None,
        tls_client_ca=str(args.tls_client_ca) if args.tls_client_ca else None,
        commit_url=args.commit_url,
        trusted=trusted,
        refresh=args.refresh,
        broker_url=args.broker,
    )
