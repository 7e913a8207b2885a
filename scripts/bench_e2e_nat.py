#!/usr/bin/env python3
"""End to end: keep-alive HTTP requests per second through lbxdp NAT mode vs nftables DNAT.

One rig of its own (lbxdp.lab, shape nat: cli, lb, be1..N on one segment, the backends routing
the client's addresses via lb; unique prefix; always torn down, also on failure or Ctrl-C):

    cli  wrk -t1 -cC --latency http://VIP:80/          (keep-alive: C connections, many requests each)
    lb   (a) lbxdp, mode = "nat" (DNAT, snat = false): XDP on eth0, XDP_TX both ways
         (b) nftables: a dnat rule in prerouting, conntrack, the kernel forwards (ip_forward=1);
             lbxdp detached
    beN  nginx (1 worker, `return 200`, keep-alive) on :8080; the VIP's port 80 maps to it

The same topology, backends and client for both; rounds alternate (b), (a), (b), (a), ... so that
drift (thermal, noisy neighbours) hits both alike, and only the ratio of one run compares. Each
round runs `--duration` seconds after a 1 s warm-up. For every round it prints requests/s,
latency (wrk's p50/p99), and where the 2 CPUs went: the CPU time of the processes in the client
and backend namespaces (wrk, nginx: /proc/PID/stat) and the machine's softirq time
(/proc/stat), which is where lb's work lands (XDP, or conntrack + forwarding) since lb runs no
process of its own on the data path.

    flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/bench_e2e_nat.py                 # 3 rounds x 10 s
    flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/bench_e2e_nat.py --only nft     # before lbxdp NAT exists
    ... --rounds 5 --duration 10 --conns 64 --family 6 --xdp-mode generic --json

Needs root, bcc, wrk and nginx (scripts/install.sh installs both).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lbxdp.lab import processes             # noqa: E402
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig, RigSpec, Shape   # noqa: E402

VIP_PORT, BACKEND_PORT = 80, 8080
TABLE = "lbxbench"
HZ = os.sysconf("SC_CLK_TCK")
QUIET_NOISE = 10.0     # % of one CPU of user time by other processes that a "quiet" round may see

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {run}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    default_type text/plain;
    server {{
        listen {port} reuseport;
        listen [::]:{port} reuseport;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


# -- the two balancers --------------------------------------------------------------------------


def nat_config(rig: Rig, family: int) -> str:
    """lbxdp's config: one NAT VIP (DNAT, round robin) on port 80, every backend on 8080."""
    return rig.nat_config_toml(rig.nat_vip(family, "tcp", port=VIP_PORT, backend_port=BACKEND_PORT))


def lbxdp(rig: Rig, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv],
                          capture_output=True, text=True, timeout=180, env=processes.python_env())
    if check and proc.returncode != 0:
        raise RuntimeError(f"lbxdp {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


class Lbxdp:
    """(a): lbxdp attached with the NAT VIP; detached (program and pins removed) on exit."""

    name = "lbxdp"

    def __init__(self, rig: Rig, family: int, config: Path, xdp_mode: str, text: str | None = None) -> None:
        # text: another config (scripts/bench_e2e.py: DSR, or NAT VIPs for TCP and UDP)
        self.rig, self.config, self.mode = rig, config, xdp_mode
        config.write_text(nat_config(rig, family) if text is None else text)

    def __enter__(self):
        lbxdp(self.rig, "attach", HOST_IF, "--config", str(self.config), "--mode", self.mode)
        return self

    def __exit__(self, *exc) -> None:
        lbxdp(self.rig, "detach", HOST_IF, check=False)

    def counters(self) -> dict:
        st = json.loads(lbxdp(self.rig, "status", HOST_IF, "--json").stdout)
        return {f"{r['verdict']}_{r['reason']}": r["packets"] for r in st["reasons"] if r["packets"]}


class Nftables:
    """(b): nftables DNAT with conntrack in lb's namespace (lb forwards: the nat shape has
    ip_forward=1); the table is deleted on exit."""

    name = "nftables"

    def __init__(self, rig: Rig, family: int, udp: bool = False) -> None:
        # udp: the same DNAT for UDP to the VIP's port too (scripts/bench_e2e.py)
        self.rig, self.family = rig, family
        fam = "ip" if family == 4 else "ip6"
        vip = rig.spec.vip4 if family == 4 else rig.spec.vip6
        addrs = [rig.addr4(b) if family == 4 else f"[{rig.addr6(b)}]" for b in rig.backends]
        # numgen inc: round robin over the backends, as lbxdp's rr scheduler.
        targets = ", ".join(f"{i} : {a}" for i, a in enumerate(addrs))
        rules = "".join(f"  {fam} daddr {vip} {proto} dport {VIP_PORT} dnat to numgen inc mod {len(addrs)} "
                        f"map {{ {targets} }}:{BACKEND_PORT}\n" for proto in ("tcp", "udp")[:1 + udp])
        self.ruleset = (f"table {fam} {TABLE} {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n"
                        f"{rules} }}\n}}\n")
        self.fam = fam

    def __enter__(self):
        self.rig.run(LB, "nft", "-f", "-", input=self.ruleset)
        return self

    def __exit__(self, *exc) -> None:
        self.rig.run(LB, "nft", "delete", "table", self.fam, TABLE, check=False)

    def counters(self) -> dict:
        out = self.rig.run(LB, "cat", "/proc/sys/net/netfilter/nf_conntrack_count", check=False).stdout.strip()
        return {"conntrack_entries": int(out)} if out.isdigit() else {}


# -- backends and load ---------------------------------------------------------------------------


@contextlib.contextmanager
def nginx_servers(rig: Rig, workdir: Path):
    """One nginx per backend (daemon off: its master is our child, stopped by PID)."""
    started = []
    try:
        for be in rig.backends:
            run = workdir / be
            run.mkdir(parents=True)
            conf = run / "nginx.conf"
            conf.write_text(NGINX_CONF.format(run=run, port=BACKEND_PORT, name=be))
            srv = processes.start(rig.ns(be), ["nginx", "-p", str(run), "-e", "stderr", "-c", str(conf)],
                                  run / "log", False, f"nginx in {be}")
            started.append(srv)
        for be in rig.backends:
            addr = str(rig.addr4(be))
            deadline = time.monotonic() + 10
            while rig.run(be, "wrk", "-t1", "-c1", "-d1s", f"http://{addr}:{BACKEND_PORT}/",
                          check=False).stdout.count("Requests/sec") == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx in {be} does not answer:\n{processes.log_tail(workdir / be / 'log')}")
                time.sleep(0.2)
        yield started
    finally:
        for srv in started:
            processes.terminate(srv, 5.0)


def cpu_ticks(rig: Rig, role: str) -> tuple[int, int]:
    """(utime, stime) of every process in the role's namespace (clock ticks)."""
    user = system = 0
    for pid in rig.processes_in(role):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            f = stat[stat.rindex(")") + 2:].split()
            user, system = user + int(f[11]), system + int(f[12])
    return user, system


def machine_ticks() -> dict[str, int]:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: int(v) for n, v in zip(names, f)}


def parse_wrk(text: str) -> dict:
    def dur(v: str) -> float:            # -> microseconds
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
        if not m:
            return float("nan")
        return float(m[1]) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[m[2]]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": float(rps[1]) if rps else 0.0,
            "p50_us": dur(lat.get("50", "")), "p99_us": dur(lat.get("99", "")),
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "non_2xx": int(non2xx[1]) if non2xx else 0}


def one_round(rig: Rig, target: str, a: argparse.Namespace) -> dict:
    url = f"http://{target}:{VIP_PORT}/"
    rig.run(CLI, "wrk", "-t1", f"-c{a.conns}", "-d1s", url, timeout=30)     # warm-up (ARP/ND, conntrack)
    # wrk is the only child reaped during the round (nsenter execs it): its CPU time is the
    # delta of RUSAGE_CHILDREN; the nginx processes live on, so theirs is read from /proc.
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p0, m0, t0 = {r: cpu_ticks(rig, r) for r in rig.backends}, machine_ticks(), time.monotonic()
    out = rig.run(CLI, "wrk", f"-t{a.threads}", f"-c{a.conns}", f"-d{a.duration:g}s", "--latency", url,
                  timeout=a.duration + 30).stdout
    p1, m1, wall = {r: cpu_ticks(rig, r) for r in rig.backends}, machine_ticks(), time.monotonic() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = parse_wrk(out)
    pct = lambda ticks: round(100.0 * ticks / HZ / wall, 1)   # noqa: E731 - % of one CPU
    wrk_user, wrk_sys = (c1.ru_utime - c0.ru_utime) * HZ, (c1.ru_stime - c0.ru_stime) * HZ
    ngx_user = sum(p1[r][0] - p0[r][0] for r in rig.backends)
    ngx_sys = sum(p1[r][1] - p0[r][1] for r in rig.backends)
    res["cpu"] = {"wrk (cli)": pct(wrk_user + wrk_sys), "nginx (backends)": pct(ngx_user + ngx_sys),
                  **{f"machine {k}": pct(m1[k] - m0[k]) for k in ("user", "system", "softirq", "idle")},
                  # user time of anything else on the machine (other jobs): noise in this round
                  "others user": pct(max(0, (m1["user"] + m1["nice"] - m0["user"] - m0["nice"])
                                          - wrk_user - ngx_user))}
    if res["rps"] == 0:
        raise RuntimeError(f"wrk through {target} got no answers:\n{out}")
    return res


def bottleneck(rounds: list[dict]) -> str:
    """Where the CPUs went (medians). A process's time includes the softirq work that ran in its
    context (a veth transmit runs the receiver's stack and lb's XDP or forwarding right there,
    on the sender's CPU), so the process shares and the machine's softirq share overlap."""
    cpu = {k: statistics.median(r["cpu"][k] for r in rounds) for k in rounds[0]["cpu"]}
    total = os.cpu_count() * 100
    busy = total - cpu["machine idle"]
    return (f"CPUs {busy:.0f}% busy of {total}%" + (" (saturated)" if cpu["machine idle"] < 10 else "") +
            f": wrk {cpu['wrk (cli)']:.0f}%, nginx {cpu['nginx (backends)']:.0f}% (process time, softirq "
            f"in their context included); machine user {cpu['machine user']:.0f}%, system "
            f"{cpu['machine system']:.0f}%, softirq {cpu['machine softirq']:.0f}%; other processes' user "
            f"{cpu['others user']:.0f}% (noise)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per balancer (alternating)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    ap.add_argument("--conns", type=int, default=64, help="wrk keep-alive connections")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--xdp-mode", choices=("native", "generic"), default="native")
    ap.add_argument("--only", choices=("lbxdp", "nft"), help="measure one balancer only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, XDP)")
    if a.rounds < 1 or not 1 <= a.duration <= 60:
        ap.error("--rounds >= 1 and --duration 1..60 (each locked run stays under 10 minutes)")
    for tool in ("wrk", "nginx", "nft"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found: run scripts/install.sh")

    rig = Rig(RigSpec(shape=Shape.NAT, backends=a.backends, port=BACKEND_PORT))
    results: dict[str, list[dict]] = {"nftables": [], "lbxdp": []}
    counters: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lbxdp-e2e-") as tmp, rig.up(servers=False):
        workdir = Path(tmp)
        if a.xdp_mode == "native":
            rig.attach_peer_stub()          # lbxdp.lab.stub: native XDP_TX on a veth needs it
        target = str(rig.spec.vip4) if a.family == 4 else f"[{rig.spec.vip6}]"
        balancers = []
        if a.only != "lbxdp":
            balancers.append(lambda: Nftables(rig, a.family))
        if a.only != "nft":
            balancers.append(lambda: Lbxdp(rig, a.family, workdir / "lbxdp.toml", a.xdp_mode))
        with nginx_servers(rig, workdir):
            for i in range(a.rounds):
                for make in balancers:
                    with make() as lb:
                        r = one_round(rig, target, a)
                        counters[lb.name] = lb.counters()
                    results[lb.name].append(r)
                    if not a.json:
                        print(f"round {i + 1} {lb.name:8s} {r['rps']:9.0f} req/s  p50 {r['p50_us']:7.0f} us  "
                              f"p99 {r['p99_us']:7.0f} us  errors {r['socket_errors']}  cpu {r['cpu']}", flush=True)
    summary = {name: {"rps_median": statistics.median(x["rps"] for x in rs), "rps_min": min(x["rps"] for x in rs),
                      "p50_us_median": statistics.median(x["p50_us"] for x in rs),
                      "p99_us_median": statistics.median(x["p99_us"] for x in rs),
                      "bottleneck": bottleneck(rs), "rounds": rs, "counters": counters.get(name, {})}
               for name, rs in results.items() if rs}
    ratio = pairs = quiet = None
    if len(summary) == 2:
        ratio = summary["lbxdp"]["rps_median"] / summary["nftables"]["rps_median"]
        # Round i of each balancer ran back to back: their ratio shares the moment's conditions.
        # Quiet pairs: neither round saw other processes use more than QUIET_NOISE % of a CPU.
        both = list(zip(results["nftables"], results["lbxdp"]))
        pairs = [round(x["rps"] / n["rps"], 3) for n, x in both]
        quiet = [p for p, (n, x) in zip(pairs, both)
                 if max(n["cpu"]["others user"], x["cpu"]["others user"]) <= QUIET_NOISE]
    meta = {"kernel": platform.release(), "cpus": os.cpu_count(), "family": a.family, "conns": a.conns,
            "threads": a.threads, "duration": a.duration, "backends": a.backends, "xdp_mode": a.xdp_mode}
    if a.json:
        print(json.dumps({"meta": meta, "summary": summary, "ratio_lbxdp_over_nftables": ratio,
                          "paired_ratios": pairs, "quiet_paired_ratios": quiet}, indent=2))
        return 0
    print(f"\nkeep-alive HTTP, v{a.family}, wrk -t{a.threads} -c{a.conns}, {a.rounds} x {a.duration:g} s each, "
          f"{a.backends} nginx backends, {os.cpu_count()} CPUs, kernel {platform.release()}, XDP {a.xdp_mode}:")
    for name, s in summary.items():
        print(f"  {name:8s} median {s['rps_median']:9.0f} req/s (min {s['rps_min']:.0f}), p50 {s['p50_us_median']:.0f} us, "
              f"p99 {s['p99_us_median']:.0f} us; {s['bottleneck']}")
        if s["counters"]:
            print(f"           counters after its last round: {s['counters']}")
    if ratio is not None:
        print(f"  ratio lbxdp / nftables (medians): {ratio:.2f}; per round pair: {pairs}; quiet pairs "
              f"(others' user <= {QUIET_NOISE}%): {quiet}" +
              (f", median {statistics.median(quiet):.2f}" if quiet else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
