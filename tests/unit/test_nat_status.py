"""NAT in status and the exporter (issue 12) without a kernel: a fixed InstanceStatus with the
conntrack summary, handshake signals and a backend down for passive health -> exact samples,
the --json keys and the status text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from lbxdp.cli.instance import print_status
from lbxdp.conntrack import NatStatus, PortUse
from lbxdp.exporter import make_registry
from lbxdp.maps import Stats
from lbxdp.view import BackendStatus, Handshakes, Health, InstanceStatus, VipStatus

from .test_exporter import FakeSource

VIP, BE1, BE2 = "10.112.0.10:80/tcp", "10.111.0.11:8081", "10.111.0.12:8081"
NAT = NatStatus(131072, {("forward", "established"): 40, ("reply", "established"): 40,
                         ("forward", "closing"): 3, ("reply", "closing"): 3}, 5, (20000, 21023),
                ("10.111.0.3",), (PortUse("10.111.0.3", "tcp", 43),), {"tcp_syn": 10}, 12, 65536)
SNAP = InstanceStatus("eth0", vips=(VipStatus(VIP, Stats(), (
    BackendStatus(BE1, Stats(), False, 0, "", Health("down", passing=False, cause="passive",
                                                     detail="passive: 8 failed handshakes"), Handshakes(8, 8, 0, 0)),
    BackendStatus(BE2, Stats(), True, 1, "", Health("up", passing=True), Handshakes(0, 0, 1, 90))), 0, "nat"),),
    nat=NAT)


def test_nat_families_have_exact_values() -> None:
    g = make_registry(FakeSource([SNAP]), CollectorRegistry()).get_sample_value
    e = {"interface": "eth0"}
    assert g("lbxdp_nat_entries", {**e, "direction": "reply", "state": "closing"}) == 3
    assert g("lbxdp_nat_entries", {**e, "direction": "forward", "state": "established"}) == 40
    assert g("lbxdp_nat_expired_entries", e) == 5 and g("lbxdp_nat_capacity", e) == 131072
    assert g("lbxdp_snat_pool_ports", e) == 1024
    assert g("lbxdp_nat_handshake_entries", e) == 12 and g("lbxdp_nat_handshake_capacity", e) == 65536
    assert g("lbxdp_snat_ports_in_use", {**e, "address": "10.111.0.3", "protocol": "tcp"}) == 43
    assert g("lbxdp_snat_ports_in_use", {**e, "address": "10.111.0.3", "protocol": "udp"}) == 0
    b1, b2 = {**e, "vip": VIP, "backend": BE1}, {**e, "vip": VIP, "backend": BE2}
    assert g("lbxdp_backend_handshake_failures_in_a_row", b1) == 8
    assert g("lbxdp_backend_handshakes_total", {**b1, "result": "syn_rst"}) == 8
    assert g("lbxdp_backend_handshakes_total", {**b2, "result": "synack"}) == 90
    assert g("lbxdp_backend_handshakes_total", {**b2, "result": "syn_retx"}) == 1
    assert g("lbxdp_backend_passive_down", b1) == 1 and g("lbxdp_backend_passive_down", b2) == 0


def test_no_nat_no_nat_series() -> None:
    snap = InstanceStatus("eth1", vips=(VipStatus("10.0.0.1:80/tcp", Stats(), (BackendStatus(BE1, Stats(), True),)),))
    reg = make_registry(FakeSource([snap]), CollectorRegistry())
    names = {s.name for f in reg.collect() for s in f.samples}
    assert not {n for n in names if n.startswith(("lbxdp_nat_", "lbxdp_snat_", "lbxdp_backend_handshake",
                                                  "lbxdp_backend_passive"))}


def test_status_json_and_text_show_nat_and_passive_health(capsys) -> None:
    doc = SNAP.to_json()
    assert doc["nat"]["live"] == 86 and doc["nat"]["expired"] == 5
    assert doc["nat"]["handshakes"] == {"entries": 12, "capacity": 65536}
    assert doc["nat"]["snat_pool"] == {"ports": [20000, 21023], "size": 1024, "sources": ["10.111.0.3"],
                                       "in_use": [{"address": "10.111.0.3", "protocol": "tcp", "ports": 43}]}
    be1 = doc["vips"][0]["backends"][0]
    assert be1["down_cause"] == "passive" and be1["handshakes"] == {"failed_in_a_row": 8, "syn_rst": 8,
                                                                     "syn_retx": 0, "synack": 0}
    print_status(SNAP)
    out = capsys.readouterr().out
    assert "NAT conntrack: 86 live + 5 expired / 131072 entries" in out
    assert "NAT handshake table (new connections, not yet assured): 12 / 65536 entries" in out
    assert "SNAT pool: ports 20000-21023 (1024 per address and protocol) on 10.111.0.3: 10.111.0.3/tcp 43" in out
    assert "down (passive health)" in out
    assert "handshakes: 0 ok, 8 rst, 0 syn retransmitted; 8 failed in a row" in out
