"""lbxdp.view without a kernel: the typed status from fake maps and a real run directory.

The maps are a fake (control.open_maps patched: VipViews, reasons, a flow count, as lbxdp.maps
returns them) and the interface query is patched; state.json, runtime.json and checks.json are
real files in this test's run root (LBXDP_RUN_ROOT in tmp_path). What is pinned down:
- to_json() is the `lbxdp status --json` document of before the typed view, key for key and in
  the same order (EXPECTED below was printed by the dict-building control.status of ea8d660);
- the exporter (PinnedMaps: the same reader) exports lbxdp_backend_healthy from checks.json with
  the daemon's labels, only for checked backends;
- the CLI's VIP and ADDR:PORT parameter types: values, and a bad value is a usage error (exit 2)
  that the console script prints as lbxdp's one-line error with its hint.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from lbxdp import abi, config, control, model, view
from lbxdp.cli import params
from lbxdp.exporter import PinnedMaps, make_registry
from lbxdp.maps import AclEntry, BackendView, FloodState, Stats, VipView
from lbxdp.paths import Instance

VIP = "10.112.0.10:8080/tcp"
BE1, BE2, BE3 = "10.111.0.11:8080", "10.111.0.12:8080", "10.111.0.13:8080"


class FakeMaps:
    def vip_views(self) -> tuple[VipView, ...]:
        return (VipView(VIP, Stats(100, 6400, 10), (
            BackendView(BE1, Stats(60, 3840, 6), True, 0, "02:00:00:00:00:11"),
            BackendView(BE2, Stats(40, 2560, 4), False, 1, "02:00:00:00:00:12"),
            BackendView(BE3, Stats(0, 0, 0), True, 2, "02:00:00:00:00:13")), 0, "dsr", "maglev", 65537),)

    def reasons(self) -> dict[abi.Reason, tuple[int, int]]:
        return {r: ((107, 7100) if r is abi.Reason.TX_FORWARD else (0, 0)) for r in abi.Reason.exits()[:2]}

    def flow_count(self) -> int:
        return 17

    global_scope = 1024

    def admission(self) -> dict[int, tuple[int, int, int]]:
        # the VIP: new_flow_limit = { rate = 100, burst = 200 } and a v4 allow list; [balancer]: two denies
        return {0: (10_000_000, 199 * 10_000_000, abi.ADMIT_F_ACL_V4 | abi.ADMIT_F_ACL_V6),
                1024: (0, 0, abi.ADMIT_F_ACL_V4 | abi.ADMIT_F_ACL_V6)}

    def acl(self) -> frozenset[AclEntry]:
        net, A = ipaddress.ip_network, abi.AclAction
        return frozenset({AclEntry(0, net("192.0.2.0/24"), A.ALLOW), AclEntry(0, net("0.0.0.0/0"), A.NOT_ALLOWED),
                          AclEntry(0, net("::/0"), A.NOT_ALLOWED), AclEntry(1024, net("198.51.100.0/24"), A.DENY),
                          AclEntry(1024, net("2001:db8:bad::/48"), A.DENY)})

    class flow_map:
        class info:
            max_entries = 65536

    def flood(self) -> FloodState:
        return FloodState(threshold=200, cpus_flooded=1, skipped=5, half_open_written=9)

    def half_open_entries(self) -> int:
        return 3

    def half_open_capacity(self) -> int:
        return 16384

    def conns(self) -> dict:
        return {}

    quic = {abi.QuicReason.BY_ID: 0}   # issue 13: lbx_quic_stats (tests set other counts)
    ids: dict = {}

    def quic_ids(self) -> dict:
        return dict(self.ids)

    def quic_stats(self) -> dict[abi.QuicReason, int]:
        return {r: self.quic.get(r, 0) for r in abi.QuicReason if r is not abi.QuicReason.MAX}

    vip_quic: dict = {}        # VIP id -> {reason: n} (lbx_quic_vip)
    overflows: dict = {}       # VIP id -> n (lbx_overflows)
    backup_ids: dict = {}      # VIP id -> backup entry ids (lbx_backups)

    def quic_vip_stats(self, vip_ids) -> dict:
        return {v: {r: self.vip_quic.get(v, {}).get(r, 0) for r in abi.QuicReason if r is not abi.QuicReason.MAX}
                for v in vip_ids}

    def backup_overflows(self) -> dict[int, int]:
        return dict(self.overflows)

    def backups(self, vip_id: int) -> list[int]:
        return list(self.backup_ids.get(vip_id, []))

    class _HalfOpen:
        class info:
            max_entries = 16384
    m = {abi.Map.HALF_OPEN: _HalfOpen}


STATE = {"ifname": "eth0", "netns": None, "mode": "generic", "prog_id": 42, "attached_at": 1700000000.0,
         "config": "/etc/lbxdp/lb.toml", "version": "0.1.0"}
RUNTIME = {"draining": {}, "joined": {},
           "health": {f"{VIP}|{BE2}": {"healthy": False, "since": 1700000100.0, "detail": "refused", "latency": 0.001}},
           "overrides": {f"{VIP}|{BE3}": "up"}}
CHECKS = {f"{VIP}|{BE1}": {"healthy": True, "since": 1700000050.0, "checks": 9, "last": "connected", "ok": True,
                           "latency": 0.0005, "at": 1700000200.0},
          f"{VIP}|{BE2}": {"healthy": False, "since": 1700000100.0, "checks": 9, "last": "refused", "ok": False,
                           "latency": 0.001, "at": 1700000200.0}}

EXPECTED = {
    "interface": "eth0", "netns": None, "pin_dir": "PIN/eth0",
    "xdp": {"attached": True, "prog_id": 42, "mode": "generic"},
    "state": STATE,
    "vips": [{"vip": VIP, "id": 0, "mode": "dsr", "scheduler": "maglev", "table_size": 65537,
              "packets": 100, "bytes": 6400, "new_flows": 10, "backends": [
                  {"backend": BE1, "id": 0, "mac": "02:00:00:00:00:11", "in_table": True, "packets": 60, "bytes": 3840,
                   "new_flows": 6, "health": "up", "forced": None, "health_since": 1700000050.0,
                   "last_check": "connected", "check_latency": 0.0005, "last_check_at": 1700000200.0, "checks": 9,
                   "down_cause": None, "down_detail": None, "handshakes": None, "connections": None},   # keys added for issue 12
                  {"backend": BE2, "id": 1, "mac": "02:00:00:00:00:12", "in_table": False, "packets": 40,
                   "bytes": 2560, "new_flows": 4, "health": "down", "forced": None, "health_since": 1700000100.0,
                   "last_check": "refused", "check_latency": 0.001, "last_check_at": 1700000200.0, "checks": 9,
                   "down_cause": "active", "down_detail": "refused", "handshakes": None, "connections": None},
                  {"backend": BE3, "id": 2, "mac": "02:00:00:00:00:13", "in_table": True, "packets": 0, "bytes": 0,
                   "new_flows": 0, "health": "up", "forced": "up", "health_since": None, "last_check": None,
                   "check_latency": None, "last_check_at": None, "checks": None,
                   "down_cause": None, "down_detail": None, "handshakes": None, "connections": None}],
              "admission": {"allow_rules": 1, "deny_rules": 0, "new_flow_limit": {"rate": 100, "burst": 200},
                            "acl_kernel_trie": []},
              "quic": None, "backup_overflows": None}],                  # issue 13: not a QUIC VIP, no backups
    "reasons": [{"reason": "forward", "verdict": "tx", "packets": 107, "bytes": 7100},
                {"reason": "not_ip", "verdict": "pass", "packets": 0, "bytes": 0}],
    "flows": {"entries": 17, "capacity": 65536},
    "admission": {"allow_rules": 0, "deny_rules": 2, "new_flow_limit": None,   # keys added for issue 11
                  "acl_kernel_trie": []},
    "gate": {"half_open": {"entries": 3, "capacity": 16384, "written": 9},      # issue 11: the handshake gate
             "flood": {"threshold": 200, "cpus_flooded": 1, "inserts_skipped": 5}},
    "nat": None,                                                                 # issue 12: no NAT VIP
    "quic": {"server_ids": 0, "packets": {"by_id": 0, "initial": 0, "unknown_id": 0, "down_id": 0,   # issue 13
                                          "short_cid": 0, "other": 0}},
    "config_source": None,                                                       # issue 14: no etcd source
    "bgp": None,                                                                 # issue 14: no [bgp]
}


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Instance:
    """eth0 with its run directory written (state, an empty applied config, runtime, checks) and
    fake maps. Cleanup: tmp_path."""
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(tmp_path / "pin"))
    i = Instance("eth0")
    i.run_dir.mkdir(mode=0o700, parents=True)
    for d in (tmp_path / "run", tmp_path / "pin"):
        d.mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o700)
    i.state_file.write_text(json.dumps(STATE))
    i.applied_file.write_text(config.dump(model.Config()))
    i.runtime_file.write_text(json.dumps(RUNTIME))
    i.checks_file.write_text(json.dumps(CHECKS))

    @contextmanager
    def open_maps(_: Instance) -> Iterator[FakeMaps]:
        yield FakeMaps()
    monkeypatch.setattr(control, "open_maps", open_maps)
    monkeypatch.setattr(view, "_xdp", lambda _: view.Xdp(True, 42, "generic"))
    return i


def test_status_to_json_is_the_status_document(inst: Instance, tmp_path: Path) -> None:
    st = control.status(inst)
    want = json.loads(json.dumps(EXPECTED).replace("PIN", str(tmp_path / "pin")))
    assert json.dumps(st.to_json()) == json.dumps(want)   # same keys, same order
    be1, be2, be3 = st.vips[0].backends
    assert (be1.health.passing, be2.health.passing, be3.health.passing) == (True, False, None)
    assert be3.health.forced is model.HealthOverride.UP
    assert st.vips[0].backend_id(be2) == model.BackendId.parse(f"{VIP}|{BE2}")


def test_status_shows_each_scopes_rules_and_limit(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    """Counted from the live trie (an allow list's implicit "not allowed" /0s are no rules) and
    lbx_admit (rate and burst back from the nanoseconds); the text names both scopes."""
    from lbxdp.cli.instance import print_status
    st = control.status(inst)
    assert st.admission == view.AdmissionStatus(0, 2, None, None)
    assert st.vips[0].admission == view.AdmissionStatus(1, 0, 100, 200)
    print_status(st)
    out = capsys.readouterr().out
    assert "admission of new flows (every VIP): allow 0 rules, deny 2, no limit" in out
    assert f"admission: allow 1 rules, deny 0, limit 100/s, burst 200" in out


def test_status_without_a_daemon_is_unchecked(inst: Instance) -> None:
    inst.checks_file.unlink()
    inst.runtime_file.unlink()
    st = control.status(inst)
    assert [b.health.state for b in st.vips[0].backends] == ["unchecked"] * 3
    assert [b.to_json()["health"] for b in st.vips[0].backends] == ["unchecked"] * 3


def test_the_exporter_exports_backend_health_from_the_run_directory(inst: Instance) -> None:
    reg = make_registry(PinnedMaps(None, ["eth0"]), CollectorRegistry())
    g = reg.get_sample_value
    assert g("lbxdp_backend_healthy", {"interface": "eth0", "vip": VIP, "backend": BE1}) == 1
    assert g("lbxdp_backend_healthy", {"interface": "eth0", "vip": VIP, "backend": BE2}) == 0
    assert g("lbxdp_backend_healthy", {"interface": "eth0", "vip": VIP, "backend": BE3}) is None   # not checked
    assert g("lbxdp_backend_packets_total", {"interface": "eth0", "vip": VIP, "backend": BE1}) == 60
    assert g("lbxdp_info", {"interface": "eth0", "version": "0.1.0", "mode": "generic", "prog_id": "42"}) == 1
    # The daemon rewrites checks.json: the next scrape shows it.
    inst.checks_file.write_text(json.dumps({k: v | {"healthy": True} for k, v in CHECKS.items()}))
    assert g("lbxdp_backend_healthy", {"interface": "eth0", "vip": VIP, "backend": BE2}) == 1


# --- the CLI's parameter types -------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("10.0.0.1:80/tcp", model.VipKey(ipaddress.ip_address("10.0.0.1"), 80, model.Protocol.TCP)),
    ("[fd00::1]:53/udp", model.VipKey(ipaddress.ip_address("fd00::1"), 53, model.Protocol.UDP)),
    ("10.0.0.1:*/tcp", model.VipKey(ipaddress.ip_address("10.0.0.1"), 0, model.Protocol.TCP)),
])
def test_vip_type_converts(text: str, want: model.VipKey) -> None:
    assert params.VIP.convert(text, None, None) == want


@pytest.mark.parametrize("text, message", [
    ("10.0.0.1:80/sctp", "VIP '10.0.0.1:80/sctp': 'sctp' is not a protocol; use tcp or udp"),
    ("10.0.0.1:80", "VIP '10.0.0.1:80' has no protocol"),
    ("10.0.0.300:80/tcp", "VIP '10.0.0.300:80' is not ADDRESS:PORT"),
    ("fd00::1:80/udp", "VIP 'fd00::1:80' is not ADDRESS:PORT"),
])
def test_vip_type_refuses_with_the_usual_words(text: str, message: str) -> None:
    with pytest.raises(click.BadParameter) as ei:
        params.VIP.convert(text, None, None)
    assert ei.value.message == message and ei.value.exit_code == 2 and ei.value.hint


@pytest.mark.parametrize("text", ["10.0.0.1", "x:80", "10.0.0.1:70000", "[10.0.0.1]:80"])
def test_endpoint_type_refuses(text: str) -> None:
    with pytest.raises(click.BadParameter) as ei:
        params.BACKEND.convert(text, None, None)
    assert ei.value.message == f"backend {text!r} is not ADDRESS:PORT"


def test_a_bad_value_is_a_usage_error_and_one_lbxdp_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lbxdp import cli
    r = CliRunner().invoke(cli.cli, ["backend", "del", "-i", "eth0", VIP, "10.111.0.300:80"])
    assert r.exit_code == 2 and "Invalid value for 'BACKEND'" in r.output   # click's usage error
    monkeypatch.setattr(sys, "argv", ["lbxdp", "backend", "del", "-i", "eth0", VIP, "10.111.0.300:80"])
    with pytest.raises(SystemExit) as ei:
        cli.main()
    err = capsys.readouterr().err
    assert ei.value.code == 2
    assert err.splitlines() == ["lbxdp: error: backend '10.111.0.300:80' is not ADDRESS:PORT",
                                "  hint: write it like 10.0.0.1:80 or [fd00::1]:80"]


def test_enum_choices_give_members() -> None:
    t = params.EnumChoice(model.XdpMode)
    assert t.convert("generic", None, None) is model.XdpMode.GENERIC
    assert list(t.choices) == ["auto", "native", "generic"]
    only = params.EnumChoice(model.Scheduler, only=(model.Scheduler.RR, model.Scheduler.HASH))
    with pytest.raises(click.BadParameter):
        only.convert("maglev", None, None)




def test_status_and_the_exporter_show_the_handshake_gate(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    """Half-open entries and the flood state (bpf/select.h): a line of `status`, five series."""
    from lbxdp.cli.instance import print_status
    st = control.status(inst)
    assert st.gate == view.GateStatus(3, 16384, 200, 1, 5, 9)
    print_status(st)
    assert "half-open: 3 / 16384 entries; new-flow flood: 1 CPU(s) over 200/s, 5 records skipped" in capsys.readouterr().out

    class Source:
        def instances(self) -> list[Instance]:
            return [inst]

        def read(self, i: Instance) -> view.InstanceStatus:
            return st
    reg = make_registry(Source(), CollectorRegistry())
    got = {n: reg.get_sample_value(n, {"interface": "eth0"}) for n in (
        "lbxdp_half_open_entries", "lbxdp_flood_threshold", "lbxdp_flood_cpus",
        "lbxdp_flood_inserts_skipped_total", "lbxdp_half_open_written_total")}
    assert got == {"lbxdp_half_open_entries": 3, "lbxdp_flood_threshold": 200, "lbxdp_flood_cpus": 1,
                   "lbxdp_flood_inserts_skipped_total": 5, "lbxdp_half_open_written_total": 9}


def test_status_and_the_exporter_show_quic_routing(inst: Instance, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """lbx_quic_ids' size and lbx_quic_stats (bpf/quic.h): a line of `status` only when a QUIC VIP
    is configured, the JSON counts by reason, and lbxdp_quic_packets_total{how} per reason."""
    from lbxdp.cli.instance import print_status
    Q = abi.QuicReason
    st = control.status(inst)
    assert not st.quic.active
    print_status(st)
    assert "QUIC" not in capsys.readouterr().out
    monkeypatch.setattr(FakeMaps, "ids", {(0, 0x101): (0, 1, 0), (0, 0x202): (1, 1, 0)})
    monkeypatch.setattr(FakeMaps, "quic", {Q.BY_ID: 40, Q.INITIAL: 6, Q.UNKNOWN_ID: 3, Q.DOWN_ID: 2,
                                           Q.SHORT_CID: 1, Q.OTHER: 5})
    st = control.status(inst)
    assert st.quic.active and st.quic.ids == 2 and st.quic.count(Q.BY_ID) == 40
    assert st.to_json()["quic"] == {"server_ids": 2, "packets": {"by_id": 40, "initial": 6, "unknown_id": 3,
                                                                 "down_id": 2, "short_cid": 1, "other": 5}}
    print_status(st)
    assert ("QUIC: 2 server id(s); packets the connection table did not know: 40 routed by id, 6 initial/0-RTT "
            "by the table, 6 fell back (unknown id 3, down id 2, short CID 1), 5 other") in capsys.readouterr().out

    class Source:
        def instances(self) -> list[Instance]:
            return [inst]

        def read(self, i: Instance) -> view.InstanceStatus:
            return st
    reg = make_registry(Source(), CollectorRegistry())
    got = {how: reg.get_sample_value("lbxdp_quic_packets_total", {"interface": "eth0", "how": how})
           for how in ("by_id", "initial", "unknown_id", "down_id", "short_cid", "other")}
    assert got == {"by_id": 40, "initial": 6, "unknown_id": 3, "down_id": 2, "short_cid": 1, "other": 5}
    assert reg.get_sample_value("lbxdp_quic_server_ids", {"interface": "eth0"}) == 2


def test_status_and_the_exporter_show_quic_and_overflows_per_vip(inst: Instance, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: a QUIC VIP's own counts (lbx_quic_vip) and a VIP's backup overflows (lbx_overflows)
    under its row in `status`, in its --json object and as lbxdp_vip_quic_packets_total{vip,how} and
    lbxdp_vip_backup_overflows_total{vip}; a VIP with neither shows none of them (the first test)."""
    from lbxdp.cli.instance import print_status
    Q = abi.QuicReason
    monkeypatch.setattr(FakeMaps, "ids", {(0, 0x101): (0, 1, 0)})
    monkeypatch.setattr(FakeMaps, "vip_quic", {0: {Q.BY_ID: 12, Q.INITIAL: 4, Q.DOWN_ID: 2}})
    monkeypatch.setattr(FakeMaps, "backup_ids", {0: [2]})
    monkeypatch.setattr(FakeMaps, "overflows", {0: 9})
    st = control.status(inst)
    v = st.vips[0]
    assert v.backup_overflows == 9 and dict(v.quic or ())[Q.BY_ID] == 12
    j = st.to_json()["vips"][0]
    assert j["quic"] == {"by_id": 12, "initial": 4, "unknown_id": 0, "down_id": 2, "short_cid": 0, "other": 0}
    assert j["backup_overflows"] == 9
    print_status(st)
    out = capsys.readouterr().out
    assert ("    QUIC packets the connection table did not know: 12 routed by id, 4 initial/0-RTT by the table, "
            "2 fell back (unknown id 0, down id 2, short CID 0), 0 other") in out
    assert "    backup overflows: 9 new flows sent to a backup (every primary full)" in out

    class Source:
        def instances(self) -> list[Instance]:
            return [inst]

        def read(self, i: Instance) -> view.InstanceStatus:
            return st
    reg = make_registry(Source(), CollectorRegistry())
    got = {how: reg.get_sample_value("lbxdp_vip_quic_packets_total", {"interface": "eth0", "vip": VIP, "how": how})
           for how in ("by_id", "initial", "unknown_id", "down_id", "short_cid", "other")}
    assert got == {"by_id": 12, "initial": 4, "unknown_id": 0, "down_id": 2, "short_cid": 0, "other": 0}
    assert reg.get_sample_value("lbxdp_vip_backup_overflows_total", {"interface": "eth0", "vip": VIP}) == 9

    # backups configured but nothing overflowed yet: the series is there at 0 (rate() needs it)
    monkeypatch.setattr(FakeMaps, "overflows", {})
    st = control.status(inst)
    assert st.vips[0].backup_overflows == 0
    # no backups and nothing counted: no line, no series
    monkeypatch.setattr(FakeMaps, "backup_ids", {})
    monkeypatch.setattr(FakeMaps, "ids", {})
    st = control.status(inst)
    assert st.vips[0].backup_overflows is None and st.vips[0].quic is None
    reg = make_registry(Source(), CollectorRegistry())
    assert reg.get_sample_value("lbxdp_vip_backup_overflows_total", {"interface": "eth0", "vip": VIP}) is None
