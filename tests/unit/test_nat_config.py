"""NAT mode's config keys (issue 12): [balancer] snat_v4/snat_v6/snat_ports/nat_timeouts, [[vip]]
mode = "nat", snat, [vip.passive_health]; each bad value is one error naming its key."""

from __future__ import annotations

import ipaddress

import pytest

from lbxdp import config, model
from lbxdp.errors import LbxError

BALANCER = '''
[balancer]
snat_v4 = "10.111.0.3"
snat_v6 = "fd00:111::3"
snat_ports = "40000-40999"
nat_timeouts = { tcp_syn = 5, tcp_established = 300, tcp_close = 7, udp = 20 }
'''
VIP = '''
[[vip]]
address = "10.0.9.1"
port = 80
protocol = "tcp"
mode = "nat"
snat = true
'''
BE = '''
  [[vip.backend]]
  address = "10.1.0.5"
  port = 8080
  mac = "02:00:00:00:00:05"
'''
PH = '''
  [vip.passive_health]
  failures = 5
  timeout = 3
  max_ejected = 0.25
'''


def test_a_full_nat_config_parses_and_dumps_back() -> None:
    cfg = config.parse(BALANCER + VIP + PH + BE)
    b = cfg.balancer
    assert b.snat_v4 == ipaddress.IPv4Address("10.111.0.3") and b.snat_v6 == ipaddress.IPv6Address("fd00:111::3")
    assert b.snat_pool == (40000, 40999)
    assert b.nat_timeouts == model.NatTimeouts(tcp_syn=5, tcp_established=300, tcp_close=7, udp=20)
    v = cfg.vips[0]
    assert v.mode is model.Mode.NAT and v.snat and v.mode.routed
    assert v.backends[0].port == 8080   # nat: the backend port is free
    assert v.passive_health == model.PassiveHealth(5, 3.0, 0.25)
    assert config.parse(config.dump(cfg)) == cfg


def test_defaults() -> None:
    cfg = config.parse(VIP.replace("snat = true\n", "") + BE)
    assert cfg.balancer.snat_pool == model.DEFAULT_SNAT_PORTS
    assert cfg.balancer.nat_timeouts == model.NatTimeouts(10, 600, 10, 30)
    assert not cfg.vips[0].snat and cfg.vips[0].passive_health is None
    assert config.parse(config.dump(cfg)) == cfg


def test_one_port_pool_is_a_pool() -> None:
    assert config.parse(BALANCER.replace('"40000-40999"', '"40000"') + VIP + BE).balancer.snat_pool == (40000, 40000)


def test_passive_health_is_valid_on_a_dsr_tcp_vip() -> None:
    """issue 13: [vip.passive_health] on dsr (and ipip/gue) TCP VIPs (bpf/select.h)."""
    cfg = config.parse(VIP.replace('"nat"', '"dsr"').replace("snat = true\n", "") + PH + BE.replace("8080", "80"))
    assert cfg.vips[0].passive_health is not None and cfg.vips[0].passive_health.failures == 5


@pytest.mark.parametrize("text, key, words", [
    (BALANCER.replace('"40000-40999"', '"40999-40000"') + VIP + BE, "balancer.snat_ports", "at least 1 port"),
    (BALANCER.replace('"40000-40999"', '"0-10"') + VIP + BE, "balancer.snat_ports", "out of range"),
    (BALANCER.replace('"40000-40999"', '"many"') + VIP + BE, "balancer.snat_ports", "port range"),
    (BALANCER.replace('"10.111.0.3"', '"fd00::1"') + VIP + BE, "balancer.snat_v4", "is not an IPv4 address"),
    (BALANCER.replace('"10.111.0.3"', '"224.0.0.1"') + VIP + BE, "balancer.snat_v4", "cannot be a SNAT source"),
    (BALANCER.replace("tcp_syn = 5", "tcp_syn = 0") + VIP + BE, "balancer.nat_timeouts.tcp_syn", "out of range"),
    (BALANCER.replace("tcp_syn = 5", "tcp_synn = 5") + VIP + BE, "balancer.nat_timeouts.tcp_synn", "did you mean"),
    (VIP.replace('"nat"', '"dsr"') + BE.replace("8080", "80"), "vip[0].snat", "applies to mode nat only"),
    (VIP.replace('"nat"', '"gue"').replace('"tcp"', '"udp"').replace("snat = true\n", "") + PH + BE.replace("8080", "80"),
     "vip[0].passive_health", "TCP VIPs only"),
    (VIP.replace('"nat"', '"dsr"').replace("snat = true\n", "") + BE, "vip[0].backend[0].port", "cannot rewrite ports"),
    (VIP.replace("snat = true", 'snat = "yes"') + BE, "vip[0].snat", "not true or false"),
    (VIP + PH.replace("failures = 5", "failures = 0") + BE, "vip[0].passive_health.failures", "out of range"),
    (VIP + PH.replace("max_ejected = 0.25", "max_ejected = 2") + BE, "vip[0].passive_health.max_ejected", "share"),
    (VIP + PH.replace("timeout = 3", "timeout = 0") + BE, "vip[0].passive_health.timeout", "seconds"),
    (VIP + PH.replace("failures = 5", "failure = 5") + BE, "vip[0].passive_health.failure", "unknown key"),
    (VIP + BE.replace('"10.1.0.5"', '"fd00::5"'), "vip[0].backend[0].address", "cannot cross address families"),
])
def test_bad_nat_input_is_one_error_naming_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(LbxError) as e:
        config.parse(text)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{key}:") and words in first, first


# --- what needs the interface: lbxdp.nexthop.nat_sources (its addresses faked) -----------------------
@pytest.fixture
def iface(monkeypatch: pytest.MonkeyPatch) -> list:
    from lbxdp import nexthop
    addrs = [ipaddress.ip_address("10.111.0.3"), ipaddress.ip_address("fd00:111::3")]
    monkeypatch.setattr(nexthop, "interface_addresses", lambda ifindex: addrs)
    return addrs


def test_snat_sources_default_to_the_interface(iface: list) -> None:
    from lbxdp import nexthop
    cfg = config.parse(VIP + BE)
    assert nexthop.nat_sources("eth9", 9, cfg) == tuple(iface)


@pytest.mark.parametrize("text, key, words", [
    (BALANCER + VIP + BE, "balancer.snat_v6", "is not an address of eth9"),
    (BALANCER.replace('snat_v6 = "fd00:111::3"\n', "").replace("10.111.0.3", "10.111.0.4") + VIP + BE,
     "balancer.snat_v4", "is not an address of eth9"),
])
def test_a_snat_source_that_is_not_ours_is_refused(iface: list, text: str, key: str, words: str) -> None:
    from lbxdp import nexthop
    iface[1] = ipaddress.ip_address("fd00:111::9")
    with pytest.raises(LbxError) as e:
        nexthop.nat_sources("eth9", 9, config.parse(text))
    assert str(e.value).startswith(f"{key}:") and words in str(e.value).splitlines()[0]


def test_snat_without_a_usable_source_is_refused(iface: list) -> None:
    from lbxdp import nexthop
    iface[:] = [ipaddress.ip_address("fd00:111::3")]   # no IPv4 address on the interface
    with pytest.raises(LbxError) as e:
        nexthop.nat_sources("eth9", 9, config.parse(VIP + BE))
    first = str(e.value).splitlines()[0]
    assert first.startswith("balancer.snat_v4:") and "snat = true" in first
