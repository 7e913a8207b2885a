"""Next hops of ipip/gue backends from the kernel's FIB and neighbour state (lbxdp.nexthop via
control.resolve_macs), and the one-line error for a backend no route reaches.

Builds: one namespace (unique name) holding a veth pair, 10.93.0.1/24 on one end, a route
10.93.5.0/24 via 10.93.0.2 and permanent neighbour entries. Cleanup: the namespace is deleted
even when the test fails.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid

import pytest

from lbxdp import control, model
from lbxdp.errors import LbxError
from lbxdp.lab.namespaces import in_netns

pytestmark = pytest.mark.root

GW_MAC, ONLINK_MAC = "02:93:00:00:00:02", "02:93:00:00:00:09"


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@pytest.fixture
def ns():
    name = f"lbxnh-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        for cmd in (["link", "add", "nh0", "type", "veth", "peer", "name", "nh1"],
                    ["addr", "add", "10.93.0.1/24", "dev", "nh0"], ["link", "set", "nh0", "up"],
                    ["link", "set", "nh1", "up"], ["link", "set", "lo", "up"],
                    ["neigh", "add", "10.93.0.2", "lladdr", GW_MAC, "dev", "nh0", "nud", "permanent"],
                    ["neigh", "add", "10.93.0.9", "lladdr", ONLINK_MAC, "dev", "nh0", "nud", "permanent"],
                    ["route", "add", "10.93.5.0/24", "via", "10.93.0.2", "dev", "nh0"]):
            _ip("-n", name, *cmd)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _cfg(*backends: str, mode: model.Mode = model.Mode.IPIP) -> model.Config:
    return model.Config(vips=(model.Vip(ipaddress.ip_address("10.112.0.10"), 80, model.Protocol.TCP, mode,
                                        backends=tuple(model.Backend(ipaddress.ip_address(b), 80) for b in backends)),))


def test_routed_backend_gets_the_gateway_mac_and_on_link_its_own(ns: str) -> None:
    with in_netns(ns):
        macs = control.resolve_macs("nh0", _cfg("10.93.5.7", "10.93.0.9"))
        own = control.own_addresses("nh0", _cfg("10.93.5.7"))
    assert macs == {ipaddress.ip_address("10.93.5.7"): GW_MAC, ipaddress.ip_address("10.93.0.9"): ONLINK_MAC}
    assert str(own.v4) == "10.93.0.1"


def test_backend_without_route_is_one_error(ns: str) -> None:
    with in_netns(ns), pytest.raises(LbxError) as e:
        control.resolve_macs("nh0", _cfg("10.94.0.1", mode=model.Mode.GUE))
    assert e.value.exit_code == 2
    assert "backend 10.94.0.1 is unreachable: no route" in e.value.message


def test_encap_backend_without_a_source_address_is_one_error(ns: str) -> None:
    with in_netns(ns), pytest.raises(LbxError) as e:
        control.own_addresses("nh0", _cfg("fd00:93::5"))
    assert "no outer source address" in e.value.message and e.value.exit_code == 2
