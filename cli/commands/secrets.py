"""``setpoint secrets``: seal a secret with age to the devices that may read it.

    setpoint secrets seal (--group G | --device D) [--repo PATH] [--from-file F | --from-stdin]
                          [--resource ID [--key KEY | --path PATH [--mode MODE]] --write]
    setpoint secrets reseal (--group G | --device D) --resource ID [--repo PATH]
                            [--from-file F | --from-stdin]

``seal`` encrypts the plaintext the operator gives (a file, stdin, or a prompt) to the
``recipient:`` of that device, or of every device of that group in the repository's work
tree, and prints the ``sealed:`` value; with ``--write`` it puts it into the group's or
device's file as resource ``--resource`` (replacing its ``value``/``content``/``source``, or
adding a setting with ``--key`` or a file with ``--path``), keeping the rest of the file.
``reseal`` does the same for a resource that is already sealed, for the devices there are
now (after a device joined or left, or to rotate the secret). The plaintext is read from
the operator, never from the repository, and is written nowhere. Setting values are text:
one trailing newline (``echo``'s) is dropped. See docs/secrets.md.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from ._common import require_controller


def _common(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", help="seal for every device of this group")
    who.add_argument("--device", help="seal for this device only")
    parser.add_argument(
        "--repo", type=Path, default=Path("."), help="the fleet repository's work tree (default .)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-file", type=Path, metavar="F", help="read the plaintext from F")
    source.add_argument("--from-stdin", action="store_true", help="read the plaintext from stdin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="secrets_verb", metavar="ACTION")
    sub.required = True
    seal = sub.add_parser("seal", help="encrypt a secret to a device or a group's devices")
    _common(seal)
    seal.add_argument("--resource", metavar="ID", help="the resource that holds the secret")
    kind = seal.add_mutually_exclusive_group()
    kind.add_argument("--key", help="a new setting resource with this key")
    kind.add_argument("--path", help="a new file resource at this path (mode 0600 unless --mode)")
    seal.add_argument("--mode", help="the new file's mode (default 0600)")
    seal.add_argument(
        "--write", action="store_true", help="write it into the group's or device's file"
    )
    reseal = sub.add_parser(
        "reseal", help="seal an already sealed resource again, for the current devices"
    )
    _common(reseal)
    reseal.add_argument("--resource", metavar="ID", required=True)


class _Refused(Exception):
    pass


def _plaintext(args: argparse.Namespace, setting: bool) -> bytes:
    if args.from_file is not None:
        try:
            data = args.from_file.read_bytes()
        except OSError as exc:
            raise _Refused(f"--from-file {args.from_file}: {exc.strerror}") from None
    elif args.from_stdin or not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
    else:
        first = getpass.getpass("secret: ")
        if getpass.getpass("again: ") != first:
            raise _Refused("the two entries differ; nothing was sealed")
        data = first.encode("utf-8")
    if setting:
        data = data.removesuffix(b"\n")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused("a setting's value must be UTF-8 text; seal a file instead") from None
    if not data:
        raise _Refused("the secret is empty; nothing was sealed")
    return data


def _existing_kind(document: object, resource: str) -> tuple[str | None, bool]:
    """The kind of resource ``resource`` in a parsed file, and whether it is sealed."""
    items = document.get("resources") if isinstance(document, dict) else None
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("id") == resource:
            kind = item.get("kind")
            return (kind if isinstance(kind, str) else None), "sealed" in item
    return None, False


def run(args: argparse.Namespace) -> int:
    sealing = require_controller("setpoint.controller.sealing")
    trees = require_controller("setpoint.controller.trees")
    safeyaml = require_controller("setpoint.controller.safeyaml")
    verb = f"setpoint secrets {args.secrets_verb}"
    resealing = args.secrets_verb == "reseal"
    write = resealing or args.write
    try:
        if not args.repo.is_dir():
            raise _Refused(f"{args.repo} is not a directory (pass --repo PATH)")
        tree = trees.DirectoryTree(args.repo)
        kind, ident = ("group", args.group) if args.group else ("device", args.device)
        new: dict[str, str] | None = None
        if not resealing and (args.key or args.path):
            if args.key:
                new = {"kind": "setting", "key": args.key}
            else:
                new = {"kind": "file", "path": args.path, "mode": args.mode or "0600"}
        if not resealing and args.mode and not args.path:
            raise _Refused("--mode is for a new file resource: give --path PATH with it")
        if write and not args.resource:
            raise _Refused("--write needs --resource ID (the resource that holds the secret)")
        file = sealing.target_file(tree, kind, ident) if write else None
        text = (args.repo / file).read_text(encoding="utf-8") if file else ""
        existing, is_sealed = _existing_kind(safeyaml.load(text.encode()), args.resource or "")
        if resealing and not is_sealed:
            raise _Refused(
                f"{file}: resource {args.resource!r} is not sealed; seal it first:"
                f" setpoint secrets seal --{kind} {ident} --resource {args.resource} --write"
            )
        setting = (new or {}).get("kind", existing) == "setting"
        to = sealing.recipients(tree, **{kind: ident})
        value = sealing.seal(_plaintext(args, setting), to)
        names = ", ".join(sorted(to))
        if not write:
            print("\n".join(sealing.yaml_lines(value, 0)))
            print(
                f"sealed for {names}; put this under the resource in place of"
                " value/content/source (or use --resource ID --write)",
                file=sys.stderr,
            )
            return 0
        assert file is not None
        edited = sealing.place(text, args.resource, value, new=new, file=file)
        (args.repo / file).write_text(edited, encoding="utf-8")
    except (_Refused, sealing.SealingError, safeyaml.YamlError, OSError) as exc:
        print(f"{verb}: {exc}", file=sys.stderr)
        return 1
    print(f"{file}: resource {args.resource!r} sealed for {names}; review and commit it")
    return 0
