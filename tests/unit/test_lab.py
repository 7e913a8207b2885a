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
from lbxdp.lab.shapes import CLI, Layout, RigSpec, Shape


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
