"""The dashboard's web side: aiohttp, server-rendered Jinja2 pages, server-sent events.

Pages: ``/`` (fleet), ``/devices`` (filter, sort, server-side paging), ``/devices/<id>``
(desired against reported, per resource, from :mod:`setpoint.proto.diffs`), ``/rollouts``,
``/events``. Each page puts what changes in one ``<div id="live">``; ``/stream`` tells the
page (server-sent events) when something it shows changed, and ``dashboard.js`` fetches that
part again (``X-Setpoint-Fragment: 1``). Without JavaScript the pages refresh themselves.

Safe by default: Jinja2 autoescapes everything (device ids, reasons, resource ids and commit
messages are attacker-controlled text); a strict Content-Security-Policy allows only our own
script and stylesheet; every response says ``no-store``; with a token, every page needs it
(``Authorization: Bearer``, or the cookie the login form sets). Nothing here publishes.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import jinja2
from aiohttp import web

from setpoint.proto import diffs
from setpoint.proto.errors import ProtocolError
from setpoint.proto.status import DRIFT_STATES, ago
from setpoint.proto.topics import Topics, validate_id

from . import access
from .fleet import Change, DeviceQuery, Fleet, summary
from .watching import BrokerSettings, BrokerUnavailable, Changes, Watcher, fetch_retained

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC: Final = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# Which changes each page shows: a stream only wakes its page for those.
PAGE_KINDS: Final = {
    "fleet": {"group", "repository", "drift"},
    "devices": {"drift"},
    "rollouts": {"rollout", "gate"},
    "events": {"event"},
}
THROTTLE: Final = 0.2  # gather a burst of changes into one refresh
HEARTBEAT: Final = 15.0
FETCH_CONCURRENCY: Final = 4
_COMMIT: Final = re.compile(r"[0-9a-f]{7,64}")


@dataclass(frozen=True, slots=True)
class Settings:
    broker: BrokerSettings
    listen: access.Listen
    prefix: str = "setpoint/v1"
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    commit_url: str | None = None
    trusted: dict[str, Any] | None = None
    refresh: int = 5
    broker_url: str = ""
    fleet_events: int = field(default=500)


def commit_link(template: str | None, commit: str | None) -> str | None:
    """The commit's URL from ``--commit-url`` (``{commit}`` replaced), for hex commits only."""
    if not template or not commit or _COMMIT.fullmatch(commit) is None:
        return None
    return template.replace("{commit}", commit)


def clock(then: float | None) -> str:
    if not then:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(then))


def iso(then: float | None) -> str:
    if not then:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(then))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("setpoint.dashboard", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.ChainableUndefined,  # retained JSON may lack any field
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, clock=clock, iso=iso, short=lambda c: (c or "")[:12])
    env.globals.update(states=DRIFT_STATES, urlencode=urllib.parse.urlencode)
    return env


class Dashboard:
    """The aiohttp application over one :class:`Fleet` and one :class:`Watcher`."""

    def __init__(self, settings: Settings, fleet: Fleet | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.fleet = fleet or Fleet(self.topics, events_kept=settings.fleet_events)
        self.changes = Changes()
        self.watcher = Watcher(settings.broker, self.fleet, self.changes)
        self.env = _environment()
        self._fetching = asyncio.Semaphore(FETCH_CONCURRENCY)
        self.app = web.Application(middlewares=[self._headers, self._auth])
        self.app.add_routes(
            [
                web.get("/", self.fleet_page),
                web.get("/devices", self.devices_page),
                web.get("/devices/{device}", self.device_page),
                web.get("/rollouts", self.rollouts_page),
                web.get("/events", self.events_page),
                web.get("/stream", self.stream),
                web.get("/static/{name}", self.static),
                web.get("/favicon.ico", self.favicon),
                web.get("/login", self.login_page),
                web.post("/login", self.login),
            ]
        )

    # Middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _headers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = self.settings.token
        if token is None or request.path.startswith(("/static/", "/login", "/favicon")):
            return await handler(request)
        given = access.bearer(request.headers.get("Authorization"))
        if given is None:
            given = request.cookies.get(access.COOKIE)
        if access.token_matches(token, given):
            return await handler(request)
        return self._login_response(request, status=401, wrong=given is not None)

    # Pages ---------------------------------------------------------------------------------

    def render(
        self, request: web.Request, name: str, status: int = 200, **context: Any
    ) -> web.Response:
        template = self.env.get_template(name)
        context.update(
            now=time.time(),
            broker=self.settings.broker_url,
            connected=self.watcher.connected.is_set(),
            broker_error=self.watcher.error,
            refresh=self.settings.refresh,
            commit_link=lambda c: commit_link(self.settings.commit_url, c),
            ignored=self.fleet.ignored,
        )
        context.setdefault("device", None)
        if request.headers.get("X-Setpoint-Fragment") == "1":
            ctx = template.new_context(context)
            body = "".join(template.blocks["live"](ctx))
            body = f'<div id="live">{body}</div>'
        else:
            body = template.render(context)
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")

    async def fleet_page(self, request: web.Request) -> web.Response:
        fleet = self.fleet
        now = time.time()
        return self.render(
            request,
            "fleet.html",
            page="fleet",
            title="Fleet",
            groups=sorted(fleet.groups.values(), key=lambda g: g.group),
            counts=fleet.counts(),
            total=len(fleet.drift),
            repository=fleet.repository,
            chart=fleet.chart(now),
        )

    async def devices_page(self, request: web.Request) -> web.Response:
        query = DeviceQuery.from_params(request.query)
        return self.render(
            request,
            "devices.html",
            page="devices",
            title="Devices",
            result=self.fleet.devices(query),
            query=query,
            groups=sorted(self.fleet.groups),
        )

    async def device_page(self, request: web.Request) -> web.Response:
        try:
            device = validate_id(request.match_info["device"], "device id")
        except ProtocolError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        drift = self.fleet.drift.get(device)
        diff, problem = await self._diff(device)
        if drift is None and diff is None:
            return self.render(
                request,
                "device.html",
                status=404,
                page="device",
                title=device,
                device=device,
                drift=None,
                diff=None,
                problem=f"no device {device!r}: no drift status and no bundle is retained for it",
                events=[],
            )
        return self.render(
            request,
            "device.html",
            page="device",
            title=device,
            device=device,
            drift=drift,
            diff=diff,
            problem=problem,
            events=[(e, summary(e)) for e in reversed(self.fleet.device_events(device))],
        )

    async def _diff(self, device: str) -> tuple[diffs.DeviceDiff | None, str]:
        try:
            async with self._fetching:
                found = await fetch_retained(  # the watcher's: its nodes may come from DNS
                    self.watcher.broker, self.topics, diffs.topics_for(device, self.topics)
                )
        except BrokerUnavailable as exc:
            return None, f"cannot read the bundles: {exc}"
        try:
            diff = diffs.from_retained(device, found, self.topics, self.settings.trusted)
        except diffs.Unavailable as exc:
            return None, (
                f"{exc}; the broker may not let this identity read bundles and reports"
                " (the operator's ACL does not)"
            )
        except ProtocolError as exc:
            return None, f"{device}: {exc}"
        return diff, ""

    async def rollouts_page(self, request: web.Request) -> web.Response:
        return self.render(
            request, "rollouts.html", page="rollouts", title="Rollouts", rings=self.fleet.rings()
        )

    async def events_page(self, request: web.Request) -> web.Response:
        events = [(e, summary(e)) for e in reversed(self.fleet.events)]
        return self.render(request, "events.html", page="events", title="Events", events=events)

    # Live updates --------------------------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        page = request.query.get("page", "fleet")
        device = request.query.get("device") if page == "device" else None
        kinds = PAGE_KINDS.get(page, set())

        def wanted(change: Change) -> bool:
            if device is not None:
                return change.device == device
            return change.kind in kinds

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **HEADERS, "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        with self.changes.listen() as queue:
            await response.write(b"retry: 2000\n\n")
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), HEARTBEAT)
                except TimeoutError:
                    await response.write(b": still here\n\n")
                    continue
                if not wanted(change):
                    continue
                await asyncio.sleep(THROTTLE)
                while not queue.empty():
                    queue.get_nowait()
                data = f"event: change\ndata: {self.fleet.version}\n\n"
                await response.write(data.encode())

    # Static files and login ----------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        data = resources.files("setpoint.dashboard").joinpath("static", name).read_bytes()
        return web.Response(body=data, content_type=STATIC[name])

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    def _login_response(
        self, request: web.Request, status: int, wrong: bool, nxt: str | None = None
    ) -> web.Response:
        if "text/html" not in request.headers.get("Accept", ""):
            return web.Response(
                status=status,
                text="401: this dashboard needs its token (Authorization: Bearer TOKEN)\n",
                headers={"WWW-Authenticate": 'Bearer realm="setpoint"'},
            )
        if nxt is None:
            nxt = request.path_qs if request.path != "/login" else "/"
        return self.render(
            request, "login.html", status=status, page="login", title="Sign in", wrong=wrong,
            next=nxt,
        )  # fmt: skip

    async def login_page(self, request: web.Request) -> web.Response:
        return self._login_response(request, 200, wrong=False)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = str(form.get("token", ""))
        nxt = str(form.get("next", "/"))
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"  # only a path on this site: never an open redirect
        if self.settings.token is None or not access.token_matches(self.settings.token, given):
            return self._login_response(request, 401, wrong=True, nxt=nxt)
        response = web.HTTPSeeOther(nxt)
        response.set_cookie(
            access.COOKIE,
            given,
            httponly=True,
            samesite="Strict",
            secure=self.settings.tls_cert is not None,
            path="/",
        )
        raise response

    # Running -------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            context.load_verify_locations(s.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


async def serve(settings: Settings, ready: Callable[[str], None], stop: asyncio.Event) -> None:
    """Run the dashboard until ``stop`` is set; ``ready`` gets its URL once it listens."""
    dashboard = Dashboard(settings)
    runner = web.AppRunner(dashboard.app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    context = dashboard.ssl_context()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, ssl_context=context)
    try:
        await site.start()  # before the task group: a port in use is a plain OSError
        addresses = runner.addresses
        port = int(addresses[0][1]) if addresses else settings.listen.port
        ready(access.Listen(settings.listen.host, port).url(tls=context is not None))
        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(dashboard.watcher.run(), name="dashboard-watcher")
            await stop.wait()
            watcher.cancel()
    finally:
        await runner.cleanup()
