"""``setpoint drift``: the devices that are not in sync now, or the live stream of drift events.

    setpoint drift --broker mqtt://host:1883            # current drift (retained statuses)
    setpoint drift --broker mqtt://host:1883 --follow   # one line per drift event, until Ctrl-C
    setpoint drift ... --json                           # JSON (one object per line with --follow)

Exit 0 (also when there is drift: that is data, not an error); 2 if the broker cannot be
read. Colour only on a terminal. Needs nothing but paho-mqtt.

``--follow`` keeps a persistent MQTT session (no clean start, QoS 1, ``--session-expiry``
seconds, default 600) under a client id derived from the user, host, broker, prefix and
process id: events published while the follower reconnects (a broker restart, a network
cut) are delivered once it is back. With ``--client-id ID`` a restarted follower resumes
the session of the last one with that id and gets what was queued meanwhile (two followers
must not share an id: the broker would hand the session back and forth). When the broker
had no session for it (expired, or lost by the broker), it says on stderr that events may
have been missed; when the connection keeps dropping right after it opens, it asks whether
another client uses its id. On a normal stop it ends its session unless ``--client-id``
was given. Lines about the connection go to stderr; events to stdout.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import time
from typing import Any, Final

from setpoint.proto import status as wire
from setpoint.proto.errors import ProtocolError
from setpoint.proto.topics import Topics

from . import _fleetview as view
from ._common import CommandError, add_broker_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="stream drift events")
    parser.add_argument("--all", action="store_true", help="list in-sync devices too")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-color", action="store_true", help="no colour even on a terminal")
    parser.add_argument(
        "--client-id",
        help="with --follow: the MQTT client id of the session; the same id resumes the"
        " session after a restart (default: one per process)",
    )
    parser.add_argument(
        "--session-expiry",
        type=int,
        default=600,
        metavar="SECONDS",
        help="with --follow: how long the broker keeps our session and queues events while"
        " we are away (default 600)",
    )


def event_line(event: dict[str, Any], colour: bool) -> str:
    """One drift event as a readable line."""
    resources = event.get("resources") or []
    why = "; ".join(f"{r.get('id')}: {r.get('why')}" for r in resources) or event.get("reason", "")
    why = view.printable(str(why))  # text from devices: never terminal escapes
    previous = view.printable(str(event.get("previous") or "-"))
    when = view.clock(float(event.get("time", 0.0)))
    change = view.printable(str(event.get("change", "?")))
    mark = {"opened": "31", "resolved": "32", "changed": "33"}.get(change, "")
    device = view.printable(str(event.get("device")))
    group = view.printable(str(event.get("group") or "-"))
    head = (
        f"{when}  {view.paint(colour, mark, change.ljust(8))}  {device} ({group})"
        f"  {view.state(colour, previous)} ->"
        f" {view.state(colour, view.printable(str(event.get('state'))))}"
    )
    return f"{head}  {why}" if why else head


def current(args: argparse.Namespace, reader: view.Reader, colour: bool) -> int:
    topics = Topics(args.prefix)
    statuses = []
    for topic, payload in sorted(reader.snapshot().items()):
        try:
            if topics.parse(topic).kind == "device-drift":
                statuses.append(wire.drift_from_json(payload))
        except ProtocolError as exc:
            print(f"setpoint drift: ignoring {topic}: {exc}", file=sys.stderr)
    shown = [s for s in statuses if args.all or s.state != "in_sync"]
    if args.json:
        print(json.dumps([wire.drift_to_dict(s) for s in shown], indent=2, sort_keys=True))
        return 0
    if not shown:
        print(f"no drift: {len(statuses)} devices, all in sync" if statuses else "no devices")
        return 0
    plain, rows = [], []
    for s in shown:
        why = view.printable("; ".join(f"{r.id}: {r.why}" for r in s.resources) or s.reason)
        cells = [view.printable(s.device), view.printable(s.group or "-")]
        tail = [f"since {view.ago(s.since)}", why]
        plain.append([*cells, s.state, *tail])
        rows.append([*cells, view.state(colour, s.state), *tail])
    print("\n".join(view.table(rows, plain)))
    return 0


FLAPS: Final = 3  # losses within FLAP_WINDOW seconds that suggest a shared client id
FLAP_WINDOW: Final = 30.0


def session_notice(connects: int, present: bool | None, since: float | None) -> str | None:
    """What to say on stderr about a (re)connection of the follower; None: nothing. Pure."""
    if present is None:
        return "connection to the broker lost; reconnecting (events are kept for us)"
    if connects == 1:
        if present:
            return "resuming our session: events queued while we were away come first"
        return None
    if present:
        return "reconnected; the broker kept our session, no event was missed"
    gap = f" since {view.clock(since)}" if since else ""
    return (
        f"reconnected, but the broker had no session for us: drift events{gap} may have"
        " been missed (`setpoint drift` shows the current state)"
    )


def flapping(losses: list[float], now: float) -> bool:
    """Has the connection dropped FLAPS times within FLAP_WINDOW seconds? Pure."""
    return len([t for t in losses if now - t <= FLAP_WINDOW]) >= FLAPS


def follow(args: argparse.Namespace, colour: bool) -> int:
    topics = Topics(args.prefix)
    client_id = args.client_id or view.session_client_id("drift", args)
    session = view.Session(client_id, max(1, args.session_expiry))
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    losses: list[float] = []

    def on_session(connects: int, present: bool | None) -> None:
        now = time.time()
        if present is None:
            losses.append(now)
            if flapping(losses, now):
                losses.clear()
                inbox.put(("notice", f"the connection keeps dropping right after it opens: is"
                                     f" another client using our client id {client_id!r}?"
                                     " (pass another --client-id)"))  # fmt: skip
        notice = session_notice(connects, present, losses[-1] if losses else None)
        if notice:
            inbox.put(("notice", notice))

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # stop as on Ctrl-C: end the session, exit 0

    signal.signal(signal.SIGTERM, on_sigterm)
    reader = view.Reader(
        args,
        [topics.event("drift")],
        "drift",
        session=session,
        on_session=on_session,
        follow=lambda topic, payload: inbox.put(("event", (topic, payload))),
    )
    try:
        reader.snapshot()  # subscribed and flowing
        print(
            f"following drift events on {args.broker} as {session.client_id} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        while True:
            try:
                kind, item = inbox.get(timeout=1.0)
            except queue.Empty:
                if reader.error:
                    raise CommandError(reader.error) from None
                continue
            if kind == "notice":
                print(f"setpoint drift: {item}", file=sys.stderr, flush=True)
                continue
            topic, payload = item
            try:
                event = wire.event_from_json(payload)
            except ProtocolError as exc:
                print(f"setpoint drift: ignoring a message on {topic}: {exc}", file=sys.stderr)
                continue
            line = json.dumps(event, sort_keys=True) if args.json else event_line(event, colour)
            print(line, flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        # A session of our own (no --client-id) would only hold events nobody reads.
        reader.close(end_session=args.client_id is None)


def run(args: argparse.Namespace) -> int:
    colour = view.use_colour(args) and not args.json
    try:
        if args.follow:
            return follow(args, colour)
        reader = view.Reader(args, [Topics(args.prefix).all_drift()], "drift")
        try:
            return current(args, reader, colour)
        finally:
            reader.close()
    except CommandError as exc:
        print(f"setpoint drift: {exc}", file=sys.stderr)
        return 2
