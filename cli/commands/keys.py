"""``setpoint keys generate --out DIR`` and ``setpoint keys id FILE``: the fleet signing key.

``generate`` creates DIR itself when only DIR is missing (``--out keys/`` in a fresh
folder), but refuses a missing parent: a typo in ``--out /etc/setpont/keys`` must not leave
a private key in a new tree nobody looks at. Exit 0, or 2 with what to fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_verb", metavar="ACTION")
    sub.required = True
    gen = sub.add_parser("generate", help="new Ed25519 signing key (0600) and public key")
    gen.add_argument("--out", required=True, type=Path, help="directory for the two files")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key")
    gen.add_argument("--json", action="store_true", help="print JSON for scripts")
    show = sub.add_parser("id", help="print the key id of a public or private key file")
    show.add_argument("file", type=Path)
    show.add_argument("--json", action="store_true", help="print JSON for scripts")


class KeyFileError(Exception):
    """A key file that cannot be written or read; the message says what to fix."""


def generate(out: Path, *, force: bool = False) -> str:
    """Write ``signing.key`` (0600) and ``signing.pub`` into ``out``; return the key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from setpoint.proto import envelopes

    if not out.parent.is_dir():
        raise KeyFileError(
            f"--out {out}: the folder {out.parent} does not exist; create it first"
            f" (mkdir -p {out.parent}) or choose another --out"
        )
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"--out {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise KeyFileError(f"--out {out} is not a folder")
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if private_path.exists() and not force:
        raise KeyFileError(f"{private_path} exists: pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    tmp = private_path.with_name(f".{PRIVATE_NAME}.tmp")
    if tmp.exists():
        tmp.unlink()
    # Created 0600 from the first byte: never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(envelopes.private_key_pem(key))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, private_path)
    public_path.write_bytes(envelopes.public_key_pem(key.public_key()))
    return envelopes.key_id(key)


def key_id_of(path: Path) -> str:
    from setpoint.proto import envelopes
    from setpoint.proto.errors import ProtocolError

    try:
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            return envelopes.key_id(envelopes.load_private_key(data))
        return envelopes.key_id(envelopes.load_public_key(data))
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    except (ProtocolError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a PEM Ed25519 key ({exc})") from None


def run(args: argparse.Namespace) -> int:
    try:
        if args.keys_verb == "generate":
            keyid = generate(args.out, force=args.force)
            private, public = args.out / PRIVATE_NAME, args.out / PUBLIC_NAME
            if args.json:
                print(json.dumps({"key_id": keyid, "private": str(private),
                                  "public": str(public)}, sort_keys=True))  # fmt: skip
            else:
                print(f"wrote {private} (mode 0600) and {public}")
                print(f"key id: {keyid}")
            return 0
        keyid = key_id_of(args.file)
    except KeyFileError as exc:
        print(f"setpoint keys: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"key_id": keyid, "file": str(args.file)}) if args.json else keyid)
    return 0
