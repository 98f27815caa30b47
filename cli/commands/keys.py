"""``setpoint keys generate --out DIR``: a fleet signing key pair."""

from __future__ import annotations

import argparse
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
    show = sub.add_parser("id", help="print the key id of a public or private key file")
    show.add_argument("file", type=Path)


def generate(out: Path, *, force: bool = False) -> str:
    """Write ``signing.key`` (0600) and ``signing.pub`` into ``out``; return the key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from setpoint.proto import envelopes

    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if private_path.exists() and not force:
        raise FileExistsError(f"{private_path} exists: pass --force to replace it")
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

    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return envelopes.key_id(envelopes.load_private_key(data))
    return envelopes.key_id(envelopes.load_public_key(data))


def run(args: argparse.Namespace) -> int:
    if args.keys_verb == "generate":
        try:
            keyid = generate(args.out, force=args.force)
        except FileExistsError as exc:
            print(f"setpoint keys: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.out / PRIVATE_NAME} (mode 0600) and {args.out / PUBLIC_NAME}")
        print(f"key id: {keyid}")
        return 0
    print(key_id_of(args.file))
    return 0
