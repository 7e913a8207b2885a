"""lbxdp.exporter without a kernel: a fake map source, a fresh registry, exact sample values."""

from __future__ import annotations

import threading
import urllib.request
from typing import Iterable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lbxdp import abi
from lbxdp.errors import LbxError
from lbxdp.exporter import LbxCollector, make_registry, parse_listen, serve
from lbxdp.maps import Stats
from lbxdp.paths import Instance
from lbxdp.view import AdmissionStatus, AttachRecord, BackendStatus, Health, InstanceStatus, ReasonCount, VipStatus

VIP = "10.112.0.10:8080/tcp"
VIP6 = "[fd00:112::10]:8080/udp"
BE1, BE2 = "10.111.0.11:8080", "10.111.0.12:8080"

ETH0 = InstanceStatus(
    interface="eth0",
    vips=(
        VipStatus(VIP, Stats(100, 6400, 10), (
            BackendStatus(BE1, Stats(60, 3840, 6), True, health=Health("up", passing=True)),
            BackendStatus(BE2, Stats(40, 2560, 4), False, health=Health("down", passing=False)),
        )),
        VipStatus(VIP6, Stats(7, 700, 7), (), admission=AdmissionStatus(allow=2, deny=1)),
    ),
    reasons=(ReasonCount(abi.Reason.TX_FORWARD, 107, 7100), ReasonCount(abi.Reason.PASS_NOT_VIP, 3, 180)),
    flow_entries=17, flow_capacity=65536,
    state=AttachRecord({"version": "0.1.0", "mode": "generic", "prog_id": 42}),
    admission=AdmissionStatus(deny=3, rate=50, burst=100),
)


class FakeSource:
    """Fixed snapshots by interface; an interface in `broken` raises like unreadable pins do."""

    def __init__(self, snaps: Iterable[InstanceStatus], broken: Iterable[str] = (), fail_listing: bool = False):
        self.snaps = {s.interface: s for s in snaps}
        self.broken = set(broken)
        self.fail_listing = fail_listing
        self.reads = 0

    def instances(self) -> list[Instance]:
        if self.fail_listing:
            raise OSError("pin root unreadable")
        return [Instance(i) for i in [*self.snaps, *self.broken]]

    def read(self, inst: Instance) -> InstanceStatus:
        self.reads += 1
        if inst.ifname in self.broken:
            raise LbxError(f"lbxdp is not attached to {inst.label}")
        return self.snaps[inst.ifname]


@pytest.fixture
def registry() -> CollectorRegistry:
    return make_registry(FakeSource([ETH0]), CollectorRegistry())


def test_vip_and_backend_counters_have_exact_values(registry: CollectorRegistry) -> None:
    g = registry.get_sample_value
    assert g("lbxdp_vip_packets_total", {"interface": "eth0", "vip": VIP}) == 100
    assert g("lbxdp_vip_bytes_total", {"interface": "eth0", "vip": VIP}) == 6400
    assert g("lbxdp_vip_new_flows_total", {"interface": "eth0", "vip": VIP}) == 10
    assert g("lbxdp_vip_packets_total", {"interface": "eth0", "vip": VIP6}) == 7
    be1 = {"interface": "eth0", "vip": VIP, "backend": BE1}
    be2 = {"interface": "eth0", "vip": VIP, "backend": BE2}
    assert g("lbxdp_backend_packets_total", be1) == 60
    assert g("lbxdp_backend_bytes_total", be1) == 3840
    assert g("lbxdp_backend_new_flows_total", be1) == 6
    assert g("lbxdp_backend_new_flows_total", be2) == 4
    assert g("lbxdp_backend_in_table", be1) == 1
    assert g("lbxdp_backend_in_table", be2) == 0


def test_backend_health_is_the_checkers_verdict_of_checked_backends_only() -> None:
    unchecked = InstanceStatus("eth1", vips=(VipStatus(VIP, Stats(), (BackendStatus(BE1, Stats(), True),)),))
    reg = make_registry(FakeSource([ETH0, unchecked]), CollectorRegistry())
    g = reg.get_sample_value
    assert g("lbxdp_backend_healthy", {"interface": "eth0", "vip": VIP, "backend": BE1}) == 1
    assert g("lbxdp_backend_healthy", {"interface": "eth0", "vip": VIP, "backend": BE2}) == 0
    assert g("lbxdp_backend_healthy", {"interface": "eth1", "vip": VIP, "backend": BE1}) is None


def test_gauges_info_and_up(registry: CollectorRegistry) -> None:
    g = registry.get_sample_value
    assert g("lbxdp_flow_table_entries", {"interface": "eth0"}) == 17
    assert g("lbxdp_flow_table_capacity", {"interface": "eth0"}) == 65536
    assert g("lbxdp_info", {"interface": "eth0", "version": "0.1.0", "mode": "generic", "prog_id": "42"}) == 1
    assert g("lbxdp_up", {"interface": "eth0"}) == 1
    assert g("lbxdp_scrape_errors_total") == 0


def test_each_scopes_rules_and_limit(registry: CollectorRegistry) -> None:
    """Every scope has its rule counts (0 included: the series exist before the first rule); the
    limit only where one is configured."""
    g = registry.get_sample_value
    glob, v4, v6 = ({"interface": "eth0", "vip": v} for v in ("global", VIP, VIP6))
    assert [g("lbxdp_acl_rules", {**s, "list": k}) for s in (glob, v4, v6) for k in ("allow", "deny")] == \
        [0, 3, 0, 0, 2, 1]
    assert (g("lbxdp_new_flow_limit_rate", glob), g("lbxdp_new_flow_limit_burst", glob)) == (50, 100)
    assert g("lbxdp_new_flow_limit_rate", v4) is None and g("lbxdp_new_flow_limit_burst", v6) is None


def test_every_exit_reason_is_exported_with_its_verdict(registry: CollectorRegistry) -> None:
    g = registry.get_sample_value
    for r in abi.Reason.exits():
        labels = {"interface": "eth0", "verdict": r.verdict, "reason": r.label}
        want = ETH0.reason_counts().get(r, (0, 0))
        assert g("lbxdp_verdict_packets_total", labels) == want[0], r
        assert g("lbxdp_verdict_bytes_total", labels) == want[1], r
    verdicts = {s.labels["verdict"] for m in registry.collect() if m.name == "lbxdp_verdict_packets"
                for s in m.samples}
    assert verdicts == {"tx", "pass", "drop", "abort"}


def test_counter_names_end_in_total_and_names_are_namespaced(registry: CollectorRegistry) -> None:
    families = list(registry.collect())
    assert families
    for m in families:
        for s in m.samples:
            assert s.name.startswith("lbxdp_"), s.name
            if m.type == "counter":
                assert s.name.endswith("_total"), s.name
            else:
                assert not s.name.endswith("_total"), s.name


def test_a_broken_instance_is_up_0_and_does_not_break_the_scrape() -> None:
    source = FakeSource([ETH0], broken=["eth1"])
    reg = make_registry(source, CollectorRegistry())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in reg.collect() for s in m.samples}
    assert samples[("lbxdp_up", (("interface", "eth1"),))] == 0
    assert samples[("lbxdp_up", (("interface", "eth0"),))] == 1
    assert samples[("lbxdp_scrape_errors_total", ())] == 1   # one failed read in this one scrape
    assert samples[("lbxdp_vip_packets_total", (("interface", "eth0"), ("vip", VIP)))] == 100
    # Errors accumulate over scrapes (a counter), and the scrape itself never raises.
    assert reg.get_sample_value("lbxdp_scrape_errors_total") == 2
    # Nothing half-exported for the broken one.
    assert all(s.labels.get("interface") != "eth1" for m in reg.collect() for s in m.samples
               if s.name != "lbxdp_up")


def test_a_failing_listing_gives_no_instances_and_an_error_count() -> None:
    reg = make_registry(FakeSource([ETH0], fail_listing=True), CollectorRegistry())
    assert reg.get_sample_value("lbxdp_up", {"interface": "eth0"}) is None
    assert reg.get_sample_value("lbxdp_scrape_errors_total") >= 1


def test_maps_are_read_at_scrape_time_not_at_registration() -> None:
    source = FakeSource([ETH0])
    reg = CollectorRegistry()
    reg.register(LbxCollector(source))
    assert source.reads == 0
    list(reg.collect())
    list(reg.collect())
    assert source.reads == 2
    # New data in the source is what the next scrape shows: no cached copy.
    source.snaps["eth0"] = InstanceStatus("eth0", vips=(VipStatus(VIP, Stats(101, 6464, 10)),))
    assert reg.get_sample_value("lbxdp_vip_packets_total", {"interface": "eth0", "vip": VIP}) == 101


@pytest.mark.parametrize("listen, want", [
    ("127.0.0.1:9842", ("127.0.0.1", 9842)),
    ("[::1]:9842", ("::1", 9842)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
])
def test_parse_listen(listen: str, want: tuple[str, int]) -> None:
    assert parse_listen(listen) == want


@pytest.mark.parametrize("listen", ["9842", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:0", "h:70000"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(LbxError):
        parse_listen(listen)


def test_serve_exposes_metrics_over_http_and_stops() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = threading.Event()
    lines: list[str] = []
    t = threading.Thread(target=serve, args=(FakeSource([ETH0]), f"127.0.0.1:{port}", lines.append, stop))
    # serve() installs signal handlers, which only the main thread may do: patch that out here.
    import signal as signal_mod
    orig = signal_mod.signal
    signal_mod.signal = lambda *a: None
    try:
        t.start()
        body = None
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                break
            except OSError:
                stop.wait(0.05)
        assert body is not None, lines
    finally:
        stop.set()
        t.join(10)
        signal_mod.signal = orig
    assert not t.is_alive()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    assert fams["lbxdp_vip_packets"].type == "counter"
    assert any(s.value == 100 for s in fams["lbxdp_vip_packets"].samples)
    assert "process_cpu_seconds" in fams


def test_quic_series_only_for_an_instance_with_quic() -> None:
    """ETH0 has no QUIC VIP and counted nothing: no lbxdp_quic_* series (test_view checks the values)."""
    from lbxdp.view import QuicStatus
    quiet = InstanceStatus("eth1", quic=QuicStatus(0, tuple((r, 0) for r in abi.QuicReason if r is not abi.QuicReason.MAX)))
    busy = InstanceStatus("eth2", quic=QuicStatus(1, ((abi.QuicReason.BY_ID, 7), (abi.QuicReason.INITIAL, 1))))
    reg = make_registry(FakeSource([ETH0, quiet, busy]), CollectorRegistry())
    g = reg.get_sample_value
    assert g("lbxdp_quic_packets_total", {"interface": "eth0", "how": "by_id"}) is None
    assert g("lbxdp_quic_packets_total", {"interface": "eth1", "how": "by_id"}) is None
    assert g("lbxdp_quic_packets_total", {"interface": "eth2", "how": "by_id"}) == 7
    assert g("lbxdp_quic_packets_total", {"interface": "eth2", "how": "initial"}) == 1
    assert g("lbxdp_quic_server_ids", {"interface": "eth2"}) == 1
