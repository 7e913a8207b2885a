"""[bgp] (issue 14): the config section, the verdicts (which VIPs a node announces), the BIRD config
lbxdp.bgp generates (checked by BIRD's own parser), `birdc show protocols` parsing, the exporter's
families, and BgpService driving a real BIRD (host namespace; its neighbour 192.0.2.1, TEST-NET-1,
is on no link, so BIRD only waits for it: no packet leaves the machine)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from lbxdp import applied, bgp, config, model
from lbxdp.errors import LbxError
from lbxdp.paths import Instance

BASE = """
[bgp]
local_as = 65001
[[bgp.neighbor]]
address = "10.111.1.1"
as = 65000

[[vip]]
address = "10.112.0.10"
port = 8080
protocol = "tcp"
[[vip.backend]]
address = "10.111.1.11"
[[vip.backend]]
address = "10.111.1.12"

[[vip]]
address = "10.112.0.11"
port = 80
protocol = "tcp"
announce = false
[[vip.backend]]
address = "10.111.1.11"
port = 80
"""

needs_bird = pytest.mark.skipif(shutil.which("bird") is None or shutil.which("birdc") is None,
                                reason="BIRD 2 not installed (scripts/install.sh installs bird2)")


def test_a_bgp_section_reads_back_equal_with_its_defaults():
    cfg = config.parse(BASE)
    b = cfg.bgp
    assert b == model.BgpOptions(65001, (model.BgpNeighbor(ipaddress.ip_address("10.111.1.1"), 65000, True),))
    assert (b.announce, b.hold_time, b.withdraw_grace, b.router_id) == (True, 9, 2.0, None)
    assert [v.announce for v in cfg.vips] == [None, False]
    assert config.parse(config.dump(cfg)) == cfg
    assert config.parse(config.dump(dataclasses.replace(cfg, bgp=None, vips=cfg.vips[:1]))).bgp is None


@pytest.mark.parametrize("change, where, says", [
    ("local_as = 65001", "bgp.local_as", "out of range"),
    ("as = 65000", "bgp.neighbor[0].as", "is not an integer"),
    ('address = "10.111.1.1"', "bgp.neighbor[0].address", "not an IPv4 or IPv6 address"),
    ("[[bgp.neighbor]]", "bgp.neighbor", "at least one neighbour"),
    ("local_as = 65001", "bgp.colour", "unknown key"),
    ("local_as = 65001", "bgp.router_id", "is not an IPv4 address"),
    ("local_as = 65001", "bgp.hold_time", "out of range"),
    ("announce = false", "vip[1].announce", "is not true or false"),
])
def test_bad_bgp_input_is_one_clear_line(change, where, says):
    bad = {"bgp.local_as": "local_as = 0", "bgp.neighbor[0].as": 'as = "65000"',
           "bgp.neighbor[0].address": 'address = "10.111.1.300"', "bgp.neighbor": "",
           "bgp.colour": "local_as = 65001\ncolour = 1", "bgp.router_id": 'local_as = 65001\nrouter_id = "fd00::1"',
           "bgp.hold_time": "local_as = 65001\nhold_time = 2", "vip[1].announce": 'announce = "no"'}[where]
    text = BASE.replace(change, bad, 1)
    if where == "bgp.neighbor":
        text = text.replace('address = "10.111.1.1"\nas = 65000\n', "", 1)
    with pytest.raises(LbxError) as e:
        config.parse(text, source="lb.toml")
    assert e.value.exit_code == 2
    assert e.value.message.startswith(f"lb.toml: {where}: ") and says in e.value.message, e.value.message
    assert "\n" not in e.value.message


def test_announce_without_bgp_and_a_family_without_neighbour_are_refused():
    no_bgp = BASE.split("[[vip]]", 1)[1]
    with pytest.raises(LbxError, match=r"vip\[1\].announce: applies only with a \[bgp\] section"):
        config.parse("[[vip]]" + no_bgp)
    v6 = BASE + '\n[[vip]]\naddress = "fd00:112::10"\nport = 80\nprotocol = "tcp"\n[[vip.backend]]\naddress = "fd00::11"\n'
    with pytest.raises(LbxError, match=r"vip\[2\].announce: fd00:112::10 is IPv6 but no \[\[bgp.neighbor\]\] is"):
        config.parse(v6)
    config.parse(v6.replace("[[vip]]", '[[bgp.neighbor]]\naddress = "fd00::1"\nas = 65000\n\n[[vip]]', 1))


def test_verdicts_follow_policy_health_drain_and_attachment():
    cfg = config.parse(BASE)
    v0, v1 = cfg.vips
    ok = bgp.verdicts(cfg, set(), True, "serving")
    assert ok[v0.name] == bgp.Verdict("10.112.0.10/32", True, "usable")
    assert ok[v1.name] == bgp.Verdict("10.112.0.11/32", False, "policy")
    assert bgp.announced(ok) == ["10.112.0.10/32"]
    one_down = {v0.id_of(v0.backends[0])}
    assert bgp.verdicts(cfg, one_down, True, "serving")[v0.name].usable
    all_down = {v0.id_of(b) for b in v0.backends}
    assert bgp.verdicts(cfg, all_down, True, "serving")[v0.name].why == "all-backends-down"
    assert bgp.verdicts(cfg, set(), False, "serving")[v0.name].why == "detached"
    assert bgp.verdicts(cfg, set(), True, "draining")[v0.name].why == "draining"
    assert bgp.announced(bgp.verdicts(cfg, set(), True, "stopping")) == []
    # The global default off, a VIP's own announce = true wins.
    off = dataclasses.replace(cfg, bgp=dataclasses.replace(cfg.bgp, announce=False),
                              vips=(v0, dataclasses.replace(v1, announce=True)))
    assert bgp.announced(bgp.verdicts(off, set(), True, "serving")) == ["10.112.0.11/32"]


def test_an_address_shared_by_vips_is_announced_while_any_of_them_is_usable():
    cfg = config.parse(BASE.replace('address = "10.112.0.11"', 'address = "10.112.0.10"').replace("announce = false\n", ""))
    v0, v1 = cfg.vips
    down = {v0.id_of(b) for b in v0.backends}
    vs = bgp.verdicts(cfg, down, True, "serving")
    assert (vs[v0.name].usable, vs[v1.name].usable) == (False, True)
    assert bgp.announced(vs) == ["10.112.0.10/32"]


@needs_bird
def test_the_generated_bird_config_is_what_bird_parses(tmp_path):
    cfg = config.parse(BASE)
    b = dataclasses.replace(cfg.bgp, router_id=ipaddress.ip_address("10.111.1.3"),
                            source_v4=ipaddress.ip_address("10.111.1.3"),
                            neighbors=cfg.bgp.neighbors + (model.BgpNeighbor(ipaddress.ip_address("fd00::1"), 65001, False),))
    for prefixes in (["10.112.0.10/32", "fd00:112::10/128"], []):
        text = bgp.bird_config(b, prefixes, "eth0")
        f = tmp_path / "bird.conf"
        f.write_text(text)
        p = subprocess.run(["bird", "-p", "-c", str(f)], capture_output=True, text=True, timeout=10)
        assert p.returncode == 0, p.stderr + text
    text = bgp.bird_config(b, ["10.112.0.10/32", "fd00:112::10/128"])
    assert "route 10.112.0.10/32 blackhole;" in text and "route fd00:112::10/128 blackhole;" in text
    assert "local 10.111.1.3 as 65001;" in text and "neighbor 10.111.1.1 as 65000;" in text
    assert "router id 10.111.1.3;" in text
    assert text.count("bfd on;") == 1 and "protocol bfd" in text      # only the first neighbour wants BFD
    assert "direct;" in text                                          # iBGP to fd00::1 (same AS)
    assert 'export where proto = "lbx_vips4"' in text and 'export where proto = "lbx_vips6"' in text
    assert "protocol kernel" not in text                              # the node's own routes stay as they are


SHOW_PROTOCOLS = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     09:38:57.891  
lbx_vips4  Static     master4    up     09:38:57.891  
lbx_n0     BGP        ---        up     09:39:10.740  Established   
lbx_n1     BGP        ---        start  09:39:10.988  Active        Socket: Connection refused
"""


def test_show_protocols_is_read_by_its_columns():
    p = bgp.parse_protocols(SHOW_PROTOCOLS)
    assert p["lbx_n0"] == {"proto": "BGP", "state": "up", "since": "09:39:10.740", "info": "Established"}
    assert p["lbx_n1"]["state"] == "start" and p["lbx_n1"]["info"] == "Active        Socket: Connection refused"
    assert p["device1"]["info"] == ""
    assert bgp.parse_protocols("BIRD 2.0.12 ready.\n") == {}


def test_the_exporter_families_come_from_bgp_json():
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    st = {"node": "draining", "error": None, "vips": {"10.112.0.10:8080/tcp": {"prefix": "10.112.0.10/32",
                                                                                 "announced": False, "why": "draining"}},
          "neighbors": [{"address": "10.111.1.1", "as": 65000, "bfd": True, "state": "up", "info": "Established",
                         "established": True}]}

    class C(Collector):
        def collect(self):
            return bgp.metric_families([SimpleNamespace(interface="eth0", bgp=st), SimpleNamespace(interface="eth1", bgp=None)])
    reg = CollectorRegistry()
    reg.register(C())
    assert reg.get_sample_value("lbxdp_bgp_announced", {"interface": "eth0", "vip": "10.112.0.10:8080/tcp",
                                                        "prefix": "10.112.0.10/32", "why": "draining"}) == 0
    assert reg.get_sample_value("lbxdp_bgp_session_up", {"interface": "eth0", "neighbor": "10.111.1.1",
                                                         "state": "Established"}) == 1
    assert reg.get_sample_value("lbxdp_bgp_node_draining", {"interface": "eth0"}) == 1
    assert reg.get_sample_value("lbxdp_bgp_node_draining", {"interface": "eth1"}) is None


# --- BgpService with a real BIRD ------------------------------------------------------------------

LOOP = BASE.replace('address = "10.111.1.1"\nas = 65000', 'address = "192.0.2.1"\nas = 65000\nbfd = false')


@pytest.fixture
def inst(tmp_path, monkeypatch):
    """An Instance whose pin and run directories are in tmp_path, 'attached' (a prog pin file)."""
    if os.geteuid() != 0:
        pytest.skip("BIRD needs root")
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(tmp_path / "pins"))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    i = Instance("lo")
    i.pin_dir.mkdir(parents=True)
    i.run_dir.mkdir(parents=True)
    i.prog_pin.write_text("")
    return i


def _static_routes(svc: bgp.BgpService) -> str:
    return svc.bird.command("show", "route", "protocol", "lbx_vips4") or ""


@needs_bird
def test_the_service_runs_bird_announces_withdraws_restarts_and_stops(inst):
    cfg = config.parse(LOOP)
    v0 = cfg.vips[0]
    svc = bgp.BgpService(inst)
    svc.start(applied.State(cfg))
    try:
        assert svc.bird.alive(), svc.error
        assert "10.112.0.10/32" in _static_routes(svc) and "10.112.0.11/32" not in _static_routes(svc)
        svc.tick()
        st = bgp.read_status(inst)
        assert st["announced"] == ["10.112.0.10/32"] and st["node"] == "serving" and st["error"] is None
        assert st["neighbors"][0]["address"] == "192.0.2.1" and not st["neighbors"][0]["established"]
        pid = svc.bird.proc.pid
        # Every backend down: withdrawn, with the same BIRD (configure, not a restart).
        down = applied.State(cfg, health={v0.id_of(b): {"healthy": False} for b in v0.backends})
        svc.on_change(down)
        assert "10.112.0.10/32" not in _static_routes(svc) and svc.bird.proc.pid == pid
        svc.tick()
        assert bgp.read_status(inst)["vips"][v0.name] == {"prefix": "10.112.0.10/32", "announced": False,
                                                           "why": "all-backends-down"}
        svc.on_change(applied.State(cfg))
        assert "10.112.0.10/32" in _static_routes(svc)
        # Drained: withdrawn at the next tick; undrained: back.
        bgp.drain_file(inst).write_text("")
        svc.tick()
        assert bgp.read_status(inst)["node"] == "draining" and "10.112.0.10/32" not in _static_routes(svc)
        bgp.drain_file(inst).unlink()
        svc.tick()
        assert bgp.read_status(inst)["announced"] == ["10.112.0.10/32"]
        # BIRD killed: the next tick sees it, a later one starts a new one (backoff 1 s).
        os.kill(pid, signal.SIGKILL)
        svc.bird.proc.wait(5)
        svc.tick()
        assert "bird exited" in (svc.error or "")
        deadline = time.monotonic() + 10
        while not svc.bird.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
            svc.tick()
        assert svc.bird.alive() and svc.bird.proc.pid != pid and svc.restarts == 1
        assert "10.112.0.10/32" in _static_routes(svc) and svc.error is None
    finally:
        svc.state = applied.State(dataclasses.replace(cfg, bgp=dataclasses.replace(cfg.bgp, withdraw_grace=0.0)))
        svc.stop()
    assert not svc.bird.alive() and not svc.bird.ctl.exists()
    assert bgp.read_status(inst)["node"] == "stopping"


def test_a_missing_bird_is_an_error_in_status_not_a_failure(inst):
    svc = bgp.BgpService(inst, bird="/nonexistent/bird")
    svc.start(applied.State(config.parse(LOOP)))
    st = json.loads((inst.run_dir / bgp.STATUS_FILE).read_text())
    assert "No such file" in st["error"] and st["announced"] == [] and st["bird"]["pid"] is None
    svc.stop()
