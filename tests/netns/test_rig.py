"""The rig itself, without the balancer: addressing, reachability, the echo servers' contract,
the settings DSR depends on, the native-mode peer stub, and that nothing outlives a teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections import Counter

import pytest

from lbxdp.lab.processes import python_env
from lbxdp.lab.rig import CLI, FAILED, LB, Rig, RigError, RigSpec, Server

FAMILIES = [4, 6]


def addr(rig: Rig, role: str, family: int):
    return rig.addr4(role) if family == 4 else rig.addr6(role)


def vip(rig: Rig, family: int):
    return rig.spec.vip4 if family == 4 else rig.spec.vip6


def sysctl(rig: Rig, role: str, key: str) -> str:
    return rig.run(role, "sysctl", "-n", key).stdout.strip()


def test_every_host_has_its_addresses_usable_at_once(rig):
    for role in rig.hosts:
        (link,) = json.loads(rig.run(role, "ip", "-j", "addr", "show", "dev", "eth0").stdout)
        assert link["address"] == rig.mac(role)
        assert link["operstate"] == "UP"
        have = {(a["local"], a["prefixlen"]) for a in link["addr_info"]}
        assert {(str(rig.addr4(role)), 24), (str(rig.addr6(role)), 64)} <= have
        assert not [a for a in link["addr_info"] if a.get("tentative")], "DAD should be off"


@pytest.mark.parametrize("family", FAMILIES)
def test_client_pings_lb_and_every_backend(rig, family):
    unanswered = [r for r in (LB, *rig.backends) if not rig.ping(CLI, addr(rig, r, family))]
    assert not unanswered


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_each_backend_answers_on_its_own_address(rig, proto, family):
    for be in rig.backends:
        names = (rig.tcp_names if proto == "tcp" else rig.udp_names)(addr(rig, be, family), count=3,
                                                                       timeout=10)
        assert names == Counter({be: 3}), f"{proto} to {be}"


def test_tcp_echo_returns_a_megabyte_whole(rig):
    res = rig.client("tcp", rig.addr4("be1"), count=1, timeout=10, try_timeout=5,
                     payload_size=1 << 20)
    assert (res["names"], res["failed"]) == ({"be1": 1}, 0), res["errors"]


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_replies_to_the_vip_come_from_the_vip(rig, family):
    # What DSR needs: asked on the VIP (held on lo), the server must answer from the VIP, not from
    # eth0's address. The client's socket is connected, so a reply from elsewhere is dropped.
    for be in rig.backends:
        assert rig.udp_names(vip(rig, family), count=2, timeout=10, src=be) == Counter({be: 2})


@pytest.mark.parametrize("family", FAMILIES)
def test_client_routes_the_vip_through_lb(rig, family):
    (route,) = json.loads(rig.run(CLI, "ip", "-j", f"-{family}", "route", "get",
                                  str(vip(rig, family))).stdout)
    assert (route["gateway"], route["dev"]) == (str(addr(rig, LB, family)), "eth0")


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_balancer_the_vip_is_unreachable(rig, family):
    # lb neither forwards nor holds the VIP: anything answering would be a leak around lbxdp.
    assert sysctl(rig, LB, "net.ipv4.ip_forward") == "0"
    assert rig.tcp_names(vip(rig, family), count=1, timeout=5, try_timeout=0.5) == Counter({FAILED: 1})
    assert rig.udp_names(vip(rig, family), count=1, timeout=5, try_timeout=0.5) == Counter({FAILED: 1})


def test_dsr_settings(rig):
    for be in rig.backends:
        for scope in ("all", "eth0"):
            assert sysctl(rig, be, f"net.ipv4.conf.{scope}.arp_ignore") == "1"
            assert sysctl(rig, be, f"net.ipv4.conf.{scope}.arp_announce") == "2"
            assert sysctl(rig, be, f"net.ipv4.conf.{scope}.rp_filter") == "0"
        lo = rig.run(be, "ip", "-br", "addr", "show", "dev", "lo").stdout
        assert f"{rig.spec.vip4}/32" in lo and f"{rig.spec.vip6}/128" in lo
    assert "tx-checksumming: off" in rig.run(CLI, "ethtool", "-k", "eth0").stdout
    neigh = rig.run(LB, "ip", "neigh", "show", "dev", "eth0").stdout
    for be in rig.backends:
        assert f"{rig.addr4(be)} lladdr {rig.mac(be)} PERMANENT" in neigh


def test_lb_config_lists_every_backend_with_its_mac(rig):
    cfg = tomllib.loads(rig.lb_config_toml(scheduler="hash"))
    got = {(v["address"], v["protocol"]): [(b["address"], b["mac"]) for b in v["backend"]]
           for v in cfg["vip"]}
    assert {v["mode"] for v in cfg["vip"]} == {"dsr"}
    assert {v["scheduler"] for v in cfg["vip"]} == {"hash"}
    for family in FAMILIES:
        want = [(str(addr(rig, be, family)), rig.mac(be)) for be in rig.backends]
        for proto in ("tcp", "udp"):
            assert got[(str(vip(rig, family)), proto)] == want
    bare = tomllib.loads(rig.lb_config_toml(with_mac=False))
    assert [b for v in bare["vip"] for b in v["backend"] if "mac" in b] == []


def test_peer_stub_attaches_in_native_mode(native_peer):
    link = json.loads(native_peer.run("sw", "ip", "-j", "link", "show", "dev", "lb").stdout)[0]
    assert link["xdp"]["mode"] == 1  # XDP_ATTACHED_DRV
    assert link["xdp"]["prog"]["name"] == "xdp_stub"


def test_peer_stub_detaches(rig):
    rig.attach_peer_stub()
    rig.detach_peer_stub()
    rig.detach_peer_stub()  # idempotent
    assert "xdp" not in json.loads(rig.run("sw", "ip", "-j", "link", "show", "dev", "lb").stdout)[0]


def test_a_failed_build_leaves_nothing(monkeypatch):
    # Fail after every server has been started, the worst moment: all kinds of things exist.
    started = []
    real = Rig._wait_server

    def flaky(self, role):
        started[:] = self.servers.values()
        if role == self.backends[-1]:
            raise RigError("injected failure")
        real(self, role)

    monkeypatch.setattr(Rig, "_wait_server", flaky)
    rig = Rig(RigSpec(backends=2))
    with pytest.raises(RigError, match="injected"):
        rig.up()
    assert len(started) == 2
    assert rig.leftovers() == []
    assert [s.pid for s in started if os.path.exists(f"/proc/{s.pid}")] == []  # killed and reaped


def test_a_second_rig_with_the_same_prefix_is_refused_and_harms_nothing(rig):
    other = Rig(RigSpec(prefix=rig.spec.prefix))
    with pytest.raises(RigError, match="already exists"):
        other.up()
    assert rig.tcp_names(rig.addr4("be1"), count=1) == Counter({"be1": 1})


def test_persistent_rig_is_taken_down_by_another_process():
    spec = RigSpec(backends=1)
    code = ("from lbxdp.lab.rig import Rig, RigSpec; "
            f"print(Rig(RigSpec(prefix={spec.prefix!r}, backends=1)).up(persistent=True)"
            f".state_path({spec.prefix!r}))")
    path = Rig.state_path(spec.prefix)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=python_env())
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(path)
        rig = Rig.load_state(path)
        (srv,) = rig.servers.values()
        assert srv.alive(), "the server should outlive the process that built the rig"
        assert rig.tcp_names(rig.addr6("be1"), count=1) == Counter({"be1": 1})
    finally:
        if path.exists():
            Rig.load_state(path).down()
    assert rig.leftovers() == [] and not path.exists()
    # Exited. (Orphaned, it is reaped by PID 1, which may take its time: a zombie is not alive.)
    assert not srv.alive()


def test_a_rig_whose_builder_was_killed_can_be_adopted_and_removed():
    # SIGKILL gives no chance to clean up: the servers die with their parent (PR_SET_PDEATHSIG),
    # the namespaces stay until Rig.adopt(prefix).down() removes them.
    spec = RigSpec(backends=2)
    code = ("import os, signal; from lbxdp.lab.rig import Rig, RigSpec; "
            f"r = Rig(RigSpec(prefix={spec.prefix!r}, backends=2)).up(); "
            "print(*[f'{s.pid}:{s.start_time}' for s in r.servers.values()], flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=python_env())
        servers = [Server(*map(int, w.split(":"))) for w in out.stdout.split()]
        assert out.returncode == -9 and len(servers) == 2, out.stderr
        assert len(Rig.adopt(spec.prefix).leftovers()) == 5  # namespaces sw, cli, lb, be1, be2
    finally:
        Rig.adopt(spec.prefix).down()
    assert Rig.adopt(spec.prefix).leftovers() == []
    assert not [s.pid for s in servers if s.alive()]


def test_rig_commands_never_pick_a_rig_by_themselves(tmp_path):
    """`lbxdp rig`: up takes --prefix (checked: syntax, not in use); down needs a PREFIX or --all;
    exec and config refuse to pick when several rigs are up. Two persistent rigs, state kept
    under this test's own run root. Cleanup: `rig down --all` there, then nothing of either left."""
    import secrets
    env = dict(os.environ, LBXDP_RUN_ROOT=str(tmp_path / "run"))
    p1, p2 = (f"t{secrets.token_hex(3)[:5]}{i}" for i in (1, 2))

    def lbxdp(*argv):
        return subprocess.run([sys.executable, "-m", "lbxdp", "rig", *argv], capture_output=True, text=True,
                              timeout=120, env=env)

    try:
        for p in (p1, p2):
            up = lbxdp("up", "--backends", "1", "--prefix", p)
            assert up.returncode == 0, up.stderr
            assert f"rig {p} is up" in up.stdout and f"rig exec --prefix {p} cli" in up.stdout
            assert f"rig down {p}" in up.stdout and "sudo" not in up.stdout
        taken = lbxdp("up", "--backends", "1", "--prefix", p1)
        assert taken.returncode == 2 and "is in use" in taken.stderr, taken.stderr
        for bad in ("X1", "a", "a-b", "abcdefghijklm", "1ab"):
            r = lbxdp("up", "--prefix", bad)
            assert r.returncode == 2 and "not 2-12 characters" in r.stderr, (bad, r.stderr)

        down = lbxdp("down")
        assert down.returncode == 2 and p1 in down.stderr and p2 in down.stderr and "--all" in down.stderr
        for argv in (["exec", "cli", "--", "true"], ["config"]):
            r = lbxdp(*argv)
            assert r.returncode == 2 and "say which" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert all(Rig.adopt(p).leftovers() for p in (p1, p2)), "a refused command removed a rig"

        r = lbxdp("exec", "--prefix", p1, "cli", "--", "ip", "-br", "addr", "show", "dev", "eth0")
        assert r.returncode == 0 and "10.111.0.2/24" in r.stdout, r
        assert lbxdp("down", p1).returncode == 0
        assert Rig.adopt(p1).leftovers() == [] and Rig.adopt(p2).leftovers()
        r = lbxdp("exec", "cli", "--", "true")      # one rig left: it is the one
        assert r.returncode == 0, r.stderr
        assert lbxdp("down", "--all").returncode == 0
    finally:
        lbxdp("down", "--all")
    assert Rig.adopt(p1).leftovers() == [] and Rig.adopt(p2).leftovers() == []


def test_a_nat_rig_from_the_cli_serves_its_own_config(tmp_path):
    """`lbxdp rig up --shape nat`, then `rig config` writes NAT VIPs (mode = "nat", the backends'
    own addresses), and attaching that config serves the client through the one-armed NAT: each
    backend answers. Cleanup: detach and `rig down`, whatever happened."""
    import secrets
    p = f"n{secrets.token_hex(3)[:5]}"
    pins = f"/sys/fs/bpf/lbxdp-test-{p}"
    env = dict(os.environ, LBXDP_RUN_ROOT=str(tmp_path / "run"), LBXDP_PIN_ROOT=pins)

    def lbxdp(*argv, netns=None):
        pre = ["--netns", netns] if netns else []
        return subprocess.run([sys.executable, "-m", "lbxdp", *pre, *argv], capture_output=True, text=True,
                              timeout=120, env=env)

    try:
        up = lbxdp("rig", "up", "--backends", "2", "--prefix", p, "--shape", "nat")
        assert up.returncode == 0, up.stderr
        cfg = lbxdp("rig", "config", p)
        assert cfg.returncode == 0, cfg.stderr
        vips = tomllib.loads(cfg.stdout)["vip"]
        assert len(vips) == 4 and {v["mode"] for v in vips} == {"nat"}
        (cfg_file := tmp_path / "lb.toml").write_text(cfg.stdout)
        att = lbxdp("attach", "eth0", "--config", str(cfg_file), "--mode", "generic", netns=f"{p}-lb")
        assert att.returncode == 0, att.stderr
        rig = Rig.load_state(tmp_path / "run" / f"rig-{p}.json")
        # Round robin is per CPU: of 8 connections on 2 CPUs, one CPU takes >= 2, so both answer.
        names = rig.tcp_names(rig.spec.vip4, count=8, timeout=10)
        assert set(names) == {"be1", "be2"} and sum(names.values()) == 8, names
    finally:
        lbxdp("detach", "eth0", netns=f"{p}-lb")
        lbxdp("rig", "down", p)
        if os.path.isdir(pins):
            os.rmdir(pins)          # detach removed the instance's own directories
    assert Rig.adopt(p).leftovers() == []
