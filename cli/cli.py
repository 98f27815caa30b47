"""The ``setpoint`` command: a thin layer that parses arguments and hands over to a side.

Each verb lives in its own module under :mod:`setpoint.commands` with ``add_arguments``
and ``run``; the module imports the controller or the shim inside ``run``, so ``setpoint
shim`` works on a device that has only the shim's dependencies installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__

# verb -> (module under setpoint.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "init": ("init", "create a new fleet repository"),
    "validate": ("validate", "check a fleet repository the way the controller does"),
    "keys": ("keys", "manage the fleet signing key"),
    "pki": ("pki", "transport certificates: device CA, broker, clients, CRL"),
    "controller": ("controller", "run the controller: git -> signed, retained bundles"),
    "shim": ("shim", "run the device agent"),
    "status": ("status", "fleet, group and device convergence"),
    "drift": ("drift", "current drift, or the live stream of drift events"),
    "diff": ("diff", "desired vs reported, per resource, for one device"),
    "history": ("history", "the controller's audit log of publications"),
    "notify": ("notify", "tell a controller a repository changed (post-receive hook)"),
    "sim": ("sim", "simulated devices for load and demos"),
    "dashboard": ("dashboard", "the read-only web dashboard: fleet, devices, rollouts, events"),
    "demo": ("demo", "the end-to-end demo on a private broker"),
    "rollout": ("rollout", "rollout status by group; pause and resume a group's rollout"),
    "promote": ("promote", "check a ring's gate, then merge FROM into TO locally"),
    "approve": ("approve", "approve content waiting at a ring's gate (signed)"),
    "secrets": ("secrets", "seal secrets with age to the devices that may read them"),
    "conformance": ("conformance", "check a running device agent against proto/SPEC.md"),
    "wait": ("wait", "block until the fleet, a group or a device has converged"),
    "config": ("config", "operator contexts: broker, TLS files, prefix, state directory"),
    "completion": ("completion", "print a shell completion script (bash, zsh, fish)"),
}
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a command its reader left


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, import just that verb's module (the others keep their
    help line): a device running ``setpoint shim`` does not pay for every verb's imports
    (about 4 MB of RSS, see docs/performance.md)."""
    parser = argparse.ArgumentParser(
        prog="setpoint", description="GitOps for device fleets over MQTT."
    )
    parser.add_argument("--version", action="version", version=f"setpoint {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        if only is not None and verb != only:
            continue
        module = importlib.import_module(f"setpoint.commands.{module_name}")
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and not words[0].startswith("-") and words[0] not in VERBS:
        return _unknown_verb(words[0])
    parser = build_parser(words[0] if words and words[0] in VERBS else None)
    args = parser.parse_args(words)
    from .commands import _contexts
    from .commands._common import CommandError

    try:
        if getattr(args, "_settings", False):
            _contexts.apply(args)
        result = args._module.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except CommandError as exc:
        print(f"setpoint {args.verb}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`setpoint diff ... | head`): not an error of ours. Point
        # stdout at /dev/null so the interpreter's own flush at exit does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT
    return int(result or 0)


def _unknown_verb(word: str) -> int:
    import difflib

    close = difflib.get_close_matches(word, list(VERBS), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    print(
        f"setpoint: unknown verb {word!r}{hint} (verbs: {', '.join(VERBS)};"
        " `setpoint --help` describes them)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
