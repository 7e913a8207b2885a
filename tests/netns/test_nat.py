"""NAT mode end to end (issue 12): real sockets through lbxdp's one-armed NAT in generic XDP.

Two setups, one rig each (lbxdp/lab/shapes.py draws both):
- DNAT (`snat = false`), shape nat: cli, lb, be1, be2 on one segment; the backends route the
  client's addresses via lb, so their replies cross lb's eth0 and lbxdp translates them back.
  The backends see the client's address.
- SNAT (`snat = true`), shape routed: the backends sit behind rt in another subnet and know no
  route to the client through lb; lbxdp writes lb's own address (its first on eth0, the
  default of [balancer] snat_v4/v6) and a pool port as the source, and the replies come back
  to it through rt. The backends see lb's address.

The NAT VIPs listen on port 80; the backends' echo servers on the rig's 8080 (port translation).
Each backend counts, with an nftables rule per source, the packets to 8080 that reach it on eth0,
so "who did the backend see" is the backends' own view. Checksum errors are read with
`nstat -asz` (absolute, history untouched) in every namespace of both rigs.

Cleanup: lbxdp detached (pins removed), the daemons stopped by PID, both rigs down, nothing
left (checked).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import abi, control, loader, model
from lbxdp.conntrack import summarize as nat_summary
from lbxdp.lab import namespaces as nsx
from lbxdp.lab import processes
from lbxdp.lab.rig import CLI, FAILED, HOST_IF, LB, SW, Rig, RigSpec, Shape
from lbxdp.paths import Instance

from .daemon import REPO, started_daemons

pytestmark = pytest.mark.root

VIP_PORT = 80                  # the NAT VIPs' port; the backends listen on the rig's port (8080)
N_TCP, N_UDP, TCP_BYTES, UDP_BYTES = 500, 500, 64 * 1024, 1200
POOL = (20000, 21023)          # 1,024 SNAT ports
CLOSE_TIMEOUT = 2              # [balancer] nat_timeouts.tcp_close in the tests that watch it
SRC_TABLE = "lbxsrc"


def lbxdp(rig: Rig, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv], capture_output=True,
                       text=True, timeout=180, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"lbxdp {' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


class Nat:
    """One rig with lbxdp (generic XDP on lb's eth0), configured by `lbxdp attach`, and the
    backends' per-source packet counters."""

    def __init__(self, rig: Rig, workdir: Path, snat: bool) -> None:
        self.rig, self.workdir, self.snat, self.n = rig, workdir, snat, 0

    def vip_addr(self, family: int):
        return self.rig.spec.vip4 if family == 4 else self.rig.spec.vip6

    def vips(self, family: int, backends: list[str] | None = None) -> list[model.Vip]:
        return [self.rig.nat_vip(family, p, backends, port=VIP_PORT, snat=self.snat) for p in ("tcp", "udp")]

    def toml(self, *vips: model.Vip, **balancer) -> str:
        return self.rig.nat_config_toml(*vips, **balancer)

    def attach(self, text: str, check: bool = True) -> subprocess.CompletedProcess:
        self.n += 1
        path = self.workdir / f"nat{self.n}.toml"
        path.write_text(text)
        return lbxdp(self.rig, "attach", HOST_IF, "--config", str(path), "--mode", "generic", check=check)

    def apply(self, family: int, backends: list[str] | None = None, **balancer) -> None:
        self.attach(self.toml(*self.vips(family, backends), **balancer))

    def status(self) -> dict:
        return json.loads(lbxdp(self.rig, "status", HOST_IF, "--json").stdout)

    def reasons(self) -> Counter:
        return Counter({f"{r['verdict']}_{r['reason']}": r["packets"] for r in self.status()["reasons"]})

    def expected_source(self, family: int) -> str:
        """What the backends must see as the source: the client, or lb's SNAT address."""
        role = LB if self.snat else CLI
        return str(self.rig.addr4(role) if family == 4 else self.rig.addr6(role))

    # -- the backends' view ----------------------------------------------------------------

    def install_source_counters(self) -> None:
        """On every backend: one counting rule per candidate source (client and lb, both
        families) and one for all, for TCP and UDP to the echo port arriving on eth0."""
        port = self.rig.spec.port
        rules = [f'iifname "{HOST_IF}" meta l4proto {{ tcp, udp }} th dport {port} {fam} saddr {addr} '
                 f'counter comment "{addr}"'
                 for role in (CLI, LB) for fam, addr in (("ip", self.rig.addr4(role)), ("ip6", self.rig.addr6(role)))]
        rules.append(f'iifname "{HOST_IF}" meta l4proto {{ tcp, udp }} th dport {port} counter comment "all"')
        body = "\n".join(f"  {r}" for r in rules)
        ruleset = (f"table inet {SRC_TABLE} {{\n chain input {{\n  type filter hook input priority 0; "
                   f"policy accept;\n{body}\n }}\n}}\n")
        for be in self.rig.backends:
            self.rig.run(be, "nft", "-f", "-", input=ruleset)

    def sources(self) -> Counter:
        """(backend, source address or 'all') -> packets counted so far."""
        out: Counter = Counter()
        for be in self.rig.backends:
            doc = json.loads(self.rig.run(be, "nft", "-j", "list", "table", "inet", SRC_TABLE).stdout)
            for item in doc["nftables"]:
                rule = item.get("rule")
                if rule:
                    n = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
                    out[(be, rule["comment"])] = n
        return out


def checksum_errors(rigs: list[Rig]) -> dict[str, int]:
    """Every *CsumErrors counter that is not zero, in every namespace of these rigs."""
    bad = {}
    for rig in rigs:
        for role in [*rig.hosts, SW]:
            counters = json.loads(rig.run(role, "nstat", "-asz", "--json").stdout)["kernel"]
            bad |= {f"{role}:{k}": v for k, v in counters.items() if k.endswith("CsumErrors") and v}
    return bad


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lbxdp-nat-") as tmp:
        yield Path(tmp)


def _setup(shape: Shape, snat: bool, workdir: Path) -> Iterator[Nat]:
    rig = Rig(RigSpec(shape=shape, backends=2))
    try:
        rig.up()
        nat = Nat(rig, workdir, snat)
        nat.install_source_counters()
        yield nat
    finally:
        left = []
        if rig.leftovers():          # (up() removes what it built when it fails)
            lbxdp(rig, "detach", HOST_IF, check=False)
        inst = Instance(HOST_IF, rig.ns(LB))
        if inst.pin_dir.exists() or inst.run_dir.exists():
            left.append("lbxdp pins or run state")
        servers = list(rig.servers.values())
        rig.down()
        left += rig.leftovers() + [f"server {s.pid}" for s in servers if s.alive()]
        assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def dnat(workdir: Path) -> Iterator[Nat]:
    yield from _setup(Shape.NAT, False, workdir)


@pytest.fixture(scope="module")
def snat(workdir: Path) -> Iterator[Nat]:
    yield from _setup(Shape.ROUTED, True, workdir)


@pytest.fixture
def setups(dnat: Nat, snat: Nat) -> dict[str, Nat]:
    return {"dnat": dnat, "snat": snat}


# -- traffic: every byte, every checksum, the source the backends see --------------------------


@pytest.mark.parametrize("setup,family", [("dnat", 4), ("dnat", 6), ("snat", 4), ("snat", 6)])
def test_tcp_and_udp_through_the_vip_byte_exact(setups: dict[str, Nat], setup: str, family: int) -> None:
    nat = setups[setup]
    rig = nat.rig
    nat.apply(family)
    vip = nat.vip_addr(family)
    src0, r0 = nat.sources(), nat.reasons()
    t0 = time.monotonic()
    tcp = rig.client("tcp", vip, VIP_PORT, count=N_TCP, timeout=120, try_timeout=5, payload_size=TCP_BYTES)
    udp = rig.client("udp", vip, VIP_PORT, count=N_UDP, timeout=60, try_timeout=2, payload_size=UDP_BYTES)
    took = time.monotonic() - t0
    reasons = nat.reasons() - r0
    seen = nat.sources() - src0
    figures = f"{setup} v{family}: {N_TCP} x {TCP_BYTES} B TCP + {N_UDP} UDP in {took:.1f}s; reasons {dict(reasons)}"
    print(f"\n[nat] {figures}")
    for name, res, n in (("TCP", tcp, N_TCP), ("UDP", udp, N_UDP)):
        assert res["failed"] == 0 and res["attempts"] == n, f"{name}: {res}; {figures}"
        assert sum(res["names"].values()) == n and set(res["names"]) == set(rig.backends), f"{name}: {res}"
    # The backends saw only the expected source, and all of it came through eth0.
    want = nat.expected_source(family)
    for be in rig.backends:
        assert seen[(be, "all")] > 0 and seen[(be, want)] == seen[(be, "all")], (be, want, dict(seen))
    assert reasons["tx_forward"] > 0 and reasons["tx_nat_reply"] > 0, figures
    assert checksum_errors([rig]) == {}


@pytest.mark.parametrize("setup,family", [("dnat", 4), ("snat", 6)])
def test_native_xdp_tx_through_the_peer_stub_byte_exact(setups: dict[str, Nat], setup: str, family: int) -> None:
    """The same in native mode, as deployed: XDP_TX frames leave as xdp_frames (no skb, no
    checksum state carried along) and reach the switch only through the peer stub."""
    nat = setups[setup]
    rig = nat.rig
    lbxdp(rig, "detach", HOST_IF, check=False)
    rig.attach_peer_stub()
    try:
        path = nat.workdir / f"native-{setup}.toml"
        path.write_text(nat.toml(*nat.vips(family)))
        lbxdp(rig, "attach", HOST_IF, "--config", str(path), "--mode", "native")
        vip = nat.vip_addr(family)
        tcp = rig.client("tcp", vip, VIP_PORT, count=200, timeout=60, try_timeout=5, payload_size=TCP_BYTES)
        udp = rig.client("udp", vip, VIP_PORT, count=200, timeout=30, try_timeout=2, payload_size=UDP_BYTES)
        mode = json.loads(rig.run(LB, "ip", "-j", "link", "show", HOST_IF).stdout)[0]["xdp"]["mode"]
    finally:
        lbxdp(rig, "detach", HOST_IF, check=False)
        rig.detach_peer_stub()
    assert mode == 1, f"XDP mode {mode}, not native (1)"
    for name, res in (("TCP", tcp), ("UDP", udp)):
        assert res["failed"] == 0 and sum(res["names"].values()) == 200, f"{name}: {res}"
    assert checksum_errors([rig]) == {}


# -- the SNAT port pool ------------------------------------------------------------------------


def test_a_pool_of_1024_ports_serves_1000_connections_and_counts_the_overflow(snat: Nat) -> None:
    """One backend, so every connection draws from the one (SNAT address, backend, protocol)
    space of 1,024 ports: 1,000 held connections all open; then further connections take the
    last free ports, and once none is left their SYNs are dropped with the counted reason."""
    rig = snat.rig
    snat.attach(snat.toml(*snat.vips(4, ["be1"]), snat_ports=POOL))
    r0 = snat.reasons()
    with rig.hold(rig.spec.vip4, VIP_PORT, conns=1000, interval=1.0, duration=90, try_timeout=3.0) as held:
        ready = held.wait_ready(timeout=60)
        assert ready["open"] == 1000, ready
        extra = rig.client("tcp", rig.spec.vip4, VIP_PORT, count=60, timeout=40, try_timeout=0.3)
        res = held.stop()
    reasons = snat.reasons() - r0
    served = sum(extra["names"].values())
    print(f"\n[nat] pool {POOL}: 1000 held, then {served} of 60 more served; reasons {dict(reasons)}")
    bad = [c for c in res["conns"] if not c["open"] or c["errors"]]
    assert not bad, bad[:3]
    # 24 ports were left; each served connection keeps its port for the close timeout.
    assert served <= 24 and extra["failed"] == 60 - served and extra["failed"] > 0, extra
    assert reasons["drop_nat_no_port"] >= extra["failed"], dict(reasons)
    assert checksum_errors([rig]) == {}


# -- conntrack: closed connections' entries expire within the close timeout --------------------


_NAT_ENTRY = struct.Struct("=16s16s2s2s6sBBIHBBIII")     # bpf/abi.h struct nat_entry (64 bytes)
NAT_STATES = {0: "syn_sent", 1: "established", 2: "closing", 3: "udp"}


def conntrack(rig: Rig) -> list[dict]:
    """The live entries of the pinned lbx_nat map (an entry past its state's timeout counts as
    absent, bpf/abi.h): state, direction and how long until it expires (seconds)."""
    path = Instance(HOST_IF, rig.ns(LB)).pin_dir / "lbx_nat"
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(path)],
                                     capture_output=True, text=True, timeout=60, check=True).stdout)
    now = nat_clock()
    out = []
    for item in dump:
        value = bytes(int(b, 16) for b in item["value"])
        f = _NAT_ENTRY.unpack(value)
        state, direction, seen, timeout, created = f[6], f[5], f[11], f[12], f[13]
        age = (now - seen) & 0xFFFFFFFF
        if age <= timeout:
            out.append({"state": NAT_STATES.get(state, state), "dir": direction,
                        "left": (timeout - age) * (1 << 20) / 1e9, "id": (tuple(item["key"]), created)})
    return out


def nat_clock() -> int:
    """Now on the clock of struct nat_entry's times (CLOCK_MONOTONIC ns >> 20, as the control
    plane reads it; the program's jiffies-based clock lags it by a few ticks, so an entry looks
    that much older here: the checks below leave 0.3 s of slack)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> 20


@pytest.mark.parametrize("setup", ["dnat", "snat"])
def test_closed_connections_leave_conntrack_within_the_close_timeout(setups: dict[str, Nat], setup: str) -> None:
    nat = setups[setup]
    rig = nat.rig
    nat.apply(4, nat_timeouts=model.NatTimeouts(tcp_close=CLOSE_TIMEOUT))
    # Entries of earlier tests' connections may still be live (closing, default 10 s): ours are
    # the (key, created) pairs that were not there before.
    before = {e["id"] for e in conntrack(rig)}
    res = rig.client("tcp", rig.spec.vip4, VIP_PORT, count=100, timeout=30, payload="x" * 100)
    assert res["failed"] == 0, res
    t_closed = time.monotonic()
    ours = lambda: [e for e in conntrack(rig) if e["id"] not in before]   # noqa: E731
    live = ours()
    # Both directions' entries of the 100 closed connections, in the close state, short-lived.
    assert len(live) == 200 and {e["state"] for e in live} == {"closing"}, Counter(e["state"] for e in live)
    assert Counter(e["dir"] for e in live) == Counter({0: 100, 1: 100})
    assert max(e["left"] for e in live) <= CLOSE_TIMEOUT + 0.1
    time.sleep(max(0.0, CLOSE_TIMEOUT + 0.3 - (time.monotonic() - t_closed)))
    left = ours()
    assert left == [], f"{len(left)} entries of closed connections still live: {left[:4]}"


# -- the daemon killed and the program replaced under 200 live connections ---------------------


def resets(rig: Rig, role: str) -> int:
    k = json.loads(rig.run(role, "nstat", "-asz", "--json").stdout)["kernel"]
    return k.get("TcpEstabResets", 0) + k.get("TcpOutRsts", 0)


@pytest.mark.parametrize("setup", ["dnat", "snat"])
def test_kill_9_and_reattach_during_200_connections_reset_nothing(setups: dict[str, Nat], setup: str,
                                                                  tmp_path: Path) -> None:
    nat = setups[setup]
    rig = nat.rig
    lbxdp(rig, "detach", HOST_IF, check=False)       # the daemon starts its own instance
    config = tmp_path / "nat.toml"
    config.write_text(nat.toml(*nat.vips(4)))
    rst0 = {r: resets(rig, r) for r in (CLI, *rig.backends)}
    gen = started_daemons(rig, tmp_path)
    start = next(gen)
    try:
        d = start(config)
        with rig.hold(rig.spec.vip4, VIP_PORT, conns=200, interval=0.05, duration=60, try_timeout=2.0) as held:
            ready = held.wait_ready()
            assert ready["open"] == 200, ready
            time.sleep(0.5)
            d.kill()
            time.sleep(0.5)
            d = start(config)
            assert d.events("attached")[0][1]["adopted"] == "True"
            out = lbxdp(rig, "attach", HOST_IF, "--config", str(config), "--mode", "generic").stdout
            assert "re-attached (maps kept)" in out, out
            time.sleep(0.5)
            t_last = time.time()
            res = held.stop()
    finally:
        with pytest.raises(StopIteration):
            next(gen)                                 # stops the daemons, detaches, checks pins
    bad = [c for c in res["conns"] if not c["open"] or c["errors"] or c["sent"] != c["received"]]
    assert not bad, f"{len(bad)} connections broke: {bad[:3]}"
    assert all(c["last_ok"] > t_last for c in res["conns"])
    assert Counter(c["backend"] for c in res["conns"]) == Counter(ready["backends"])
    # No reset on either side: the client and the backends sent and took none while it ran
    # (the hold client's closes at the end are FINs).
    assert {r: resets(rig, r) - n for r, n in rst0.items()} == {r: 0 for r in rst0}


# -- bad input: refused with one line, nothing applied -----------------------------------------


def applied(nat: Nat) -> list:
    return sorted((v["vip"], v["mode"], sorted(b["backend"] for b in v["backends"])) for v in nat.status()["vips"])


def test_bad_nat_input_is_refused_and_nothing_applied(dnat: Nat) -> None:
    rig = dnat.rig
    dnat.apply(4)
    good = applied(dnat)

    def refused(what: str, text: str, word: str) -> None:
        r = dnat.attach(text, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, f"{what}: rc {r.returncode}\n{r.stdout}{r.stderr}"
        # One error line naming the culprit (then at most a hint, the project's convention).
        assert lines[0].startswith("lbxdp: error:") and word in lines[0], f"{what}: {r.stderr!r}"
        assert all(line.startswith("  hint:") for line in lines[1:2]) and len(lines) <= 2, f"{what}: {r.stderr!r}"
        print(f"\n[nat] {what}: {lines[0]}")
        assert applied(dnat) == good, f"{what}: something was applied"

    snat_vips = [rig.nat_vip(4, "tcp", port=VIP_PORT, snat=True)]
    unreachable = model.Vip(address=rig.spec.vip4, port=VIP_PORT, protocol=model.Protocol.TCP, mode=model.Mode.NAT,
                            backends=(model.Backend(address="198.51.100.7", port=8080),))
    refused("foreign SNAT address", dnat.toml(*snat_vips, snat_v4="10.111.0.99"), "snat_v4")
    refused("pool of no port", dnat.toml(*snat_vips).replace(
        "[[vip]]", '[balancer]\nsnat_ports = "30000-29999"\n\n[[vip]]', 1), "snat_ports")
    refused("unreachable backend", dnat.toml(unreachable), "198.51.100.7")
    refused("snat on a dsr VIP", dnat.toml(rig.nat_vip(4, "tcp", snat=True)).replace('mode = "nat"', 'mode = "dsr"', 1),
            "snat")
    # No SNAT source at all: an snat = true VIP with IPv6 backends while eth0 has no IPv6 address
    # (the segment stays routed on-link, so the backends are reachable).
    seg6 = rig.layout.segments_of(LB)[0].v6
    addr6 = f"{rig.addr6(LB)}/{seg6.prefixlen}"
    rig.run(LB, "ip", "-6", "addr", "del", addr6, "dev", HOST_IF)
    try:
        rig.run(LB, "ip", "-6", "route", "add", str(seg6), "dev", HOST_IF)
        refused("no SNAT source", dnat.toml(rig.nat_vip(6, "tcp", port=VIP_PORT, snat=True)), "snat_v6")
    finally:
        rig.run(LB, "ip", "-6", "route", "del", str(seg6), "dev", HOST_IF, check=False)
        rig.run(LB, "ip", "-6", "addr", "add", addr6, "dev", HOST_IF, "nodad")
    names = rig.tcp_names(rig.spec.vip4, VIP_PORT, count=6, timeout=20)
    assert names[FAILED] == 0 and sum(names.values()) == 6, names


# -- a spoofed SYN flood: the handshake table takes it, established connections stay -------------
FLOOD = Path(__file__).with_name("flood.py")
FLOOD_SECONDS, FLOOD_MAX_PACKETS = 12.0, 4_000_000
HELD = 200
FLOOD_NET4, FLOOD_NET6 = "100.64.0.0/10", "2001:db8:f::/48"   # tests/netns/flood.py's sources
HELD_INTERVAL = 4.0            # a held connection's packets are seconds apart


def nat_flood(nat: Nat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defines: tuple[str, ...] = (),
              try_timeout: float = 3.0) -> dict:
    """Attach (in-process, generic XDP, unique pins), hold HELD connections through the v4 NAT
    VIP (round robin: a connection whose entries were lost is picked up by another backend, which
    resets it), flood both VIPs with spoofed SYNs from the client's namespace (tests/netns/flood.py),
    then let every held connection exchange once more; returns what happened. The hold client
    sweeps its connections in turn, so a broken one that hangs costs it try_timeout once."""
    rig = nat.rig
    lbxdp(rig, "detach", HOST_IF, check=False)
    pins = Path("/sys/fs/bpf") / f"lbxdp-test-{rig.spec.prefix}-natflood"
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(pins))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    inst = Instance(HOST_IF)
    cfg = model.Config(vips=tuple(rig.nat_vip(f, "tcp", port=VIP_PORT, snat=nat.snat) for f in (4, 6)))
    out: dict = {}
    flood_proc = None
    # As where DNAT backends route everything via the balancer: their SYN-ACKs to the flood's
    # sources come back through lb (then to the client's MAC, which drops them), so the flood's
    # entries are looked up again, as a real connection's are, and the LRU cannot tell them apart.
    routes = [(be, v, net, str(rig.addr4(LB) if v == "-4" else rig.addr6(LB)))
              for be in rig.backends for v, net in (("-4", FLOOD_NET4), ("-6", FLOOD_NET6))] if not nat.snat else []
    try:
        for be, v, net, via in routes:
            rig.run(be, "ip", v, "route", "replace", net, "via", via)
        with nsx.in_netns(rig.ns(LB)):
            control.attach(inst, cfg, model.XdpMode.GENERIC, build=loader.BuildConfig(inst.pin_dir, defines=defines))
        with rig.hold(rig.spec.vip4, VIP_PORT, conns=HELD, interval=HELD_INTERVAL, duration=300,
                      try_timeout=try_timeout) as held:
            ready = held.wait_ready(timeout=60)
            assert ready["open"] == HELD, ready
            argv = [sys.executable, str(FLOOD), HOST_IF, rig.mac(LB), rig.mac(CLI), str(rig.spec.vip4),
                    str(rig.spec.vip6), str(VIP_PORT), "--kind", "syn", "--seconds", str(FLOOD_SECONDS),
                    "--max-packets", str(FLOOD_MAX_PACKETS)]
            flood_proc = subprocess.Popen([*nsx.ns_cmd(rig.ns(CLI)), *argv], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=processes.python_env(),
                                          preexec_fn=processes.set_pdeathsig)
            stdout, stderr = flood_proc.communicate(timeout=FLOOD_SECONDS + 90)   # the pool is built first
            assert flood_proc.returncode == 0, stderr
            out["flood"] = json.loads(stdout)
            with control.open_maps(inst) as m:
                out["nat"] = nat_summary(m)
            time.sleep(HELD_INTERVAL + 2)   # every held connection exchanges after the flood
            out["held"] = held.stop(timeout=HELD * try_timeout + 30)
    finally:
        if flood_proc is not None and flood_proc.poll() is None:
            flood_proc.kill()
            flood_proc.wait(10)
        with nsx.in_netns(rig.ns(LB)):
            control.detach(inst)
        shutil.rmtree(pins, ignore_errors=True)
        for be, v, net, via in routes:
            rig.run(be, "ip", v, "route", "del", net, "via", via, check=False)
    conns = out["held"]["conns"]
    out["broken"] = [c for c in conns if not c["open"] or c["errors"] or c["sent"] != c["received"] or not c["sent"]]
    st, nat_st = out["flood"], out["nat"]
    out["figures"] = (f"{st['sent']} spoofed SYNs in {st['seconds']}s = {st['pps']}/s; "
                      f"held {len(conns) - len(out['broken'])}/{len(conns)} intact; after the flood: {nat_st.live} conntrack entries, {nat_st.handshakes} "
                      f"handshake entries (of {nat_st.handshake_capacity})")
    return out


def test_a_syn_flood_breaks_no_established_nat_connection(dnat: Nat, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = nat_flood(dnat, tmp_path, monkeypatch)
    print(f"\n[nat flood] handshake table: {out['figures']}")
    assert not out["broken"], f"{len(out['broken'])} held connections broke: {out['broken'][:3]}; {out['figures']}"
    assert out["flood"]["sent"] >= 2 * abi.NAT_CAPACITY, f"the flood churned less than a conntrack: {out['figures']}"
    assert out["nat"].handshakes > abi.NAT_NEW_CAPACITY // 2, out["figures"]   # the flood's entries: there


def test_without_the_handshake_table_the_same_flood_breaks_nat_connections(dnat: Nat, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = nat_flood(dnat, tmp_path, monkeypatch, defines=("LBX_NAT_NO_HANDSHAKE_TABLE",), try_timeout=0.5)
    print(f"\n[nat flood] no handshake table: {out['figures']}")
    assert out["broken"], f"the flood broke nothing without the handshake table: the test cannot fail; {out['figures']}"
