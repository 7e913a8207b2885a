"""The lab's BGP variant of the multi shape (lbxdp.lab.bgp, lbxdp.lab.shapes): rt has no VIP route
of its own, its BIRD config is what BIRD parses, and a balancer's [bgp] is a valid config."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lbxdp import config
from lbxdp.lab import bgp as labbgp
from lbxdp.lab.shapes import RT, Layout, RigSpec


def layout(**kw) -> Layout:
    return Layout(RigSpec(prefix="lbxtest", shape="multi", balancers=3, backends=2, **kw))


def test_the_bgp_variant_leaves_rt_without_a_vip_route():
    assert layout().routes(RT)[0].via == ("lb1", "lb2", "lb3")
    assert layout(bgp=True).routes(RT) == []
    assert layout(bgp=True).sysctls(RT)["net.ipv4.fib_multipath_hash_policy"] == 1
    with pytest.raises(ValueError, match="bgp: only the multi shape"):
        RigSpec(prefix="lbxtest", bgp=True)
    assert RigSpec(**layout(bgp=True).spec.to_json()).bgp is True    # a persistent rig's state file


@pytest.mark.skipif(shutil.which("bird") is None, reason="BIRD 2 not installed (scripts/install.sh installs bird2)")
@pytest.mark.parametrize("bfd", [True, False])
def test_rt_bird_config_parses_and_peers_with_every_balancer(tmp_path, bfd):
    lay = layout(bgp=True)
    text = labbgp.router_config(lay, bfd=bfd)
    f = tmp_path / "rt.conf"
    f.write_text(text)
    p = subprocess.run(["bird", "-p", "-c", str(f)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr + text
    assert text.count("protocol bgp ") == 6 and text.count("merge paths on;") == 2
    assert f"neighbor {lay.addr4('lb2', 'core')} as {labbgp.NODE_AS};" in text
    assert f"neighbor {lay.addr6('lb3', 'core')} as {labbgp.NODE_AS};" in text
    assert ("protocol bfd" in text) is bfd and (text.count("bfd on;") == 6) is bfd


def test_a_balancers_bgp_config_is_valid_and_the_same_for_every_node():
    lay = layout(bgp=True)

    class FakeRig:   # what node_config reads of a rig
        addr4, addr6 = lay.addr4, lay.addr6
    from lbxdp import model
    import ipaddress
    vip = model.Vip(ipaddress.ip_address("10.112.0.10"), 8080, model.Protocol.TCP,
                    backends=(model.Backend(ipaddress.ip_address("10.111.1.11"), 8080),))
    cfg = config.parse(labbgp.node_config(FakeRig(), (vip,)))
    assert cfg.bgp.local_as == labbgp.NODE_AS and cfg.bgp.router_id is None and cfg.bgp.source_v4 is None
    assert [(str(n.address), n.asn, n.bfd) for n in cfg.bgp.neighbors] == [
        (str(lay.addr4(RT, "core")), labbgp.ROUTER_AS, True), (str(lay.addr6(RT, "core")), labbgp.ROUTER_AS, True)]
