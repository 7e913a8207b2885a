"""The lab (lbxdp.lab) without root: the product does not import it, and every shape's Layout is
consistent (addresses unique, gateways on-link, VIPs outside the segments, one stub port per
balancer interface)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import lbxdp
from lbxdp.lab import stub
from lbxdp.lab.shapes import CLI, LB, Layout, RigSpec, Shape


def test_the_product_does_not_import_the_lab() -> None:
    product = [m.name for m in pkgutil.iter_modules(lbxdp.__path__)
               if m.name not in ("lab", "__main__") and not m.name.startswith("_ring-")]   # a compiled helper
    code = ("import importlib, sys\n"
            f"for m in {product!r}: importlib.import_module('lbxdp.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('lbxdp.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_echo_programs_import_nothing_of_the_lab_but_themselves() -> None:
    code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
            "try: runpy.run_module('lbxdp.lab.echo', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pyroute2', 'lbxdp.lab.rig', 'lbxdp.model'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("shape", list(Shape), ids=lambda s: s.value)
def test_a_layout_is_consistent(shape: Shape) -> None:
    spec = RigSpec(prefix="lbxunit", shape=shape, backends=4, balancers=3 if shape is Shape.MULTI else 0)
    lay = Layout(spec)
    assert lay.hosts[0] == CLI and len(lay.backends) == 4
    for seg in lay.segments:
        v4 = [lay.addr4(h, seg.name) for h in seg.hosts]
        assert len(set(v4)) == len(v4) and all(a in seg.v4 for a in v4)
        assert not seg.v4.overlaps(spec.vip4_net) and not seg.v6.overlaps(spec.vip6_net)
    for host in lay.hosts:
        for route in lay.routes(host):
            for gw in route.via:
                assert lay.shared_segment(host, gw), (host, gw)   # KeyError if not on-link
    peers = [lay.peer(h, s.name) for s in lay.segments for h in s.hosts]
    assert len(set(peers)) == len(peers) and all(len(p) <= 15 for p in peers)
    assert len(stub.stub_ports(lay)) == sum(len(lay.segments_of(lb)) for lb in lay.balancers)


@pytest.mark.parametrize("bad", [dict(shape="ring"), dict(shape="multi", balancers=1),
                                 dict(shape="l2", balancers=2), dict(shape="multi", balancers=8)])
def test_a_bad_spec_is_refused(bad) -> None:
    with pytest.raises(ValueError):
        RigSpec(prefix="lbxunit", **bad)


def test_the_nat_shape_is_one_armed() -> None:
    """One segment, lb's eth0 the only interface (one stub port), backends route the client's
    addresses (host routes) via lb, lb forwards without sending v4 redirects, backends take none,
    and every host whose frames lbxdp rewrites (client, backends) sends full checksums."""
    lay = Layout(RigSpec(prefix="lbxunit", shape=Shape.NAT, backends=2))
    assert [s.name for s in lay.segments] == ["front"] and lay.segments_of(LB)[0].hosts == (CLI, LB, "be1", "be2")
    assert stub.stub_ports(lay) == [LB] and lay.ifname(LB) == "eth0"
    for be in lay.backends:
        (route,) = lay.routes(be)
        assert (str(route.dst4), str(route.dst6), route.via) == ("10.111.0.2/32", "fd00:111::2/128", (LB,))
        assert lay.sysctls(be)["net.ipv6.conf.default.accept_redirects"] == 0
        assert lay.interface_sysctls(be)["net.ipv4.conf.eth0.accept_redirects"] == 0
        assert not lay.holds_vips(be)
    assert lay.sysctls(LB)["net.ipv4.ip_forward"] == 1
    assert lay.interface_sysctls(LB) == {"net.ipv4.conf.eth0.send_redirects": 0}
    assert lay.tx_checksum_off() == [CLI, "be1", "be2"]
    routed = Layout(RigSpec(prefix="lbxunit", shape=Shape.ROUTED, backends=2))
    assert routed.tx_checksum_off() == [CLI, "be1", "be2"]        # SNAT replies via rt to lb
    assert Layout(RigSpec(prefix="lbxunit")).tx_checksum_off() == [CLI]
