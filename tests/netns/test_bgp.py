"""Scale-out by BGP (issue 14): three balancer nodes, each running `lbxdp run` with the same config
(Maglev, [bgp]), announce the VIPs to a router running BIRD 2 (ECMP over the nodes, BFD); the
client holds 400 long-lived TCP connections (each echoing every 0.5 s) through them.

    node loss   lb3's switch port goes down and its daemon is killed (kill -9: its BIRD dies with it)
                and its program detached: rt's route loses lb3 within 1 s (BFD), >= 99% of the
                connections survive (the other nodes send them to the same backends: same Maglev
                table, no per-node seed); lb3 rejoins and the connections keep their backends
    drain       `lbxdp node drain` on lb2 withdraws its announcement (forwarding goes on), then its
                daemon stops: 100% survive
    health      a VIP whose backends are all down is withdrawn by every node, and announced again
                when one comes back

rt's route is read with `ip route` in its namespace, polled every 10 ms from the moment of the
fault. The figures are printed (-s shows them) and written to docs/scale-out.md by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import model
from lbxdp.health import CheckType, HealthCheck
from lbxdp.lab import bgp as labbgp
from lbxdp.lab.rig import HOST_IF, SW, Rig, RigSpec
from lbxdp.paths import Instance
from tests.netns.daemon import REPO, Daemon, rig_up

NODES = ("lb1", "lb2", "lb3")
CONNS = 400
FIGURES: dict[str, object] = {}


class NodeDaemon(Daemon):
    """tests/netns/daemon.Daemon in a given balancer's namespace."""

    def __init__(self, rig: Rig, role: str, config: Path, log: Path) -> None:   # noqa: D107
        import threading
        self.role, self.log = role, log
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        argv = [sys.executable, "-m", "lbxdp", "--netns", rig.ns(role), "run", HOST_IF, "--config", str(config),
                "--mode", "generic"]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=REPO)
        self._reader = threading.Thread(target=self._read, name=f"daemon-log-{role}", daemon=True)
        self._reader.start()


def lbxdp(rig: Rig, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(role), *args], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert not check or p.returncode == 0, f"lbxdp {' '.join(args)} in {role}: {p.stdout}{p.stderr}"
    return p


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    yield from rig_up(RigSpec(shape="multi", balancers=3, backends=3, bgp=True))


@pytest.fixture(scope="module")
def router(rig: Rig) -> Iterator[labbgp.RouterBird]:
    with labbgp.RouterBird(rig) as rb:
        yield rb


@pytest.fixture(scope="module")
def cluster(rig: Rig, router: labbgp.RouterBird, tmp_path_factory) -> Iterator[dict]:
    """Every node running `lbxdp run` with the same config; yields {"start": f(role), "nodes":
    {role: NodeDaemon}, "config": path}. Cleanup, even on failure: every daemon stopped by PID,
    then `lbxdp detach` in every node; no pins or run state left."""
    d = tmp_path_factory.mktemp("bgp")
    check = HealthCheck(CheckType.TCP, interval=0.3, timeout=0.3, rise=1, fall=2)
    vips = (rig.vip(4, "tcp", health=check, with_mac=True), rig.vip(6, "tcp", with_mac=True))
    cfg = d / "lbxdp.toml"
    cfg.write_text(labbgp.node_config(rig, vips, withdraw_grace=1.0))
    nodes: dict[str, NodeDaemon] = {}
    started: list[NodeDaemon] = []

    def start(role: str) -> NodeDaemon:
        n = NodeDaemon(rig, role, cfg, d / f"{role}-{len(started)}.log")
        started.append(n)
        nodes[role] = n
        return n

    try:
        for role in NODES:
            start(role)
        for n in nodes.values():
            n.wait_event("attached", timeout=400)   # three bcc builds on a busy 2-CPU machine
        yield {"start": start, "nodes": nodes, "config": cfg}
    finally:
        for n in started:
            n.stop()
        for role in NODES:
            lbxdp(rig, role, "detach", HOST_IF, check=False)
        for role in NODES:
            inst = Instance(HOST_IF, rig.ns(role))
            assert not inst.pin_dir.exists() and not inst.run_dir.exists(), f"{role}: pins or run state left"
        assert all(n.popen.poll() is not None for n in started)
        if FIGURES:
            print("\nscale-out figures:", json.dumps(FIGURES, indent=1))


def wait_announcing(router: labbgp.RouterBird, addr, want: set[str], timeout: float = 30.0) -> float:
    """Poll rt's route every 10 ms until the balancers announcing addr are exactly `want`;
    the seconds it took."""
    t0 = time.monotonic()
    while True:
        got = router.balancers_announcing(addr)
        if got == want:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"rt's route to {addr}: {sorted(got)}, want {sorted(want)}\n" \
            f"{router.command('show', 'protocols')}"
        time.sleep(0.01)


def node_status(rig: Rig, role: str, ok=lambda st: True, timeout: float = 10.0) -> dict:
    """The node's bgp.json (written by its daemon once a second), once ok(it) holds."""
    t0 = time.monotonic()
    while True:
        try:
            st = json.loads((Instance(HOST_IF, rig.ns(role)).run_dir / "bgp.json").read_text())
        except (OSError, ValueError):
            st = None
        if st is not None and ok(st):
            return st
        assert time.monotonic() - t0 < timeout, f"{role}: {st}"
        time.sleep(0.1)


def node_packets(rig: Rig, vip_name: str) -> dict[str, int]:
    """Packets each node's program forwarded for the VIP (its backends' counters, `lbxdp status`)."""
    out = {}
    for role in NODES:
        p = lbxdp(rig, role, "status", HOST_IF, "--json", check=False)
        if p.returncode != 0:
            out[role] = 0
            continue
        doc = json.loads(p.stdout)
        out[role] = sum(b["packets"] for v in doc["vips"] if v["vip"] == vip_name for b in v["backends"])
    return out


def survival(summary: dict, since: float = 0.0, until: float = float("inf")) -> tuple[int, list]:
    """(connections open at the end with no error, the errors at times in [since, until))."""
    ok = sum(1 for c in summary["conns"] if c["open"] and not c["errors"])
    errs = [e | {"backend": c["backend"]} for c in summary["conns"] for e in c["errors"] if since <= e["at"] < until]
    return ok, errs


def test_every_node_announces_and_rt_spreads_the_vips_over_them(rig, router, cluster):
    wait_announcing(router, rig.spec.vip4, set(NODES))
    t0 = time.monotonic()
    while len(router.nexthops(rig.spec.vip6)) < 3:
        assert time.monotonic() - t0 < 30, router.command("show", "protocols")
        time.sleep(0.1)
    for role in NODES:
        st = node_status(rig, role, lambda st: all(n["established"] for n in st["neighbors"]))
        assert st["node"] == "serving" and st["error"] is None, st
        assert st["announced"] == [f"{rig.spec.vip4}/32", f"{rig.spec.vip6}/128"], st
        assert all(n["established"] for n in st["neighbors"]), st
        assert st["vips"][rig.vip_name(4)] == {"prefix": f"{rig.spec.vip4}/32", "announced": True, "why": "usable"}
    assert router.established() == {f"{lb}_v{f}" for lb in NODES for f in (4, 6)}
    names = rig.tcp_names(rig.spec.vip4, count=60)
    assert sum(names.values()) == 60 and "!failed" not in names, names


def test_undrain_announces_again(rig, router, cluster):
    wait_announcing(router, rig.spec.vip4, set(NODES))
    lbxdp(rig, "lb1", "node", "drain", "-i", HOST_IF)
    wait_announcing(router, rig.spec.vip4, {"lb2", "lb3"}, timeout=10)
    assert rig.tcp_names(rig.spec.vip4, count=20)["!failed"] == 0
    out = lbxdp(rig, "lb1", "node", "undrain", "-i", HOST_IF).stdout
    assert "announced" in out, out
    wait_announcing(router, rig.spec.vip4, set(NODES), timeout=10)


def test_a_misconfigured_neighbour_is_visible_and_retried_and_forwarding_goes_on(rig, router, cluster):
    """lb1 reloads a config with the router's AS wrong: its session fails (the reason in status),
    rt stops routing to it, the VIP stays reachable, lb1's program keeps its VIPs; fixed and
    reloaded, BIRD opens the session again by itself and lb1 announces again."""
    wait_announcing(router, rig.spec.vip4, set(NODES))
    cfg: Path = cluster["config"]
    good = cfg.read_text()
    try:
        cfg.write_text(good.replace("as = 65000", "as = 65099"))
        lbxdp(rig, "lb1", "reload", "-i", HOST_IF)
        wait_announcing(router, rig.spec.vip4, {"lb2", "lb3"}, timeout=20)
        st = node_status(rig, "lb1", lambda st: not any(n["established"] for n in st["neighbors"]), timeout=20)
        assert st["neighbors"][0]["as"] == 65099 and st["neighbors"][0]["info"], st
        assert st["announced"] == ["10.112.0.10/32", "fd00:112::10/128"], st     # offered, not taken
        doc = json.loads(lbxdp(rig, "lb1", "status", HOST_IF, "--json").stdout)
        assert doc["xdp"]["attached"] and {v["vip"] for v in doc["vips"]} == {rig.vip_name(4), rig.vip_name(6)}
        assert "!failed" not in rig.tcp_names(rig.spec.vip4, count=20)
        print(f"\nmisconfigured neighbour: lb1 reports {st['neighbors'][0]['state']} {st['neighbors'][0]['info']!r}")
    finally:
        cfg.write_text(good)
        lbxdp(rig, "lb1", "reload", "-i", HOST_IF)
    wait_announcing(router, rig.spec.vip4, set(NODES), timeout=30)


def all_backends_up(rig: Rig) -> None:
    """Every node sees every backend up (the same Maglev table everywhere: a flow that moves keeps
    its backend only while the backend set is the same on every node)."""
    t0 = time.monotonic()
    while True:
        states = {role: [b["health"] for v in json.loads(lbxdp(rig, role, "status", HOST_IF, "--json").stdout)["vips"]
                         for b in v["backends"]] for role in NODES}
        if all(h != "down" for hs in states.values() for h in hs):
            return
        assert time.monotonic() - t0 < 20, states
        time.sleep(0.2)


def test_a_lost_node_is_withdrawn_within_a_second_and_its_connections_survive(rig, router, cluster):
    wait_announcing(router, rig.spec.vip4, set(NODES))
    all_backends_up(rig)
    with rig.hold(rig.spec.vip4, conns=CONNS, interval=0.5, duration=120, try_timeout=5.0) as held:
        ready = held.wait_ready(timeout=60)
        assert ready["open"] == CONNS, ready
        before = node_packets(rig, rig.vip_name(4))
        time.sleep(2.0)
        after = node_packets(rig, rig.vip_name(4))
        spread = {r: after[r] - before[r] for r in NODES}
        FIGURES["ecmp_spread_packets_per_node_2s"] = spread
        FIGURES["backends_of_held_conns"] = ready["backends"]
        assert all(v > 0 for v in spread.values()), f"every node carries some connections: {spread}"
        # The node dies: its cable first (its port on the switch goes down: nothing it sends
        # reaches rt any more, no BGP notification, no TCP FIN; only BFD can tell), then its
        # daemon (kill -9, its BIRD dies with it) and program.
        t_fault = time.time()
        t0 = time.monotonic()
        rig.run(SW, "ip", "link", "set", rig.peer("lb3"), "down")
        cluster["nodes"]["lb3"].kill()
        withdraw = wait_announcing(router, rig.spec.vip4, {"lb1", "lb2"}, timeout=30)
        FIGURES["withdrawal_seconds_bfd_link_down"] = round(withdraw, 3)
        lbxdp(rig, "lb3", "detach", HOST_IF, check=False)
        time.sleep(4.0)
        # lb3 comes back: link up, daemon started again; rt spreads over it again and the
        # connections it gets keep their backends.
        t_rejoin = time.time()
        rig.run(SW, "ip", "link", "set", rig.peer("lb3"), "up")
        cluster["start"]("lb3").wait_event("attached", timeout=300)
        FIGURES["rejoin_announced_seconds"] = round(wait_announcing(router, rig.spec.vip4, set(NODES), timeout=60), 3)
        time.sleep(4.0)
        summary = held.stop(timeout=60)
    ok, errs = survival(summary)
    lost_fault = [e for e in errs if t_fault <= e["at"] < t_rejoin]
    lost_rejoin = [e for e in errs if e["at"] >= t_rejoin]
    FIGURES["node_loss_survival"] = f"{CONNS - len(lost_fault)}/{CONNS}"
    FIGURES["rejoin_losses"] = len(lost_rejoin)
    FIGURES["max_echo_gap_seconds"] = summary["max_rtt"]
    print(f"\nnode loss: withdrawn in {withdraw:.3f}s, {ok}/{CONNS} connections open at the end; "
          f"errors at the fault {len(lost_fault)}, at the rejoin {len(lost_rejoin)}; spread {spread}")
    assert withdraw < 1.0, f"rt still routed to lb3 after {withdraw:.3f}s"
    assert ok >= 0.99 * CONNS, f"{ok}/{CONNS} survived (fault at {t_fault:.3f}, rejoin at {t_rejoin:.3f}): {errs[:10]}"


def test_a_drained_node_withdraws_first_and_every_connection_survives(rig, router, cluster):
    wait_announcing(router, rig.spec.vip4, set(NODES))
    with rig.hold(rig.spec.vip4, conns=CONNS, interval=0.5, duration=120, try_timeout=5.0) as held:
        ready = held.wait_ready(timeout=60)
        assert ready["open"] == CONNS, ready
        time.sleep(1.0)
        t0 = time.monotonic()
        out = lbxdp(rig, "lb2", "node", "drain", "-i", HOST_IF).stdout
        drained = wait_announcing(router, rig.spec.vip4, {"lb1", "lb3"}, timeout=10)
        FIGURES["drain_withdrawal_seconds"] = round(time.monotonic() - t0, 3)
        assert "withdrawn" in out, out
        st = node_status(rig, "lb2")
        assert st["node"] == "draining" and st["announced"] == [], st
        assert st["vips"][rig.vip_name(4)]["why"] == "draining"
        time.sleep(2.0)       # the flows lb2 carried now reach lb1 and lb3
        assert cluster["nodes"]["lb2"].stop() == 0
        time.sleep(3.0)
        summary = held.stop(timeout=60)
    ok, errs = survival(summary)
    FIGURES["drain_survival"] = f"{ok}/{CONNS}"
    print(f"\ndrain: withdrawn in {drained:.3f}s after the command, {ok}/{CONNS} survived")
    assert ok == CONNS, errs[:10]


def test_a_vip_with_every_backend_down_is_withdrawn_and_announced_again(rig, router, cluster):
    live = router.balancers_announcing(rig.spec.vip4)     # lb2 was stopped by the drain test
    assert len(live) >= 2, live
    try:
        for be in rig.backends:
            rig.stop_server(be)
        t0 = time.monotonic()
        wait_announcing(router, rig.spec.vip4, set(), timeout=15)
        FIGURES["all_down_withdrawal_seconds"] = round(time.monotonic() - t0, 3)
        assert len(router.nexthops(rig.spec.vip6)) == len(live)     # the other VIP (no check) stays
        for role in sorted(live):
            cluster["nodes"][role].wait_event("vip-withdrawn", vip=rig.vip_name(4), why="all-backends-down")
        rig.start_server("be2")
        t0 = time.monotonic()
        wait_announcing(router, rig.spec.vip4, live, timeout=15)
        FIGURES["one_back_announced_seconds"] = round(time.monotonic() - t0, 3)
        names = rig.tcp_names(rig.spec.vip4, count=20)
        assert names == {"be2": 20}, names
    finally:
        for be in rig.backends:
            if be not in rig.servers:
                rig.start_server(be)


def test_without_bfd_a_lost_node_is_withdrawn_only_at_the_hold_time(rig, router, cluster):
    """The figure BFD is compared with: rt restarted without BFD (hold time 3 s, as before), a
    node's switch port down; rt's route loses it only when the hold timer expires."""
    router.stop()
    nobfd = labbgp.RouterBird(rig, bfd=False, hold_time=3)
    nobfd.start()
    try:
        live = {"lb1", "lb3"}                              # lb2 was stopped by the drain test
        wait_announcing(nobfd, rig.spec.vip4, live, timeout=60)
        t0 = time.monotonic()
        rig.run(SW, "ip", "link", "set", rig.peer("lb3"), "down")
        try:
            wait_announcing(nobfd, rig.spec.vip4, {"lb1"}, timeout=15)
            took = time.monotonic() - t0
        finally:
            rig.run(SW, "ip", "link", "set", rig.peer("lb3"), "up")
        FIGURES["withdrawal_seconds_no_bfd_hold_3s"] = round(took, 3)
        print(f"\nwithout BFD: withdrawn after {took:.3f}s (hold time 3 s)")
        assert 1.0 < took < 4.5, took
        wait_announcing(nobfd, rig.spec.vip4, live, timeout=60)   # the session comes back by itself
    finally:
        nobfd.stop()
        router.start()
