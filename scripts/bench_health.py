#!/usr/bin/env python3
"""What lbxdp.health costs: N loopback backends checked every --interval seconds.

A child process (this script with --serve) opens --targets listeners on 127.0.0.1, one asyncio
server per port, which accept and close (tcp) or answer "HTTP/1.1 200" (http). This process runs
only the Checker, so its CPU time is the checker's: time.process_time() over wall time, as % of
one core (target: under 10% for 500 targets at 1 s). From every check's start (Result.at -
Result.latency) it takes the actual interval between two checks of one target, pooled over all
targets, and prints how far they stray from --interval (median, p99, max). The child is stopped
by its PID at the end (it also exits on its own if this process dies: it watches its stdin).

No root; loopback only.

    .venv/bin/python scripts/bench_health.py                     # 500 tcp targets, 30 s
    .venv/bin/python scripts/bench_health.py --type http --duration 60 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lbxdp.health import Checker, HealthCheck, Result, Target   # noqa: E402

HOST = "127.0.0.1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=500)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of checking")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=64, help="Checker(max_concurrency=...)")
    ap.add_argument("--type", choices=("tcp", "http"), default="tcp")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)           # the child: N listeners
    ap.add_argument("--max-seconds", type=float, default=600, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(a.serve, a.type, a.max_seconds))
        return
    result = run(a)
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.targets} {a.type} targets on {HOST}, interval {a.interval:g} s, timeout {a.timeout:g} s, "
          f"max_concurrency {a.concurrency}, {a.duration:g} s ({result['python']}, {result['cpus']} CPUs):")
    print(f"  checker CPU: {result['cpu_pct']:.1f}% of one core (user {result['user_pct']:.1f}%, "
          f"sys {result['sys_pct']:.1f}%), {result['cpu_us_per_check']:.0f} us per check")
    print(f"  checks: {result['checks']} ({result['checks_per_s']:.0f}/s, expected "
          f"{result['checks_expected']:.0f}), failed {result['failed']}")
    print(f"  interval between two checks of a target: median {result['interval_median_s']:.4f} s; deviation "
          f"from {a.interval:g} s: median {result['dev_median_ms']:.2f} ms, p99 {result['dev_p99_ms']:.2f} ms, "
          f"max {result['dev_max_ms']:.2f} ms ({result['intervals']} intervals)")
    print(f"  check latency: median {result['latency_median_ms']:.2f} ms, p99 {result['latency_p99_ms']:.2f} ms")


def run(a: argparse.Namespace) -> dict:
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(a.targets), "--type", a.type,
                              "--max-seconds", str(a.duration + 60)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()          # type: ignore[union-attr]
        if not line:
            raise SystemExit("the listener process did not start")
        ports = json.loads(line)
        return measure(a, ports)
    finally:
        os.kill(child.pid, signal.SIGTERM)
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(5)


def measure(a: argparse.Namespace, ports: list[int]) -> dict:
    check = HealthCheck(a.type, interval=a.interval, timeout=a.timeout)
    targets = [Target(f"{HOST}:{p}", HOST, p, check) for p in ports]
    seen: list[tuple[str, Result]] = []         # list.append is atomic: no lock in the hot path
    changes: list[str] = []
    checker = Checker(lambda key, healthy, r: changes.append(key), max_concurrency=a.concurrency,
                      on_result=lambda key, r: seen.append((key, r)))
    checker.set_targets(targets)
    ru0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.monotonic()
    checker.start()
    time.sleep(a.duration)
    cpu1, wall1, ru1 = time.process_time(), time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    checker.stop()
    wall, cpu = wall1 - wall0, cpu1 - cpu0

    starts: dict[str, list[float]] = {}
    for key, r in seen:
        starts.setdefault(key, []).append(r.at - r.latency)
    gaps = [b - x for s in starts.values() for x, b in zip(s, s[1:])]
    devs = sorted(abs(g - a.interval) for g in gaps)
    lat = sorted(r.latency for _, r in seen)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")   # noqa: E731
    return {
        "targets": len(targets), "type": a.type, "interval_s": a.interval, "timeout_s": a.timeout,
        "duration_s": round(wall, 3), "python": platform.python_version(), "cpus": os.cpu_count(),
        "cpu_pct": 100 * cpu / wall,
        "user_pct": 100 * (ru1.ru_utime - ru0.ru_utime) / wall, "sys_pct": 100 * (ru1.ru_stime - ru0.ru_stime) / wall,
        "cpu_us_per_check": 1e6 * cpu / max(1, len(seen)),
        "checks": len(seen), "checks_per_s": len(seen) / wall, "checks_expected": len(targets) * wall / a.interval,
        "failed": sum(not r.ok for _, r in seen), "transitions": len(changes),
        "intervals": len(gaps), "interval_median_s": statistics.median(gaps) if gaps else float("nan"),
        "dev_median_ms": 1e3 * pct(devs, 0.5), "dev_p99_ms": 1e3 * pct(devs, 0.99),
        "dev_max_ms": 1e3 * devs[-1] if devs else float("nan"),
        "latency_median_ms": 1e3 * pct(lat, 0.5), "latency_p99_ms": 1e3 * pct(lat, 0.99),
    }


async def serve(n: int, kind: str, max_seconds: float) -> None:
    """The child: n listeners; prints their ports as one JSON line, runs until SIGTERM, stdin EOF
    (the parent is gone) or max_seconds."""
    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True).start()
    servers = [await asyncio.start_server(tcp if kind == "tcp" else http, HOST, 0, backlog=128) for _ in range(n)]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    try:
        await asyncio.wait_for(done.wait(), max_seconds)
    except TimeoutError:
        pass
    for s in servers:
        s.close()


if __name__ == "__main__":
    main()
