"""``setpoint pki``: the fleet's transport certificates (mutual TLS with the broker).

    setpoint pki init DIR [--host NAME ...] [--days N]
    setpoint pki issue DEVICE --pki DIR [--csr FILE] [--days N] [--force]
    setpoint pki revoke IDENTITY --pki DIR
    setpoint pki crl --pki DIR [--days N]
    setpoint pki list --pki DIR [--json]

``init`` makes the device CA, the broker's server certificate and the controller's and the
operator's client certificates; ``issue`` a device's client certificate (CN = device id);
``revoke`` puts every certificate of a device (or identity) on the CRL, which the broker
re-reads on SIGHUP. The CRL expires (default 30 days): re-sign it with ``crl`` from cron.
Exit 0 on success, 2 with a message saying what to fix. See docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ._common import require_controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pki_command", metavar="COMMAND")
    sub.required = True
    default_pki = os.environ.get("SETPOINT_PKI")

    init = sub.add_parser("init", help="a new device CA, broker, controller and operator certs")
    init.add_argument("dir", type=Path, help="the PKI directory to create (mode 0700)")
    init.add_argument(
        "--host",
        action="append",
        help="a DNS name or IP address of the broker (repeat; default localhost and 127.0.0.1)",
    )
    init.add_argument("--days", type=int, default=365, help="leaf certificate lifetime")

    issue = sub.add_parser("issue", help="a client certificate for one device (CN = its id)")
    issue.add_argument("device", help="the device id")
    issue.add_argument(
        "--pki", type=Path, default=default_pki, help="PKI directory (env SETPOINT_PKI)"
    )
    issue.add_argument(
        "--csr",
        type=Path,
        help="sign this PEM request made on the device (its key never leaves it)",
    )
    issue.add_argument("--days", type=int, default=365, help="certificate lifetime")
    issue.add_argument("--force", action="store_true", help="replace an existing certificate")

    revoke = sub.add_parser("revoke", help="put a device's certificates on the CRL")
    revoke.add_argument("identity", help="a device id (or setpoint:controller / setpoint:operator)")
    revoke.add_argument("--pki", type=Path, default=default_pki, help="PKI directory")

    crl = sub.add_parser("crl", help="re-sign the CRL (it expires: run this from cron)")
    crl.add_argument("--pki", type=Path, default=default_pki, help="PKI directory")
    crl.add_argument("--days", type=int, default=30, help="CRL lifetime (default 30)")

    listing = sub.add_parser("list", help="every certificate issued")
    listing.add_argument("--pki", type=Path, default=default_pki, help="PKI directory")
    for action in (init, issue, revoke, crl, listing):
        action.add_argument("--json", action="store_true", help="print JSON for scripts")


def _open(pki_mod: object, args: argparse.Namespace) -> object:
    if args.pki is None:
        raise pki_mod.PkiError("no PKI directory: pass --pki DIR or set SETPOINT_PKI")  # type: ignore[attr-defined]
    return pki_mod.Pki(args.pki)  # type: ignore[attr-defined]


def _creds(creds: object) -> dict[str, str | None]:
    return {
        name: None if getattr(creds, name) is None else str(getattr(creds, name))
        for name in ("ca", "cert", "key")
    }


def _json(body: dict[str, object]) -> int:
    print(json.dumps(body, sort_keys=True))
    return 0


def run(args: argparse.Namespace) -> int:
    pki_mod = require_controller("setpoint.controller.pki")
    proto_errors = require_controller("setpoint.proto.errors")
    try:
        if getattr(args, "days", 1) < 1:
            raise pki_mod.PkiError("--days must be at least 1")
        if args.pki_command == "init":
            hosts = tuple(args.host or pki_mod.DEFAULT_HOSTS)
            pki = pki_mod.init(args.dir, hosts=hosts, days=args.days)
            if args.json:
                return _json({"root": str(pki.root), "ca": str(pki.root / "ca.pem"),
                              "crl": str(pki.root / "crl.pem"), "hosts": list(hosts),
                              "broker": _creds(pki.broker), "controller": _creds(pki.controller),
                              "operator": _creds(pki.operator)})  # fmt: skip
            print(f"PKI in {pki.root}: device CA ca.pem, CRL crl.pem")
            print(f"  broker      {pki.broker.cert} (hosts: {', '.join(hosts)})")
            print(f"  controller  {pki.controller.cert} (CN {pki_mod.CONTROLLER_IDENTITY})")
            print(f"  operator    {pki.operator.cert} (CN {pki_mod.OPERATOR_IDENTITY})")
            print(f"next: setpoint pki issue DEVICE --pki {pki.root}")
            return 0
        pki = _open(pki_mod, args)
        if args.pki_command == "issue":
            csr = None
            if args.csr is not None:
                try:
                    csr = args.csr.read_bytes()
                except OSError as exc:
                    raise pki_mod.PkiError(f"--csr {args.csr}: {exc.strerror}") from None
            creds = pki.issue_device(args.device, csr=csr, days=args.days, force=args.force)  # type: ignore[attr-defined]
            if args.json:
                return _json({"device": args.device, **_creds(creds)})
            print(f"{args.device}: certificate {creds.cert}")
            if creds.key is not None:
                print(
                    f"{args.device}: key {creds.key} (0600; copy it to the device, then delete it)"
                )
            print(f"CA for the device: {creds.ca}")
            return 0
        if args.pki_command == "revoke":
            serials = pki.revoke(args.identity)  # type: ignore[attr-defined]
            if args.json:
                crl_path = str(pki.crl)  # type: ignore[attr-defined]
                return _json({"identity": args.identity, "crl": crl_path,
                              "serials": [f"{s:x}" for s in serials]})  # fmt: skip
            print(f"revoked {args.identity}: serial(s) {', '.join(f'{s:x}' for s in serials)}")
            print(f"CRL {pki.crl} rewritten; tell the broker: kill -HUP <mosquitto pid>")  # type: ignore[attr-defined]
            return 0
        if args.pki_command == "crl":
            path = pki.write_crl(args.days)  # type: ignore[attr-defined]
            if args.json:
                return _json({"crl": str(path), "days": args.days})
            print(f"CRL {path} re-signed, valid {args.days} days; reload the broker (SIGHUP)")
            return 0
        if args.pki_command == "list":
            records = pki.records()  # type: ignore[attr-defined]
            if args.json:
                print(json.dumps([asdict(r) for r in records]))
            else:
                for r in records:
                    state = "revoked" if r.revoked_at is not None else "live"
                    print(f"{r.serial:x}  {r.role:<10} {r.identity:<24} {state}")
            return 0
    except (pki_mod.PkiError, proto_errors.InvalidId) as exc:
        print(f"setpoint pki: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"setpoint pki: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.pki_command)  # pragma: no cover - argparse limits the choices
