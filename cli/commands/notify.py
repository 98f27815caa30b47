"""``setpoint notify --controller URL``: tell a controller that the repository changed.

For a ``post-receive`` hook of a self-hosted bare repository::

    #!/bin/sh
    exec setpoint notify --controller http://controller:8780/ \\
        --secret-file /etc/setpoint/webhook.secret --hook

The request is a signed ``POST`` (``X-Hub-Signature-256``, as GitHub and Gitea send), so
the controller's webhook treats it like any git host's push. The controller fetches and
reads every branch itself; the refs sent are only for its log. Standard library only, so
it runs on a git server without the controller's dependencies.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--controller",
        required=True,
        help="the controller's webhook URL, e.g. http://controller:8780/",
    )
    parser.add_argument(
        "--secret-file",
        type=Path,
        help="file holding the webhook secret (or env SETPOINT_WEBHOOK_SECRET)",
    )
    parser.add_argument(
        "--ref", action="append", default=[], help="the ref that changed (repeatable)"
    )
    parser.add_argument(
        "--hook",
        action="store_true",
        help="read 'old new ref' lines from standard input (post-receive)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def read_secret(path: Path | None) -> bytes | None:
    if path is not None:
        return path.read_bytes().strip()
    value = os.environ.get("SETPOINT_WEBHOOK_SECRET")
    return value.encode("utf-8") if value else None


def run(args: argparse.Namespace) -> int:
    try:
        secret = read_secret(args.secret_file)
    except OSError as exc:
        print(f"setpoint notify: cannot read {args.secret_file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not secret:
        print(
            "setpoint notify: no secret: pass --secret-file or set SETPOINT_WEBHOOK_SECRET",
            file=sys.stderr,
        )
        return 2
    refs = list(args.ref)
    if args.hook:
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 3:
                refs.append(parts[2])
    body = json.dumps(
        {"ref": refs[0] if refs else None, "refs": refs, "source": "setpoint-notify"}
    ).encode("utf-8")
    request = urllib.request.Request(
        args.controller,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "setpoint-notify",
            "X-Setpoint-Event": "push",
            "X-Hub-Signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        print(
            f"setpoint notify: the controller answered {exc.code} {exc.reason}"
            + (" (is the secret the controller's?)" if exc.code == 401 else ""),
            file=sys.stderr,
        )
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"setpoint notify: cannot reach {args.controller}: {reason}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"controller": args.controller, "status": status, "refs": refs}))
    else:
        print(f"notified {args.controller} ({status})")
    return 0
