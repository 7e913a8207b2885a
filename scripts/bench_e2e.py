#!/usr/bin/env python3
"""End to end (issue 15): lbxdp against the balancers users would pick instead, in one run.

Three rigs of its own (lbxdp.lab; unique prefixes; always torn down, also on failure or Ctrl-C),
2 nginx backends (scripts/bench_e2e_nat.py's: 1 worker, `return 200`) and a small C UDP echo
server (compiled here with gcc) on port 8080 of every backend:

    l2 rig    direct      cli -> be1:8080, no balancer at all
              lbxdp-dsr   lbxdp DSR (MAC rewrite, XDP_TX), VIP:8080 tcp+udp; backends answer directly
    nat rig   lbxdp-nat   lbxdp NAT (DNAT, snat = false), VIP:80 -> :8080 tcp+udp, XDP_TX both ways
              nftables    nftables DNAT (numgen round robin) + conntrack, lb forwards; lbxdp detached
              haproxy     HAProxy in TCP mode on lb (VIP on lb's lo, roundrobin, default threads);
                          no UDP (HAProxy does not balance UDP)
    routed rig lbxdp-ipip lbxdp IPIP, VIP:8080 tcp+udp (cli - rt - lb; backends behind rt): lb
              lbxdp-gue   encapsulates back out of eth0 via rt; `lbxdp decap` (strict, the VIP) on
                          every backend opens the tunnel (rp_filter=1), the VIP on their lo; the
                          replies go backend -> rt -> cli (L3 DSR). CAVEAT: every packet of these
                          two crosses the router rt (a forwarding namespace) that no other
                          configuration has, so their figures include rt's forwarding: compare
                          ipip with gue, and with lbxdp-dsr only with that extra hop in mind.

Metrics, each measured from the client namespace for `--duration` seconds per cell:

    keepalive   wrk -t1 -c64 http://TARGET/                   requests/s over keep-alive connections
    newconn     wrk -t1 -c32 -H 'Connection: close' ...        one request per TCP connection: conns/s
    udp         udpbench client: 8 sockets x 4 datagrams in flight (32-byte request/response)

and the CPU each operation cost: the machine's busy time (/proc/stat: all but idle, iowait,
steal) during the cell, minus user time of processes outside the rig (other jobs), divided by
the operations done. Softirq time is where lb's work lands (XDP, conntrack, forwarding), and the
2 vCPUs are saturated by client + servers, so this figure separates the balancers where the
rates alone hardly can. Rounds are interleaved: round i runs every configuration (order reversed
on odd rounds) so that drift hits all alike; only ratios of one run compare. Medians and mins
over rounds; ratios to nftables.

    flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/bench_e2e.py             # 3 rounds x 5 s
    .venv/bin/python scripts/bench_e2e.py --short --json    # 1 round x 1 s (tests/netns/test_bench_e2e.py)
    ... --rounds 5 --duration 5 --xdp-mode generic --only direct,nftables,lbxdp-nat

IPv4 only. Needs root, bcc, wrk, nginx,
haproxy, gcc (scripts/install.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_e2e_nat import (BACKEND_PORT, HZ, VIP_PORT, Lbxdp, Nftables, cpu_ticks,  # noqa: E402
                           machine_ticks, nginx_servers, parse_wrk)
from lbxdp.lab import processes             # noqa: E402
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig, RigSpec, Shape   # noqa: E402

CONFIGS = ("direct", "lbxdp-dsr", "lbxdp-nat", "nftables", "haproxy", "lbxdp-ipip", "lbxdp-gue")
METRICS = ("keepalive", "newconn", "udp")
BASE = "nftables"
SKIPPED: dict[str, str] = {}
ROUTED = ("lbxdp-ipip", "lbxdp-gue")
CAVEAT = ("lbxdp-ipip/gue run on the routed rig: their packets also cross the router rt (client - rt - lb, "
          "backends behind rt), so their figures include rt's forwarding; compare them with each other, and "
          "with lbxdp-dsr only with that extra hop in mind")

UDPBENCH_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
/* udpbench server PORT | udpbench client ADDR PORT SECONDS WINDOW SOCKETS MAXPACKETS
   server: echo every datagram back (runs until killed). client: SOCKETS connected sockets, WINDOW
   datagrams in flight on each; every reply sends the next; a 50 ms silence re-primes one per
   socket (loss); stops after SECONDS or MAXPACKETS sent; prints its counts. */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    char buf[2048];
    if (argc == 3 && !strcmp(argv[1], "server")) {
        /* replies leave from the address the request was sent to (IP_PKTINFO): under DSR that
           is the VIP on lo, which the client's connected socket expects */
        int s = socket(AF_INET, SOCK_DGRAM, 0), on = 1;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        if (s < 0 || setsockopt(s, IPPROTO_IP, IP_PKTINFO, &on, sizeof on) || bind(s, (void *)&a, sizeof a)) {
            perror("bind"); return 1;
        }
        for (;;) {
            struct sockaddr_in p; char cbuf[CMSG_SPACE(sizeof(struct in_pktinfo))];
            struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
            struct msghdr m = {.msg_name = &p, .msg_namelen = sizeof p, .msg_iov = &iov, .msg_iovlen = 1,
                               .msg_control = cbuf, .msg_controllen = sizeof cbuf};
            ssize_t n = recvmsg(s, &m, 0);
            if (n < 0) { if (errno == EINTR) continue; perror("recvmsg"); return 1; }
            struct cmsghdr *c = CMSG_FIRSTHDR(&m);
            if (c && c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
                struct in_pktinfo *pi = (struct in_pktinfo *)CMSG_DATA(c);
                pi->ipi_spec_dst = pi->ipi_addr; pi->ipi_ifindex = 0;
            } else m.msg_controllen = 0;
            iov.iov_len = n; m.msg_flags = 0;
            sendmsg(s, &m, 0);
        }
    }
    if (argc != 8 || strcmp(argv[1], "client")) { fprintf(stderr, "usage: see source\n"); return 2; }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
    double secs = atof(argv[4]); int win = atoi(argv[5]), ns = atoi(argv[6]); long maxp = atol(argv[7]);
    if (ns < 1 || ns > 64 || win < 1 || secs <= 0 || secs > 120) { fprintf(stderr, "bad limits\n"); return 2; }
    struct pollfd fds[64]; const char req[32] = "lbxdp bench_e2e udp request....";
    long sent = 0, rcvd = 0, silences = 0;
    for (int i = 0; i < ns; i++) {
        int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (s < 0 || connect(s, (void *)&a, sizeof a)) { perror("connect"); return 1; }
        fds[i] = (struct pollfd){.fd = s, .events = POLLIN};
        for (int w = 0; w < win; w++) if (send(s, req, sizeof req, 0) > 0) sent++;
    }
    double t0 = now(), end = t0 + secs;
    while (now() < end && sent < maxp) {
        int r = poll(fds, ns, 50);
        if (r <= 0) { silences++; for (int i = 0; i < ns; i++) if (send(fds[i].fd, req, sizeof req, 0) > 0) sent++; continue; }
        for (int i = 0; i < ns; i++) {
            if (!fds[i].revents) continue;
            ssize_t n;
            while ((n = recv(fds[i].fd, buf, sizeof buf, MSG_DONTWAIT)) > 0 || (n < 0 && errno == ECONNREFUSED)) {
                if (n < 0) continue;
                rcvd++;
                if (sent < maxp && send(fds[i].fd, req, sizeof req, 0) > 0) sent++;
            }
        }
    }
    printf("sent %ld received %ld silences %ld seconds %.4f\n", sent, rcvd, silences, now() - t0);
    return 0;
}
"""

HAPROXY_CFG = """\
global
    maxconn 4000
    pidfile {run}/haproxy.pid
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind {vip}:{port}
    default_backend be
backend be
    balance roundrobin
{servers}
"""


# -- the configurations: context managers that set a rig up for one, and where to send -------------


class Direct:
    """No balancer: the client talks to be1's own address (l2 rig: be1 answers on-link)."""

    name = "direct"

    def __init__(self, rig: Rig) -> None:
        self.rig, self.target, self.port = rig, str(rig.addr4("be1")), BACKEND_PORT

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class HAProxy:
    """HAProxy (TCP mode) in lb's namespace, bound to the VIP (added to lb's lo for the round);
    stopped by PID and the VIP removed on exit."""

    name = "haproxy"

    def __init__(self, rig: Rig, workdir: Path) -> None:
        self.rig, self.target, self.port = rig, str(rig.spec.vip4), VIP_PORT
        self.run = workdir / "haproxy"
        self.run.mkdir(exist_ok=True)
        servers = "\n".join(f"    server {b} {rig.addr4(b)}:{BACKEND_PORT}" for b in rig.backends)
        self.cfg = self.run / "haproxy.cfg"
        self.cfg.write_text(HAPROXY_CFG.format(run=self.run, vip=self.target, port=VIP_PORT, servers=servers))
        self.srv = None

    def __enter__(self):
        self.rig.run(LB, "ip", "addr", "add", f"{self.target}/32", "dev", "lo")
        try:
            self.srv = processes.start(self.rig.ns(LB), ["haproxy", "-db", "-f", str(self.cfg)],
                                       self.run / "log", False, "haproxy in lb")
            deadline = time.monotonic() + 10
            while not self.rig.run(LB, "ss", "-Htln", f"sport = :{VIP_PORT}").stdout.strip():
                if time.monotonic() > deadline or not self.srv.alive():
                    raise RuntimeError(f"haproxy does not listen:\n{processes.log_tail(self.run / 'log')}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.srv is not None:
            processes.terminate(self.srv, 5.0)
            self.srv = None
        self.rig.run(LB, "ip", "addr", "del", f"{self.target}/32", "dev", "lo", check=False)


def _vip(cls):
    """Lbxdp / Nftables from bench_e2e_nat with the client's target attached."""
    class WithTarget(cls):
        def __init__(self, name: str, rig: Rig, port: int, *args, **kw) -> None:
            super().__init__(rig, *args, **kw)
            self.name, self.target, self.port = name, str(rig.spec.vip4), port
    return WithTarget


LbxdpVip, NftVip = _vip(Lbxdp), _vip(Nftables)


def make_configs(l2: Rig, nat: Rig, routed: Rig, workdir: Path, xdp_mode: str) -> dict:
    """name -> (rig, factory of the configuration's context manager)."""
    tun = {m: routed.nat_config_toml(*(routed.vip(4, p, mode=m) for p in ("tcp", "udp"))) for m in ("ipip", "gue")}
    dsr = l2.nat_config_toml(l2.vip(4, "tcp", with_mac=True), l2.vip(4, "udp", with_mac=True))
    natc = nat.nat_config_toml(*(nat.nat_vip(4, p, port=VIP_PORT, backend_port=BACKEND_PORT) for p in ("tcp", "udp")))
    return {
        "direct": (l2, lambda: Direct(l2)),
        "lbxdp-dsr": (l2, lambda: LbxdpVip("lbxdp-dsr", l2, BACKEND_PORT, 4, workdir / "dsr.toml", xdp_mode, dsr)),
        "lbxdp-nat": (nat, lambda: LbxdpVip("lbxdp-nat", nat, VIP_PORT, 4, workdir / "nat.toml", xdp_mode, natc)),
        "nftables": (nat, lambda: NftVip("nftables", nat, VIP_PORT, 4, udp=True)),
        "haproxy": (nat, lambda: HAProxy(nat, workdir)),
        "lbxdp-ipip": (routed, lambda: LbxdpVip("lbxdp-ipip", routed, BACKEND_PORT, 4, workdir / "ipip.toml",
                                                xdp_mode, tun["ipip"])),
        "lbxdp-gue": (routed, lambda: LbxdpVip("lbxdp-gue", routed, BACKEND_PORT, 4, workdir / "gue.toml",
                                               xdp_mode, tun["gue"])),
    }


def decap_lbxdp(rig: Rig, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(role), "decap", *argv],
                          capture_output=True, text=True, timeout=180, env=processes.python_env())
    if check and proc.returncode != 0:
        raise RuntimeError(f"lbxdp decap {' '.join(argv)} in {role} failed ({proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc


def decap_opened(rig: Rig) -> int:
    """Packets the backends' decap programs opened (pass_decap), summed over the backends."""
    return sum(json.loads(decap_lbxdp(rig, be, "status", HOST_IF, "--json").stdout)["reasons"]["pass_decap"]["packets"]
               for be in rig.backends)


@contextlib.contextmanager
def decap_on_backends(rig: Rig, xdp_mode: str):
    """`lbxdp decap` (strict: the VIP given) on every backend's eth0, rp_filter=1 as in
    tests/netns/test_routed.py; detached on exit, also on failure."""
    attached = []
    try:
        for be in rig.backends:
            rig.run(be, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", f"net.ipv4.conf.{HOST_IF}.rp_filter=1")
            decap_lbxdp(rig, be, "attach", HOST_IF, "--vip", str(rig.spec.vip4), "--mode", xdp_mode)
            attached.append(be)
        yield
    finally:
        for be in attached:
            decap_lbxdp(rig, be, "detach", HOST_IF, check=False)


# -- servers and measurement --------------------------------------------------------------------


def build_udpbench(workdir: Path) -> Path:
    src, exe = workdir / "udpbench.c", workdir / "udpbench"
    src.write_text(UDPBENCH_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    return exe


@contextlib.contextmanager
def udp_servers(rigs: list[Rig], exe: Path, workdir: Path):
    started = []
    try:
        for rig in rigs:
            for be in rig.backends:
                started.append(processes.start(rig.ns(be), [str(exe), "server", str(BACKEND_PORT)],
                                               workdir / f"udp-{rig.spec.prefix}-{be}.log", False,
                                               f"udpbench server in {be}"))
        yield started
    finally:
        for srv in started:
            processes.terminate(srv, 5.0)


def parse_udp(text: str) -> dict:
    m = re.search(r"sent (\d+) received (\d+) silences (\d+) seconds ([\d.]+)", text)
    if not m:
        return {"ops": 0, "rate": 0.0, "sent": 0, "silences": 0}
    sent, rcvd, sil, secs = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    return {"ops": rcvd, "rate": rcvd / secs if secs else 0.0, "sent": sent, "silences": sil}


def run_cell(rig: Rig, cfg, metric: str, a: argparse.Namespace, exe: Path) -> dict:
    """One metric against one configuration: the client's command in cli, CPU deltas around it."""
    url = f"http://{cfg.target}:{cfg.port}/"
    d = f"{a.duration:g}s"
    if metric == "keepalive":
        argv = ["wrk", "-t1", "-c64", f"-d{d}", url]
    elif metric == "newconn":
        argv = ["wrk", "-t1", "-c32", f"-d{d}", "-H", "Connection: close", url]
    else:
        argv = [str(exe), "client", cfg.target, str(cfg.port), f"{a.duration:g}", "4", "8", str(a.max_packets)]
    roles = [r for r in rig.hosts]
    # The client is our child (nsenter execs it): its CPU time is RUSAGE_CHILDREN's delta; the
    # servers (nginx, udpbench, haproxy) live on, so theirs is read from /proc.
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p0, m0, t0 = {r: cpu_ticks(rig, r) for r in roles}, machine_ticks(), time.monotonic()
    out = rig.run(CLI, *argv, timeout=a.duration + 30).stdout
    p1, m1, wall = {r: cpu_ticks(rig, r) for r in roles}, machine_ticks(), time.monotonic() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if metric == "udp":
        res = parse_udp(out)
    else:
        w = parse_wrk(out)
        res = {"rate": w["rps"], "ops": round(w["rps"] * a.duration), "socket_errors": w["socket_errors"],
               "non_2xx": w["non_2xx"]}
    client_user = (c1.ru_utime - c0.ru_utime) * HZ
    rig_user = client_user + sum(p1[r][0] - p0[r][0] for r in roles)
    delta = {k: m1[k] - m0[k] for k in m0}
    busy = sum(delta.values()) - delta["idle"] - delta["iowait"] - delta["steal"]
    others = max(0.0, delta["user"] + delta["nice"] - rig_user)      # other jobs' user time: noise
    pct = lambda ticks: round(100.0 * ticks / HZ / wall, 1)          # noqa: E731 - % of one CPU
    res["cpu"] = {"busy": pct(busy), "softirq": pct(delta["softirq"]), "others_user": pct(others)}
    res["cpu_us_per_op"] = round((busy - others) / HZ * 1e6 / res["ops"], 2) if res["ops"] else None
    if not res["rate"]:
        raise RuntimeError(f"{cfg.name} {metric}: no answers through {cfg.target}:{cfg.port}:\n{out}")
    return res


# -- report ----------------------------------------------------------------------------------------


def summarize(results: dict) -> dict:
    out = {}
    for name, per_metric in results.items():
        out[name] = {}
        for metric, cells in per_metric.items():
            rates = [c["rate"] for c in cells]
            cpus = [c["cpu_us_per_op"] for c in cells if c["cpu_us_per_op"] is not None]
            out[name][metric] = {"rate_median": statistics.median(rates), "rate_min": min(rates),
                                 "cpu_us_median": statistics.median(cpus) if cpus else None,
                                 "cpu_us_min": min(cpus) if cpus else None,
                                 "softirq_pct_median": statistics.median(c["cpu"]["softirq"] for c in cells),
                                 "busy_pct_median": statistics.median(c["cpu"]["busy"] for c in cells),
                                 "others_user_pct_max": max(c["cpu"]["others_user"] for c in cells)}
    for name in out:
        for metric, s in out[name].items():
            base = out.get(BASE, {}).get(metric)
            s["rate_vs_nft"] = round(s["rate_median"] / base["rate_median"], 2) if base else None
            s["cpu_vs_nft"] = (round(s["cpu_us_median"] / base["cpu_us_median"], 2)
                               if base and base["cpu_us_median"] and s["cpu_us_median"] else None)
    return out


def print_table(summary: dict, meta: dict) -> None:
    print(f"\nbench_e2e: {meta['rounds']} round(s) x {meta['duration']:g} s per cell, {meta['cpus']} CPUs, kernel "
          f"{meta['kernel']}, XDP {meta['xdp_mode']}, 2 backends (nginx 1 worker; udpbench echo)")
    print("rate: medians (min); CPU: us of machine busy time per operation, median; x: ratio to nftables")
    head = f"{'config':10s}" + "".join(f" | {m + ' /s':>22s} {'x':>5s} {'us/op':>6s} {'x':>5s}" for m in METRICS)
    print(head)
    print("-" * len(head))
    for name, per in summary.items():
        row = f"{name:10s}"
        for m in METRICS:
            s = per.get(m)
            if not s:
                row += f" | {'n/a':>22s} {'':>5s} {'':>6s} {'':>5s}"
                continue
            rate = f"{s['rate_median']:.0f} ({s['rate_min']:.0f})"
            fx = lambda v: f"{v:.2f}" if v is not None else "-"   # noqa: E731
            cpu = f"{s['cpu_us_median']:.1f}" if s["cpu_us_median"] is not None else "-"
            row += f" | {rate:>22s} {fx(s['rate_vs_nft']):>5s} {cpu:>6s} {fx(s['cpu_vs_nft']):>5s}"
        print(row)
    for name, why in SKIPPED.items():
        print(f"skipped {name}: {why}")
    if any(n in summary for n in ROUTED):
        print(f"note: {CAVEAT}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per cell (configuration x metric)")
    ap.add_argument("--short", action="store_true", help="1 round x 1 s per cell, no warm-up (the test)")
    ap.add_argument("--xdp-mode", choices=("native", "generic"), default="native")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--max-packets", type=int, default=5_000_000, help="UDP client's bound per cell")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.short:
        a.rounds, a.duration = 1, 1.0
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, XDP)")
    if a.rounds < 1 or not 1 <= a.duration <= 30 or a.rounds * a.duration > 60:
        ap.error("--rounds >= 1, --duration 1..30 and rounds x duration <= 60 (a locked run stays under ~8 minutes)")
    names = CONFIGS if not a.only else tuple(n for n in CONFIGS if n in a.only.split(","))
    if a.only and set(a.only.split(",")) - set(CONFIGS):
        ap.error(f"--only: unknown {set(a.only.split(',')) - set(CONFIGS)}")
    for tool in ("wrk", "nginx", "nft", "gcc") + (("haproxy",) if "haproxy" in names else ()):
        if not shutil.which(tool):
            ap.error(f"{tool} not found: run scripts/install.sh")
    if not a.json:
        for name, why in SKIPPED.items():
            print(f"skipping {name}: {why}", flush=True)

    l2 = Rig(RigSpec(shape=Shape.L2, backends=2, port=BACKEND_PORT))
    nat = Rig(RigSpec(shape=Shape.NAT, backends=2, port=BACKEND_PORT))
    routed = Rig(RigSpec(shape=Shape.ROUTED, backends=2, port=BACKEND_PORT))
    # a rig is built only if one of its configurations runs
    need = {id(rig) for rig, group in ((l2, ("direct", "lbxdp-dsr")), (nat, ("lbxdp-nat", "nftables", "haproxy")),
                                       (routed, ROUTED)) if set(group) & set(names)}
    results: dict[str, dict[str, list]] = {n: {} for n in names}
    decapped: dict[str, int] = {}      # routed configurations: packets the backends' decap opened
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbxdp-e2e-")))
        exe = build_udpbench(workdir)
        rigs = []
        for rig in (r for r in (l2, nat, routed) if id(r) in need):
            stack.enter_context(rig.up(servers=False))
            rigs.append(rig)
            if a.xdp_mode == "native":
                rig.attach_peer_stub()       # native XDP_TX on a veth needs an XDP program on the peer
            # new connections: reuse the client's TIME_WAIT ports (wrk with Connection: close)
            rig.run(CLI, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=10000 65000")
            stack.enter_context(nginx_servers(rig, workdir / rig.spec.prefix))
            if rig is routed:
                stack.enter_context(decap_on_backends(rig, a.xdp_mode))
        stack.enter_context(udp_servers(rigs, exe, workdir))
        configs = make_configs(l2, nat, routed, workdir, a.xdp_mode)
        for i in range(a.rounds):
            order = names if i % 2 == 0 else tuple(reversed(names))
            for name in order:
                rig, make = configs[name]
                with make() as cfg:
                    d0 = decap_opened(rig) if name in ROUTED else 0
                    if not a.short:   # warm-up: neighbours, conntrack, caches
                        rig.run(CLI, "wrk", "-t1", "-c8", "-d1s", f"http://{cfg.target}:{cfg.port}/", timeout=30)
                    for metric in METRICS:
                        if metric == "udp" and name == "haproxy":
                            continue
                        r = run_cell(rig, cfg, metric, a, exe)
                        results[name].setdefault(metric, []).append(r)
                        if not a.json:
                            print(f"round {i + 1} {name:10s} {metric:9s} {r['rate']:9.0f}/s  "
                                  f"{r['cpu_us_per_op']} us/op  cpu {r['cpu']}", flush=True)
                    if name in ROUTED:
                        decapped[name] = decapped.get(name, 0) + decap_opened(rig) - d0
    summary = summarize(results)
    meta = {"kernel": platform.release(), "cpus": os.cpu_count(), "rounds": a.rounds, "duration": a.duration,
            "xdp_mode": a.xdp_mode, "prefixes": [r.spec.prefix for r in (l2, nat, routed) if id(r) in need],
            "seconds": round(time.monotonic() - t_start, 1), "skipped": SKIPPED,
            "note": CAVEAT if set(ROUTED) & set(names) else None, "decapped": decapped}
    if a.json:
        print(json.dumps({"meta": meta, "summary": summary, "cells": results}, indent=2))
    else:
        print_table(summary, meta)
        print(f"({meta['seconds']} s; rig prefixes {', '.join(meta['prefixes'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
