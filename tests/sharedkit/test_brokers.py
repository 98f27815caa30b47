"""``--broker`` URLs and ``mqtt+srv://`` discovery: parsing, RFC 2782 order, and real DNS
queries to a server on loopback (no network beyond it)."""

from __future__ import annotations

import builtins
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))

from dnskit import DnsServer, dns_server, silent_resolver

from setpoint.kit import brokers
from setpoint.kit.brokers import (
    BrokerURL,
    BrokerURLError,
    DiscoveryError,
    MissingResolver,
    SrvRecord,
    order_srv,
    parse_broker_list,
    parse_broker_url,
    resolve_brokers,
)

NAME = "cluster.example.test"


def test_srv_urls_parse_to_a_domain_and_a_service_name() -> None:
    plain = parse_broker_url(f"mqtt+srv://{NAME}")
    assert (plain.srv, plain.tls, plain.host) == (True, False, NAME)
    assert plain.service == f"_mqtt._tcp.{NAME}"
    secure = parse_broker_url(f"mqtts+srv://{NAME}")
    assert (secure.srv, secure.tls, secure.service) == (True, True, f"_secure-mqtt._tcp.{NAME}")
    assert secure.url == f"mqtts+srv://{NAME}"
    assert parse_broker_url("mqtt://h").port == 1883
    assert parse_broker_url("mqtts://h").port == 8883
    assert [u.srv for u in parse_broker_list(f"mqtt://a:1,mqtt+srv://{NAME}")] == [False, True]


@pytest.mark.parametrize(("url", "message"), [
    (f"mqtt+srv://{NAME}:1883", "SRV records give the nodes and their ports; drop ':1883'"),
    ("srv://x", "use mqtt://host:port, mqtts://host:port, mqtt+srv://domain or mqtts+srv://"),
    ("mqtt+srv://", "has no host"),
    ("mqtt+srv://u:p@x", "do not put credentials in the broker URL"),
])  # fmt: skip
def test_bad_srv_urls_are_refused_with_the_fix(url: str, message: str) -> None:
    with pytest.raises(BrokerURLError) as info:
        parse_broker_url(url)
    assert message in str(info.value)


def test_srv_order_is_by_priority_then_weighted_random() -> None:
    records = [
        SrvRecord(20, 0, 1, "backup"),
        SrvRecord(10, 1, 1, "light"),
        SrvRecord(10, 3, 1, "heavy"),
        SrvRecord(10, 0, 1, "zero"),
    ]
    rng = random.Random(7)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        ordered = order_srv(records, rng)
        assert ordered[-1].target == "backup"  # a higher priority number is always last
        assert sorted(r.target for r in ordered[:3]) == ["heavy", "light", "zero"]
        firsts[ordered[0].target] += 1
    # Chosen first in proportion to weight (3:1), weight 0 (almost) never first.
    assert 2.5 < firsts["heavy"] / firsts["light"] < 3.6
    assert firsts["zero"] < 10


def test_srv_order_with_every_weight_zero_keeps_every_record() -> None:
    records = [SrvRecord(0, 0, port, f"n{port}") for port in (1, 2, 3)]
    assert sorted(r.port for r in order_srv(records, random.Random(1))) == [1, 2, 3]


@pytest.fixture
def dns() -> Any:
    with dns_server() as server:
        yield server


def test_nodes_come_from_the_srv_records_in_rfc_2782_order(dns: DnsServer) -> None:
    dns.zone[f"_mqtt._tcp.{NAME}"] = [(20, 0, 1885, "c.example.test."),
                                      (10, 0, 1884, "b.example.test."),
                                      (5, 0, 1883, "a.example.test.")]  # fmt: skip
    entry = BrokerURL("mqtt+srv", NAME, 0, False, username="u", password="p")
    nodes = resolve_brokers(
        [entry, parse_broker_url("mqtt://extra:1")], random.Random(), env=dns.env
    )
    assert [n.url for n in nodes] == [
        "mqtt://a.example.test:1883", "mqtt://b.example.test:1884",
        "mqtt://c.example.test:1885", "mqtt://extra:1",
    ]  # fmt: skip
    assert (nodes[0].username, nodes[0].password) == ("u", "p")
    assert dns.queries == [f"_mqtt._tcp.{NAME}"]


def test_mqtts_srv_asks_secure_mqtt_and_gives_mqtts_nodes(dns: DnsServer) -> None:
    dns.zone[f"_secure-mqtt._tcp.{NAME}"] = [(0, 0, 8883, "a.example.test.")]
    nodes = resolve_brokers([parse_broker_url(f"mqtts+srv://{NAME}")], random.Random(), dns.env)
    assert [n.url for n in nodes] == ["mqtts://a.example.test:8883"]
    assert nodes[0].tls


@pytest.mark.parametrize(("records", "message"), [
    (None, f"_mqtt._tcp.{NAME} does not exist (resolver 127.0.0.1:"),
    ([], f"_mqtt._tcp.{NAME} has no SRV records"),
    ([(0, 0, 0, ".")], "says no MQTT service is offered there"),
], ids=["nxdomain", "no-records", "dot-target"])  # fmt: skip
def test_a_name_without_nodes_is_a_clear_error(
    dns: DnsServer, records: list[Any] | None, message: str
) -> None:
    if records is not None:
        dns.zone[f"_mqtt._tcp.{NAME}"] = records
    with pytest.raises(DiscoveryError) as info:
        resolve_brokers([parse_broker_url(f"mqtt+srv://{NAME}")], random.Random(), dns.env)
    text = str(info.value)
    assert message in text
    assert f"mqtt+srv://{NAME}" in text
    assert f"publish SRV records for _mqtt._tcp.{NAME}" in text
    assert "--broker mqtt://a:1883,mqtt://b:1883" in text


def test_a_silent_resolver_is_a_timeout_that_names_the_setting() -> None:
    with silent_resolver() as address:
        env = {"SETPOINT_DNS_SERVER": address, "SETPOINT_DNS_TIMEOUT": "0.3"}
        with pytest.raises(DiscoveryError) as info:
            resolve_brokers([parse_broker_url(f"mqtt+srv://{NAME}")], random.Random(), env)
    text = str(info.value)
    assert f"resolver {address} did not answer for _mqtt._tcp.{NAME} within 0.3s" in text
    assert "SETPOINT_DNS_SERVER names another" in text


@pytest.mark.parametrize(("env", "message"), [
    ({"SETPOINT_DNS_SERVER": "127.0.0.1:notaport"}, "SETPOINT_DNS_SERVER='127.0.0.1:notaport'"),
    ({"SETPOINT_DNS_SERVER": "localhost:53"},
     "SETPOINT_DNS_SERVER='localhost:53': give the resolver's address as IP or IP:PORT"),
    ({"SETPOINT_DNS_TIMEOUT": "0"}, "SETPOINT_DNS_TIMEOUT='0': give a positive number"),
])  # fmt: skip
def test_bad_dns_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(BrokerURLError) as info:
        brokers.dns_settings(env)
    assert message in str(info.value)


def test_an_ipv6_resolver_with_a_port_is_taken() -> None:
    assert brokers.dns_settings({"SETPOINT_DNS_SERVER": "[::1]:5353"}) == (("::1", 5353), 5.0)
    assert brokers.dns_settings({"SETPOINT_DNS_SERVER": "10.0.0.2"}) == (("10.0.0.2", 53), 5.0)


def test_plain_urls_need_no_dns_and_no_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_dns(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "dns" or name.startswith("dns."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dns)
    plain = parse_broker_list("mqtt://a:1,mqtt://b:2")
    assert resolve_brokers(plain, random.Random()) == plain
    with pytest.raises(MissingResolver) as info:
        resolve_brokers([parse_broker_url(f"mqtt+srv://{NAME}")], random.Random())
    assert "pip install 'setpoint[srv]'" in str(info.value)


def test_one_broker_settings_class_serves_every_side() -> None:
    """The shim, the controller and the dashboard take the kit's BrokerSettings: the
    nodes of a cluster in order, their URLs, and the DNS name they came from."""
    from setpoint import dashboard, device_shim
    from setpoint.controller import broker as controller_broker

    assert device_shim.BrokerSettings is brokers.BrokerSettings
    assert controller_broker.BrokerSettings is brokers.BrokerSettings
    assert dashboard.BrokerSettings is brokers.BrokerSettings
    settings = brokers.BrokerSettings(
        "a", 1883, tls=True, others=(("b", 8883),), discovery=f"mqtts+srv://{NAME}"
    )
    assert settings.endpoints == (("a", 1883), ("b", 8883))
    assert settings.url() == "mqtts://a:1883"
    assert settings.urls == "mqtts://a:1883,mqtts://b:8883"
    assert settings.described == f"mqtts://a:1883,mqtts://b:8883 (from DNS: mqtts+srv://{NAME})"
    assert brokers.BrokerSettings("a").described == "mqtt://a:1883"
    assert "secret" not in repr(brokers.BrokerSettings("a", password="secret"))
