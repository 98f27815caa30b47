"""``setpoint promote FROM TO --repo PATH``: check TO's gate, then merge FROM into TO locally.

The gate is read from the controller's retained ``rings/<TO>/gate`` status: the content
(git tree) of FROM's head must have passed there (and be approved if the gate wants it).
If so, a merge commit is written to TO in the local repository for the operator to push;
otherwise nothing is written and the reason is printed. ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from . import _operating
from ._common import CommandError, add_broker_arguments, require_controller
from ._fleetview import add_protocol_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="FROM", help="ring to promote from, e.g. canary")
    parser.add_argument("target", metavar="TO", help="ring to promote to, e.g. production")
    parser.add_argument("--repo", default=".", help="the local fleet repository (default: .)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_broker_arguments(parser)
    add_protocol_argument(parser)


def run(args: argparse.Namespace) -> int:
    require_controller("dulwich")
    try:
        result = promote(args)
    except CommandError as exc:
        result = {"promoted": False, "reason": str(exc)}
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif result["promoted"]:
        print(f"merged {args.source} into {args.target}: {result['commit']} (push it)")
    else:
        print(f"refused: {result['reason']}")
    return 0 if result["promoted"] else 1


def promote(args: argparse.Namespace) -> dict[str, Any]:
    from dulwich.errors import NotGitRepository
    from dulwich.objects import Commit
    from dulwich.repo import Repo

    try:
        repo = Repo(args.repo)
    except NotGitRepository:
        raise CommandError(f"{args.repo} is not a git repository") from None
    with repo:
        refs = {name: b"refs/heads/" + name.encode() for name in (args.source, args.target)}
        heads = {}
        for name, ref in refs.items():
            try:
                heads[name] = repo.refs[ref]
            except KeyError:
                raise CommandError(f"no branch {name!r} in {args.repo}") from None
        source = repo[heads[args.source]]
        assert isinstance(source, Commit)
        tree = source.tree.decode()
        _groups, rings = _operating.views(args)
        gate = rings.get(args.target)
        if gate is None:
            raise CommandError(f"ring {args.target!r} has no gate status; is it a gated ring?")
        if gate.source != args.source:
            raise CommandError(f"ring {args.target!r} promotes from {gate.source!r}")
        if tree not in gate.passed:
            evidence = (gate.evidence or {}).get(tree)
            why = "it never ran there" if evidence is None else (
                f"{evidence.in_sync}/{evidence.devices} in sync,"
                f" {len(evidence.unhealthy)} unhealthy, not healthy long enough yet"
            )  # fmt: skip
            raise CommandError(f"content {tree[:12]} has not passed on {args.source}: {why}")
        if gate.gate.approval and tree not in gate.approved:
            raise CommandError(
                f"content {tree[:12]} needs an approval: setpoint approve {args.target}"
            )
        head_ref = repo.refs.read_ref(b"HEAD") or b""
        if not repo.bare and head_ref == b"ref: " + refs[args.target]:
            raise CommandError(f"{args.target} is checked out: check out another branch first")
        merge = Commit()
        merge.tree = source.tree
        merge.parents = [heads[args.target], heads[args.source]]
        author = repo.get_config_stack()
        try:
            name = author.get((b"user",), b"name") + b" <" + author.get((b"user",), b"email") + b">"
        except KeyError:
            name = b"setpoint promote <setpoint@localhost>"
        merge.author = merge.committer = name
        merge.author_time = merge.commit_time = int(time.time())
        merge.author_timezone = merge.commit_timezone = 0
        merge.message = f"Promote {args.source} to {args.target} ({tree[:12]})\n".encode()
        repo.object_store.add_object(merge)
        if not repo.refs.set_if_equals(refs[args.target], heads[args.target], merge.id):
            raise CommandError(f"{args.target} moved meanwhile; run promote again")
        return {"promoted": True, "commit": merge.id.decode(), "tree": tree}
