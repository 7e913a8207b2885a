"""The routed modes end to end: lbxdp encapsulates (IPIP, IP6IP6, 4-in-6, GUE over v4 and v6) to
backends in another subnet, `lbxdp decap` on each backend opens the tunnel, and the backends
answer the client from the VIP straight through the router (L3 DSR).

Shape routed (lbxdp/lab/shapes.py): cli - rt - lb on front/core, be1, be2 behind rt on back.
lb (generic XDP on eth0) sends every encapsulated frame back out of eth0 to rt's MAC (the FIB's
next hop to the backends); rt routes it to the backend; the backend's reply (from the VIP on its
lo) goes to rt and on to cli without touching lb. Backends run rp_filter=1 (strict): the decap
program strips the outer header before the stack, so only the inner source (the client) is
checked, and the backend's default route back through eth0 passes it (tests/netns/test_decap.py
measured that 1 and 2 drop when there is no route back at all).

One rig, one lbxdp instance and the decap programs are shared by the module (re-attached with each
variant's config); every test measures deltas. Cleanup: lbxdp detach, decap detach on each
backend, the rig down, nothing left (checked).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import config, model
from lbxdp.health import HealthCheck
from lbxdp.lab.rig import CLI, FAILED, HOST_IF, LB, RT, Rig, RigSpec, Shape

from . import transfer
from .daemon import started_daemons

pytestmark = pytest.mark.root

N = 300                       # connections and exchanges per variant
UPLOAD_PORT, UPLOAD_SIZE, UPLOADS = 9000, 1 << 20, 20
FLOW_PREFIX = "10.113.0.0/24"

# variant -> (VIP family, backend family, mode)
VARIANTS = {"ipip": (4, 4, "ipip"), "ip6ip6": (6, 6, "ipip"), "4in6": (4, 6, "ipip"),
            "gue4": (4, 4, "gue"), "gue6": (6, 6, "gue")}

def lbxdp(rig: Rig, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(role), *argv], capture_output=True,
                       text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"lbxdp {' '.join(argv)} in {role} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


class Routed:
    """The module's rig with lbxdp on lb and decap on every backend; configs applied by attach."""

    def __init__(self, rig: Rig, workdir: Path) -> None:
        self.rig, self.workdir, self.n = rig, workdir, 0

    def vip(self, vip_family: int, be_family: int, mode: str, proto: str, port: int | None = None,
            **fields) -> model.Vip:
        v = self.rig.vip(vip_family, proto, mode=mode, **fields)
        port = port or v.port
        bes = tuple(model.Backend(address=self.rig.addr6(r) if be_family == 6 else self.rig.addr4(r), port=port)
                    for r in self.rig.backends)
        return model.Vip(address=v.address, port=port, protocol=v.protocol, mode=v.mode, scheduler=v.scheduler,
                         backends=bes, gue_port=v.gue_port, ipip_source=v.ipip_source)

    def write(self, *vips: model.Vip, balancer: model.BalancerOptions | None = None) -> Path:
        self.n += 1
        path = self.workdir / f"routed{self.n}.toml"
        cfg = model.Config(vips=tuple(vips), **({"balancer": balancer} if balancer else {}))
        path.write_text(config.dump(cfg))
        return path

    def apply(self, *vips: model.Vip, balancer: model.BalancerOptions | None = None) -> None:
        lbxdp(self.rig, LB, "attach", HOST_IF, "--config", str(self.write(*vips, balancer=balancer)),
              "--mode", "generic")

    # -- counters ----------------------------------------------------------------------------

    def status(self) -> dict:
        return json.loads(lbxdp(self.rig, LB, "status", HOST_IF, "--json").stdout)

    def reasons(self) -> Counter:
        return Counter({f"{r['verdict']}_{r['reason']}": r["packets"] for r in self.status()["reasons"]})

    def backend_packets(self) -> Counter:
        """backend address -> packets lbxdp sent it (every VIP)."""
        out: Counter = Counter()
        for v in self.status()["vips"]:
            for b in v["backends"]:
                out[model.parse_endpoint(b["backend"])[0]] += b["packets"]
        return out

    def decapped(self) -> Counter:
        """backend address (of the family lb sends to) -> packets its decap program opened."""
        out: Counter = Counter()
        for be in self.rig.backends:
            st = json.loads(lbxdp(self.rig, be, "decap", "status", HOST_IF, "--json").stdout)
            n = st["reasons"]["pass_decap"]["packets"]
            out[be] = n
        return out

    def link(self, role: str, ifname: str = HOST_IF) -> tuple[int, int]:
        st = json.loads(self.rig.run(role, "ip", "-s", "-j", "link", "show", ifname).stdout)[0]["stats64"]
        return st["rx"]["packets"], st["tx"]["packets"]


@pytest.fixture(scope="module")
def routed() -> Iterator[Routed]:
    rig = Rig(RigSpec(shape=Shape.ROUTED, backends=2))
    decapped: list[str] = []
    attached = False
    with tempfile.TemporaryDirectory(prefix="lbxdp-routed-") as tmp:
        try:
            rig.up()
            for be in rig.backends:
                rig.run(be, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", f"net.ipv4.conf.{HOST_IF}.rp_filter=1")
                lbxdp(rig, be, "decap", "attach", HOST_IF, "--vip", str(rig.spec.vip4), "--vip", str(rig.spec.vip6),
                      "--mode", "generic")
                decapped.append(be)
            r = Routed(rig, Path(tmp))
            r.apply(*(r.vip(4, 4, "ipip", p) for p in ("tcp", "udp")))
            attached = True
            yield r
        finally:
            left = []
            if attached:   # (the health test's daemon may have detached already)
                lbxdp(rig, LB, "detach", HOST_IF, check=False)
                if rig.run(LB, "ip", "-j", "link", "show", HOST_IF, check=False).stdout.count('"xdp"'):
                    left.append("lbxdp on lb")
            for be in decapped:
                if lbxdp(rig, be, "decap", "detach", HOST_IF, check=False).returncode != 0:
                    left.append(f"decap on {be}")
            servers = list(rig.servers.values())
            rig.down()
            left += rig.leftovers() + [f"server {s.pid}" for s in servers if s.alive()]
            assert not left, f"left behind: {left}"


def _run_variant(r: Routed, vip_family: int, vips: list[model.Vip],
                 balancer: model.BalancerOptions | None = None) -> None:
    rig = r.rig
    r.apply(*vips, balancer=balancer)
    vip = rig.spec.vip4 if vip_family == 4 else rig.spec.vip6
    sent0, dec0, reasons0 = r.backend_packets(), r.decapped(), r.reasons()
    lb0, rt0 = r.link(LB), r.link(RT, rig.layout.ifname(RT, "back"))
    t0 = time.monotonic()
    tcp = rig.tcp_names(vip, count=N, timeout=60)
    udp = rig.udp_names(vip, count=N, timeout=60)
    took = time.monotonic() - t0
    assert FAILED not in tcp and sum(tcp.values()) == N, f"TCP: {tcp}"
    assert FAILED not in udp and sum(udp.values()) == N, f"UDP: {udp}"
    assert set(tcp) == set(udp) == set(rig.backends), (tcp, udp)
    sent = r.backend_packets() - sent0
    dec = r.decapped() - dec0
    forwarded = (r.reasons() - reasons0)["tx_forward"]
    lb1, rt1 = r.link(LB), r.link(RT, rig.layout.ifname(RT, "back"))
    # every frame lbxdp encapsulated for a backend was opened by that backend's decap program
    for be in rig.backends:
        a = rig.addr4(be) if vips[0].backends[0].address.version == 4 else rig.addr6(be)
        assert sent[a] == dec[be] > 0, f"{be} ({a}): lbxdp sent {sent[a]}, its decap opened {dec[be]}"
    assert forwarded == sum(sent.values())
    # Replies never cross the balancer: lb receives the client's packets and nothing else (a few
    # ARP/ND frames at most), while rt's back interface carries the backends' replies too.
    lb_rx = lb1[0] - lb0[0]
    assert forwarded <= lb_rx <= forwarded + 20, f"lb received {lb_rx} frames, forwarded {forwarded}"
    rt_rx = rt1[0] - rt0[0]
    assert rt_rx >= 2 * N, f"rt's back interface received only {rt_rx} frames from the backends"
    print(f"{vips[0].mode.value} {vip_family}->{vips[0].backends[0].address.version}: {N} TCP + {N} UDP in "
          f"{took:.1f}s; lb rx {lb_rx}, forwarded {forwarded}, replies via rt {rt_rx}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_end_to_end(routed: Routed, variant: str) -> None:
    vf, bf, mode = VARIANTS[variant]
    _run_variant(routed, vf, [routed.vip(vf, bf, mode, p) for p in ("tcp", "udp")])


def test_flow_derived_source(routed: Routed) -> None:
    """ipip_source = "flow": outer sources from a prefix that is not the balancer's. The backend's
    decap takes the outer header off before the stack, so rp_filter (strict here) only sees the
    inner source, which it can route back."""
    vips = [routed.vip(4, 4, "ipip", p, ipip_source="flow") for p in ("tcp", "udp")]
    _run_variant(routed, 4, vips, balancer=model.BalancerOptions(flow_source_v4=ipaddress.ip_network(FLOW_PREFIX)))


# -- path MTU: the tunnel's overhead at 1500 -------------------------------------------------


@pytest.fixture(scope="module")
def uploads(routed: Routed) -> Iterator[Routed]:
    with transfer.servers(routed.rig, transfer.Direction.UPLOAD, UPLOAD_SIZE, UPLOAD_PORT):
        yield routed


@pytest.mark.parametrize("family", [4, 6])
def test_uploads_learn_the_tunnel_mtu(uploads: Routed, family: int) -> None:
    """The client's full-size segments (1500 bytes: its MTU and the backends' MSS) no longer fit
    once encapsulated; lbxdp answers "fragmentation needed" / "packet too big" with the tunnel's
    inner MTU (TX_ICMP_TOO_BIG), the client shrinks its segments and every upload completes."""
    r, rig = uploads, uploads.rig
    r.apply(r.vip(family, family, "ipip", "tcp", port=UPLOAD_PORT))
    for phase in ("fresh", "after flows flush"):
        if phase != "fresh":
            lbxdp(rig, LB, "flows", "flush", "-i", HOST_IF)
        transfer.forget_pmtu(rig, CLI)
        before = r.reasons()["tx_icmp_too_big"]
        runs = transfer.run(rig, transfer.Direction.UPLOAD, family, UPLOAD_PORT, UPLOAD_SIZE, UPLOADS, deadline=10.0)
        assert all(x["reply"] == f"ok {UPLOAD_SIZE}" for x in runs), f"{phase}: incomplete uploads: {runs}"
        assert max(x["seconds"] for x in runs) < 5.0, f"{phase}: {runs}"
        assert r.reasons()["tx_icmp_too_big"] > before, f"{phase}: no ICMP too-big sent"


# -- bad input: one line, exit 2, nothing applied ------------------------------------------------


def test_bad_input_is_one_error_and_applies_nothing(routed: Routed) -> None:
    r, rig = routed, routed.rig
    r.apply(*(r.vip(4, 4, "ipip", p) for p in ("tcp", "udp")))
    before = [(v["vip"], v["mode"], [b["backend"] for b in v["backends"]]) for v in r.status()["vips"]]
    rig.run(LB, "ip", "route", "add", "unreachable", "10.99.0.0/24")
    vip4 = rig.spec.vip4
    unreachable = model.Vip(vip4, 8080, model.Protocol.TCP, model.Mode.IPIP,
                            backends=(model.Backend(ipaddress.ip_address("10.99.0.5"), 8080),))
    clash = [model.Vip(vip4, 8080, model.Protocol.TCP, model.Mode.GUE, backends=r.vip(4, 4, "gue", "tcp").backends,
                       gue_port=8080),
             r.vip(4, 4, "dsr", "udp")]
    cases = {"backend 10.99.0.5 is unreachable": [unreachable],
             "gue_port": clash,
             "dsr mode cannot cross address families": [r.vip(4, 6, "dsr", "tcp")]}
    for want, vips in cases.items():
        path = r.workdir / "bad.toml"
        path.write_text(config.dump(model.Config(vips=tuple(vips))))
        res = lbxdp(rig, LB, "attach", HOST_IF, "--config", str(path), "--mode", "generic", check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and lines[0].startswith("lbxdp: error: ") and want in lines[0], res.stderr
        assert len(lines) <= 2 and "Traceback" not in res.stderr, res.stderr   # the error and its hint
        after = [(v["vip"], v["mode"], [b["backend"] for b in v["backends"]]) for v in r.status()["vips"]]
        assert after == before, f"{want}: applied anyway"
    res = lbxdp(rig, "be1", "decap", "attach", "nosuchif0", "--vip", str(vip4), check=False)
    assert res.returncode == 2 and res.stderr.startswith("lbxdp: error: no interface named 'nosuchif0'"), res.stderr
    assert "Traceback" not in res.stderr


# -- health checks through the tunnel (last: the daemon detaches when it stops) ---------------

HEALTH_PORT = 7000
LISTEN = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def _health(r: Routed) -> dict[str, str]:
    st = r.status()
    return {b["backend"]: b["health"] for v in st["vips"] for b in v["backends"]}


def _wait_health(r: Routed, want: dict[str, str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _health(r)) and any(seen.get(k) != h for k, h in want.items()):
        assert time.monotonic() < deadline, f"health {seen}, want {want}"
        time.sleep(0.2)


def test_tunnelled_backend_is_checked_through_the_tunnel(routed: Routed, tmp_path: Path) -> None:
    """be1's VIP service is down (its listener holds its own address only), be2's is up: the
    tunnel probe (the default for ipip) marks be1 down and be2 up; via = "direct" (the plain probe
    to the backend's address) marks both up. The daemon's detach takes the tc program and its
    clsact qdisc away."""
    rig = routed.rig
    listeners = []
    try:
        for be, addr in (("be1", str(rig.addr4("be1"))), ("be2", "0.0.0.0")):
            p = subprocess.Popen([*rig.ns_cmd(be), sys.executable, "-c", LISTEN, addr, str(HEALTH_PORT)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            listeners.append(p)
            assert p.stdout.readline().strip() == "ready"

        def cfg(via: str | None) -> str:
            check = HealthCheck("tcp", interval=0.5, timeout=0.4, rise=1, fall=1, via=via)
            v = routed.vip(4, 4, "ipip", "tcp", port=HEALTH_PORT)
            v = model.Vip(v.address, v.port, v.protocol, v.mode, backends=v.backends, health=check)
            return config.dump(model.Config(vips=(v,)))

        be1, be2 = (f"{rig.addr4(b)}:{HEALTH_PORT}" for b in ("be1", "be2"))
        gen = started_daemons(rig, tmp_path)
        start = next(gen)
        try:
            d = start(cfg(None))
            d.wait_event("backend-down", backend=be1, timeout=20)
            _wait_health(routed, {be1: "down", be2: "up"})
            assert not d.events("backend-down", backend=be2)
            assert "lbxdp_probe" in rig.run(LB, "tc", "filter", "show", "dev", HOST_IF, "egress").stdout
            (tmp_path / "lbxdp0.toml").write_text(cfg("direct"))
            d.popen.send_signal(signal.SIGHUP)
            _wait_health(routed, {be1: "up", be2: "up"})
            assert d.stop() == 0
        finally:
            with contextlib.suppress(StopIteration):
                next(gen)
        qdiscs = rig.run(LB, "tc", "qdisc", "show", "dev", HOST_IF).stdout
        assert "clsact" not in qdiscs, f"the daemon's detach left the probes' qdisc: {qdiscs}"
    finally:
        for p in listeners:
            p.kill()
            p.wait(timeout=10)
