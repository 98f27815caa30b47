"""Where and how a client reaches the broker: one settings class for every side, and
``--broker`` parsed, with ``mqtt+srv://`` names resolved into a cluster's nodes.

* :class:`BrokerSettings`: host, port, TLS files, credentials, the other nodes of a
  cluster, and the ``+srv`` name they came from (:func:`rediscovered` asks it again).
* :func:`parse_broker_url` / :func:`parse_broker_list`: ``mqtt://host:port``,
  ``mqtts://host:port``, ``mqtt+srv://name`` and ``mqtts+srv://name``; several
  comma-separated for the nodes of one cluster. The one place every component that takes
  ``--broker`` (the shim, the operator verbs, the dashboard, the controller) reads it.
* :func:`order_srv`: SRV records in the order to try them (RFC 2782: lowest priority first;
  within one priority, a weighted random order). Pure; randomness is passed in.
* :func:`resolve_srv` / :func:`resolve_brokers`: the DNS query (dnspython), and a list with
  every ``+srv`` entry replaced by the nodes its records name.

A ``+srv`` URL names a domain, not a node: ``mqtt+srv://cluster.example.com`` asks for the
SRV records of ``_mqtt._tcp.cluster.example.com`` and ``mqtts+srv://`` those of
``_secure-mqtt._tcp.cluster.example.com``: the service names IANA registered for MQTT on
1883 (``mqtt``) and MQTT over TLS on 8883 (``secure-mqtt``), and the ones libmosquitto's
``mosquitto_connect_srv`` and paho's ``connect_srv`` ask for. Each record's target and port
is a node; its host name is resolved when connecting, as for any other URL (so TLS checks
the node's own name).

The resolver asked is the system's (``/etc/resolv.conf``) unless ``SETPOINT_DNS_SERVER``
names one (``IP`` or ``IP:PORT``, ``[IPv6]:PORT``); a query gives up after
``SETPOINT_DNS_TIMEOUT`` seconds (default 5).

dnspython is imported only when a ``+srv`` URL is resolved: this module is otherwise
stdlib-only, so the shim, which imports it, does not grow for devices that never use SRV.
Without dnspython, :class:`MissingResolver` names the package and the extra to install.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

SRV_SERVICES: Final = {"mqtt+srv": "_mqtt._tcp", "mqtts+srv": "_secure-mqtt._tcp"}
DNS_SERVER_ENV: Final = "SETPOINT_DNS_SERVER"
DNS_TIMEOUT_ENV: Final = "SETPOINT_DNS_TIMEOUT"
DEFAULT_DNS_TIMEOUT: Final = 5.0
INSTALL_HINT: Final = "pip install 'setpoint[srv]' (or pip install dnspython)"
_FORMS: Final = "use mqtt://host:port, mqtts://host:port, mqtt+srv://domain or mqtts+srv://domain"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Host, port, TLS files and credentials; the password is never part of a repr.

    ``others``: the other nodes of a cluster, reached with the same TLS settings and
    credentials and tried in turn after ``host``/``port`` (:attr:`endpoints`);
    ``protocol``: ``auto`` (MQTT 5, then 3.1.1 on an engine that refuses 5), ``5`` or
    ``3.1.1``, for the clients that choose (the dashboard); ``discovery``: the ``--broker``
    value when it names ``mqtt+srv://`` domains (the nodes above are what DNS gave), to ask
    again with :func:`rediscovered` when every node failed. The controller, the dashboard
    and the shim all use this one class (the shim takes ``client_id``, ``keepalive`` and
    its connect timeout from its own flags, :class:`setpoint.device_shim.ShimConfig`)."""

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    client_id: str = ""
    keepalive: int = 30
    connect_timeout: float = 10.0
    protocol: str = "auto"
    others: tuple[tuple[str, int], ...] = ()
    discovery: str = ""

    def url(self) -> str:
        """The first node's URL."""
        return self.url_of(self.host, self.port)

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every node to try, in order: ``host:port`` first, then the others."""
        return ((self.host, self.port), *self.others)

    @property
    def urls(self) -> str:
        """Every node's URL, comma-separated (as ``--broker`` takes them)."""
        return self.urls_of(self.endpoints)

    @property
    def described(self) -> str:
        """The nodes for a log line, with the DNS name they came from if any."""
        if self.discovery:
            return f"{self.urls} (from DNS: {self.discovery})"
        return self.urls

    def urls_of(self, endpoints: Sequence[tuple[str, int]]) -> str:
        return ",".join(self.url_of(host, port) for host, port in endpoints)

    def url_of(self, host: str, port: int) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{port}"


def rediscovered(settings: BrokerSettings, rng: Random) -> BrokerSettings:
    """``settings`` with the nodes its ``discovery`` name gives in DNS now (blocking: run
    it in a thread from asyncio); :class:`BrokerURLError` if the lookup gives none."""
    first, *rest = resolve_brokers(parse_broker_list(settings.discovery), rng)
    others = tuple((node.host, node.port) for node in rest)
    return dataclasses.replace(settings, host=first.host, port=first.port, others=others)


class BrokerURLError(ValueError):
    """A ``--broker`` value that cannot be used; the message says what to write instead."""


class DiscoveryError(BrokerURLError):
    """A ``+srv`` name that gave no node: no records, no such name, or no answer."""


class MissingResolver(DiscoveryError):
    """dnspython is not installed."""


@dataclass(frozen=True)
class BrokerURL:
    """One entry of ``--broker``. For a ``+srv`` entry, ``host`` is the domain and ``port``
    is 0 until :func:`resolve_brokers` replaces it by the nodes."""

    scheme: str
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    @property
    def srv(self) -> bool:
        return self.scheme in SRV_SERVICES

    @property
    def service(self) -> str:
        """The name whose SRV records are asked for (``+srv`` entries only)."""
        return f"{SRV_SERVICES[self.scheme]}.{self.host}"

    @property
    def url(self) -> str:
        if self.srv:
            return f"{self.scheme}://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """One URL; credentials are refused in it (they belong in flags and the environment)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", *SRV_SERVICES):
        raise BrokerURLError(f"broker URL {url!r}: {_FORMS}")
    if not parts.hostname:
        raise BrokerURLError(f"broker URL {url!r} has no host")
    if parts.username or parts.password:
        raise BrokerURLError(
            "do not put credentials in the broker URL: use --username with"
            " SETPOINT_MQTT_PASSWORD (or --password-file)"
        )
    tls = parts.scheme in ("mqtts", "mqtts+srv")
    try:
        port = parts.port
    except ValueError as exc:
        raise BrokerURLError(f"broker URL {url!r}: bad port") from exc
    if parts.scheme in SRV_SERVICES:
        if port is not None:
            raise BrokerURLError(
                f"broker URL {url!r}: a {parts.scheme}:// URL names a domain whose SRV"
                f" records give the nodes and their ports; drop ':{port}'"
                f" ({parts.scheme}://{parts.hostname})"
            )
        return BrokerURL(parts.scheme, parts.hostname, 0, tls)
    return BrokerURL(parts.scheme, parts.hostname, port or (8883 if tls else 1883), tls)


def discovery_of(value: str) -> str:
    """``value`` (a ``--broker`` value) if it names a ``+srv`` domain, to be resolved again
    when every node failed; else ``""``."""
    return value if any(url.srv for url in parse_broker_list(value)) else ""


def parse_broker_list(value: str) -> list[BrokerURL]:
    """The entries of ``--broker``: one, or the nodes of one cluster comma-separated."""
    parts = [part.strip() for part in str(value).split(",")]
    if not all(parts):
        raise BrokerURLError(
            f"--broker {value!r}: an empty entry in the list; separate the nodes' URLs with"
            " single commas: mqtt://a:1883,mqtt://b:1883"
        )
    return [parse_broker_url(part) for part in parts]


class Random(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # a host name, without the root's trailing dot


def order_srv(records: Iterable[SrvRecord], rng: Random) -> list[SrvRecord]:
    """The records in the order to try them (RFC 2782, "Usage rules"): by priority, lowest
    first; within one priority, repeatedly pick one at random with a chance proportional to
    its weight (records of weight 0 first in the running sum, so one is picked first only
    when the random number is exactly 0, or when every weight left is 0)."""
    by_priority: dict[int, list[SrvRecord]] = {}
    for record in records:
        by_priority.setdefault(record.priority, []).append(record)
    ordered: list[SrvRecord] = []
    for priority in sorted(by_priority):
        left = sorted(by_priority[priority], key=lambda r: r.weight != 0)
        while left:
            total = sum(r.weight for r in left)
            pick = rng.random() * total
            running = 0
            chosen = len(left) - 1
            for i, record in enumerate(left):
                running += record.weight
                if running >= pick:
                    chosen = i
                    break
            ordered.append(left.pop(chosen))
    return ordered


def dns_settings(env: Mapping[str, str] | None = None) -> tuple[tuple[str, int] | None, float]:
    """The resolver to ask (None: the system's) and the query timeout, from the
    environment; a bad value is a :class:`BrokerURLError` naming the variable."""
    env = os.environ if env is None else env
    server: tuple[str, int] | None = None
    text = env.get(DNS_SERVER_ENV, "").strip()
    if text:
        try:
            parts = urlsplit(f"dns://{text}")
            host, port = parts.hostname, parts.port or 53
            ipaddress.ip_address(host or "")  # dnspython asks resolvers by address only
        except ValueError:
            host, port = None, 0
        if not host:
            raise BrokerURLError(
                f"{DNS_SERVER_ENV}={text!r}: give the resolver's address as IP or IP:PORT"
                " (127.0.0.1:5353, [::1]:53), or unset it to use the system's"
            )
        server = (host, port)
    timeout = DEFAULT_DNS_TIMEOUT
    text = env.get(DNS_TIMEOUT_ENV, "").strip()
    if text:
        try:
            timeout = float(text)
        except ValueError:
            timeout = 0.0
        if not timeout > 0:
            raise BrokerURLError(f"{DNS_TIMEOUT_ENV}={text!r}: give a positive number of seconds")
    return server, timeout


def _dns() -> Any:
    try:
        import dns.exception
        import dns.rdatatype
        import dns.resolver
    except ModuleNotFoundError as exc:
        raise MissingResolver(
            "mqtt+srv:// and mqtts+srv:// need the dnspython package, which is not"
            f" installed: {INSTALL_HINT}; or list the nodes instead:"
            " --broker mqtt://a:1883,mqtt://b:1883"
        ) from exc
    return dns


def resolve_srv(entry: BrokerURL, env: Mapping[str, str] | None = None) -> list[SrvRecord]:
    """The SRV records of a ``+srv`` entry, unordered; a :class:`DiscoveryError` that names
    the queried name and the fix when there is none."""
    server, timeout = dns_settings(env)
    dns = _dns()
    name = entry.service
    where = f"resolver {server[0]}:{server[1]}" if server else "the system's resolver"
    fix = (
        f"publish SRV records for {name} (priority weight port target, one per node), or"
        " list the nodes instead: --broker mqtt://a:1883,mqtt://b:1883"
    )
    try:
        resolver = dns.resolver.Resolver(configure=server is None)
        if server is not None:
            resolver.nameservers = [server[0]]
            resolver.port = server[1]
        answer = resolver.resolve(name, dns.rdatatype.SRV, lifetime=timeout, search=False)
    except dns.resolver.NXDOMAIN:
        raise DiscoveryError(
            f"{entry.url}: {name} does not exist ({where} answered NXDOMAIN); {fix}"
        ) from None
    except dns.resolver.NoAnswer:
        raise DiscoveryError(f"{entry.url}: {name} has no SRV records ({where}); {fix}") from None
    except dns.exception.Timeout:
        raise DiscoveryError(
            f"{entry.url}: {where} did not answer for {name} within {timeout:g}s; check the"
            f" network and the resolver ({DNS_SERVER_ENV} names another, {DNS_TIMEOUT_ENV}"
            " waits longer), or list the nodes instead: --broker mqtt://a:1883,mqtt://b:1883"
        ) from None
    except dns.exception.DNSException as exc:
        raise DiscoveryError(
            f"{entry.url}: cannot look up {name} ({where}: {exc}); check the resolver"
            f" ({DNS_SERVER_ENV} names another), or list the nodes instead:"
            " --broker mqtt://a:1883,mqtt://b:1883"
        ) from None
    records = [
        SrvRecord(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
        for r in answer
    ]
    # RFC 2782: a target of "." says the service is decidedly not offered at this domain.
    records = [r for r in records if r.target not in ("", ".")]
    if not records:
        raise DiscoveryError(f"{entry.url}: {name} says no MQTT service is offered there; {fix}")
    return records


def resolve_brokers(
    entries: Sequence[BrokerURL], rng: Random, env: Mapping[str, str] | None = None
) -> list[BrokerURL]:
    """``entries`` with every ``+srv`` entry replaced by its nodes, in RFC 2782 order, as
    ``mqtt://`` (or ``mqtts://``) URLs with the entry's credentials; other entries as they
    are. Raises :class:`DiscoveryError` when a ``+srv`` entry gives no node."""
    nodes: list[BrokerURL] = []
    for entry in entries:
        if not entry.srv:
            nodes.append(entry)
            continue
        scheme = "mqtts" if entry.tls else "mqtt"
        for record in order_srv(resolve_srv(entry, env), rng):
            node = dataclasses.replace(entry, scheme=scheme, host=record.target, port=record.port)
            if node not in nodes:
                nodes.append(node)
    return nodes
