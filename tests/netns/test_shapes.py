"""The four rig shapes (lbxdp.lab.shapes), without the balancer: each comes up, its hosts reach
the hosts they should by plain routing (through the router where there is one), the router has
the sysctls its shape needs, the peer stub lands on every balancer's bridge port, and nothing is
left afterwards, also when the build fails half-way.

These tests pin the topology without the balancer; tests/netns/test_nat.py, test_routed.py and
test_pmtu.py run lbxdp through the shapes.
"""

from __future__ import annotations

import json

import pytest

from lbxdp.lab import topology
from lbxdp.lab.rig import CLI, RT, SW, Rig, RigError, RigSpec, Shape

SHAPES = {Shape.L2: {}, Shape.NAT: {}, Shape.ROUTED: {}, Shape.MULTI: {"balancers": 2}}


def addr(rig: Rig, role: str, family: int, segment: str | None = None):
    return rig.addr4(role, segment) if family == 4 else rig.addr6(role, segment)


def reach(rig: Rig, pairs: list[tuple[str, str, str | None]]) -> list[str]:
    """Pings (src, dst role, dst segment) in both families; the ones not answered."""
    return [f"{src} -> {dst}{'@' + seg if seg else ''} v{f}" for src, dst, seg in pairs for f in (4, 6)
            if not rig.ping(src, addr(rig, dst, f, seg))]


def gateway(rig: Rig, src: str, dst, family: int) -> str | None:
    (route,) = json.loads(rig.run(src, "ip", "-j", f"-{family}", "route", "get", str(dst)).stdout)
    return route.get("gateway")


def expected_paths(rig: Rig) -> list[tuple[str, str, str | None]]:
    """Who must reach whom in this shape: the client each balancer (and the router), each
    balancer each backend, and each backend the client (its replies' way)."""
    lbs, bes = rig.balancers, rig.backends
    pairs = [(CLI, lb, None) for lb in lbs] + [(lb, be, None) for lb in lbs for be in bes]
    pairs += [(be, CLI, None) for be in bes]
    if rig.spec.shape in (Shape.ROUTED, Shape.MULTI):
        pairs += [(CLI, RT, None)] + [(RT, h, None) for h in [*lbs, *bes]]
    return pairs


@pytest.mark.parametrize("shape", list(SHAPES), ids=lambda s: s.value)
def test_a_shape_comes_up_routes_and_takes_the_stub(rig_factory, shape):
    rig = rig_factory(shape=shape, backends=2, **SHAPES[shape])
    assert reach(rig, expected_paths(rig)) == []
    for family in (4, 6):
        lb_via = gateway(rig, CLI, addr(rig, rig.balancers[0], family), family)
        be_via = gateway(rig, rig.balancers[0], addr(rig, "be1", family), family)
        if shape is Shape.L2:
            assert (lb_via, be_via) == (None, None)            # one segment: on-link
        elif shape is Shape.NAT:
            assert lb_via is None and be_via is None           # one-armed: one segment
            # ... but the backends' replies to the client go via lb (DNAT's return path)
            assert gateway(rig, "be1", addr(rig, CLI, family), family) == str(addr(rig, "lb", family))
        elif shape is Shape.ROUTED:
            assert lb_via == str(addr(rig, RT, family, "front"))
            assert be_via == str(addr(rig, RT, family, "core"))
        else:
            assert lb_via == str(addr(rig, RT, family, "front")) and be_via is None
    rig.attach_peer_stub()
    try:
        links = json.loads(rig.run(SW, "ip", "-j", "link", "show").stdout)
        with_stub = {link["ifname"] for link in links if link.get("xdp", {}).get("mode") == 1}
        want = {rig.peer(lb, seg.name) for lb in rig.balancers for seg in rig.layout.segments_of(lb)}
        assert with_stub == want
    finally:
        rig.detach_peer_stub()


def test_nat_is_one_armed_and_its_replies_cross_lb_without_redirects(rig_factory):
    """The nat shape (one-armed NAT): a backend's packets to the client go to lb's MAC, lb
    forwards them out of the interface they came in on (that is what lbxdp's XDP_TX does for
    NAT replies; without lbxdp the kernel does it), and no redirect teaches the backend a way
    around lb: after pings in both families its route to the client still goes via lb."""
    rig = rig_factory(shape=Shape.NAT, backends=1)
    assert [s.name for s in rig.layout.segments_of("lb")] == ["front"]
    fwd0 = json.loads(rig.run("lb", "ip", "-s", "-j", "link", "show", "eth0").stdout)[0]["stats64"]["tx"]["packets"]
    for _ in range(3):
        assert reach(rig, [("be1", CLI, None)]) == []
    for family in (4, 6):
        assert gateway(rig, "be1", addr(rig, CLI, family), family) == str(addr(rig, "lb", family))
    fwd1 = json.loads(rig.run("lb", "ip", "-s", "-j", "link", "show", "eth0").stdout)[0]["stats64"]["tx"]["packets"]
    assert fwd1 - fwd0 >= 6                            # lb sent the 6 forwarded requests on
    v4 = rig.run("be1", "ip", "-4", "route", "show", "cache").stdout
    assert "redirected" not in v4, v4
    assert rig.run("lb", "sysctl", "-n", "net.ipv4.conf.eth0.send_redirects").stdout.strip() == "0"
    for key in ("net.ipv4.conf.eth0.accept_redirects", "net.ipv6.conf.eth0.accept_redirects"):
        assert rig.run("be1", "sysctl", "-n", key).stdout.strip() == "0"


def test_the_multi_router_spreads_the_vips_over_every_balancer(rig_factory):
    rig = rig_factory(shape=Shape.MULTI, balancers=3, backends=1)
    for family, vip_net in ((4, rig.spec.vip4_net), (6, rig.spec.vip6_net)):
        (route,) = json.loads(rig.run(RT, "ip", "-j", f"-{family}", "route", "show", str(vip_net)).stdout)
        hops = sorted(h["gateway"] for h in route["nexthops"])
        assert hops == sorted(str(addr(rig, lb, family)) for lb in rig.balancers)
    sysctl = {k: rig.run(RT, "sysctl", "-n", k).stdout.strip() for k in (
        "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.ignore_routes_with_linkdown",
        "net.ipv6.conf.all.ignore_routes_with_linkdown", "net.ipv4.fib_multipath_hash_policy",
        "net.ipv6.fib_multipath_hash_policy")}
    assert set(sysctl.values()) == {"1"}, sysctl
    assert rig.run("lb1", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"


@pytest.mark.parametrize("shape", [Shape.NAT, Shape.MULTI], ids=lambda s: s.value)
def test_a_failed_build_of_a_shape_leaves_nothing(monkeypatch, shape):
    def broken(lay):
        raise RigError("injected failure")
    monkeypatch.setattr(topology, "wait_ready", broken)
    rig = Rig(RigSpec(shape=shape, backends=2))
    with pytest.raises(RigError, match="injected"):
        rig.up()
    assert rig.leftovers() == []
