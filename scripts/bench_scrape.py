#!/usr/bin/env python3
"""Cost of one Prometheus scrape of lbxdp, on the real pinned maps.

Compiles the program into a private pin root (removed at the end), fills it through the real
control plane with VIPS x BACKENDS, puts FLOWS entries in the connection table, and times
`prometheus_client.generate_latest()` over the real collector (lbxdp.exporter), which opens the
pins and reads every map as a scrape does. Prints the median and max of --scrapes scrapes and
the memory of a real `lbxdp exporter` process serving the same maps over HTTP.

    sudo .venv/bin/python scripts/bench_scrape.py [--vips 100] [--backends 10] [--flows 65536]
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vips", type=int, default=100)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--flows", type=int, default=65536, help="connection-table entries (capacity 65536)")
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--nat-entries", type=int, default=0, help="NAT conntrack entries (capacity 131072): adds a "
                    "NAT VIP and times scrapes with the NAT table empty, then filled, in the same run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    pin_root = Path(tempfile.mkdtemp(prefix="lbxdp-bench-scrape-", dir="/sys/fs/bpf"))
    run_root = Path(tempfile.mkdtemp(prefix="lbxdp-bench-scrape-"))
    os.environ["LBXDP_PIN_ROOT"], os.environ["LBXDP_RUN_ROOT"] = str(pin_root), str(run_root)
    try:
        result = run(a)
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"one scrape, {a.vips} VIPs x {a.backends} backends, {result['flows']} connection-table entries, "
          f"{a.scrapes} scrapes:")
    print(f"  median {result['scrape_ms_median']:.1f} ms, max {result['scrape_ms_max']:.1f} ms, "
          f"{result['samples']} samples, {result['bytes']} bytes of text")
    if "nat_entries" in result:
        print(f"  NAT conntrack: {result['nat_entries']} entries: scrape median {result['scrape_ms_median']:.1f} ms "
              f"vs {result['nat_empty_scrape_ms_median']:.1f} ms with it empty (same run); the NAT summary alone "
              f"{result['nat_summary_ms_median']:.1f} ms")
    print(f"  over HTTP from a real `lbxdp exporter` process: median {result['http_scrape_ms_median']:.1f} ms")
    print(f"  exporter memory: RSS {result['exporter_rss_mib']:.1f} MiB after the scrapes (peak "
          f"{result['exporter_hwm_mib']:.1f} MiB); one scrape allocates at most "
          f"{result['scrape_alloc_peak_kib']:.0f} KiB of Python objects")


def exporter_process(scrapes: int) -> tuple[list[float], dict[str, float]]:
    """Start `lbxdp exporter` on the bench instance, scrape it over HTTP, read its memory, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lbxdp", "exporter", "bench0", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}/metrics", time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"exporter did not answer: {proc.stderr.read().decode()[-500:]}")
                time.sleep(0.1)
        times = []
        for _ in range(scrapes):
            t = time.perf_counter()
            urllib.request.urlopen(url, timeout=10).read()
            times.append((time.perf_counter() - t) * 1000)
        mem = {}
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                mem[key] = int(line.split()[1]) / 1024
        return times, mem
    finally:
        proc.terminate()   # ours, by its PID
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(a: argparse.Namespace) -> dict:
    from prometheus_client import generate_latest

    from lbxdp import bpfsys, loader, model
    from lbxdp.balancer import Balancer
    from lbxdp.exporter import PinnedMaps, make_registry
    from lbxdp.maps import Maps
    from lbxdp.paths import Instance

    inst = Instance("bench0")
    prog = loader.compile_program(loader.BuildConfig(inst.pin_dir))
    try:
        loader.save_schema(inst, prog.schema)
        bpfsys.obj_pin(prog.fd, inst.prog_pin)
        vips = []
        for v in range(a.vips):
            backends = tuple(model.Backend(ipaddress.ip_address(f"10.{100 + v // 250}.{v % 250}.{b + 1}"), 80,
                                           f"02:00:00:00:{v % 256:02x}:{b + 1:02x}")
                             for b in range(a.backends))
            vips.append(model.Vip(ipaddress.ip_address(f"10.200.{v // 250}.{v % 250 + 1}"), 80,
                                  model.Protocol.TCP, backends=backends))
        maps = Maps(prog.maps)
        opts = model.BalancerOptions()
        if a.nat_entries:
            opts = model.BalancerOptions(snat_v4=ipaddress.ip_address("10.250.0.1"), snat_ports=(20000, 59999))
            nat_be = tuple(model.Backend(ipaddress.ip_address(f"10.251.0.{b + 1}"), 8080, f"02:00:00:fb:00:{b + 1:02x}")
                           for b in range(a.backends))
            vips.append(model.Vip(ipaddress.ip_address("10.250.1.1"), 80, model.Protocol.TCP, model.Mode.NAT,
                                  backends=nat_be, snat=True))
        Balancer(maps).apply(model.Config(tuple(vips), balancer=opts), macs={})
        fm = maps.flow_map
        n = min(a.flows, fm.info.max_entries)
        keys, vals = [], []
        for i in range(n):
            k = fm.Key()
            k.family, k.proto, k.sport, k.dport = 4, 6, i & 0xFFFF, 80
            k.src.w[0], k.dst.w[0] = 0x0A000000 + i, 0x0AC80001
            keys.append(k)
            vals.append(fm.Leaf(1, 0))
        for i in range(0, n, 8192):
            fm.update_batch(keys[i:i + 8192], vals[i:i + 8192])

        registry = make_registry(PinnedMaps(None, ["bench0"]))
        text = generate_latest(registry)   # warm-up (imports, first open)
        nat = {}
        if a.nat_entries:
            nat = fill_nat(maps, a, lambda: generate_latest(registry))
        times = []
        for _ in range(a.scrapes):
            t = time.perf_counter()
            text = generate_latest(registry)
            times.append((time.perf_counter() - t) * 1000)
        tracemalloc.start()
        generate_latest(registry)
        _, alloc_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        http_ms, rss = exporter_process(a.scrapes)
        return {
            "http_scrape_ms_median": statistics.median(http_ms), "exporter_rss_mib": rss["VmRSS"],
            "exporter_hwm_mib": rss["VmHWM"],
            "vips": a.vips, "backends": a.backends, "flows": n, "scrapes": a.scrapes,
            "scrape_ms_median": statistics.median(times), "scrape_ms_max": max(times),
            "samples": sum(1 for line in text.decode().splitlines() if line and not line.startswith("#")),
            "bytes": len(text),
            "scrape_alloc_peak_kib": alloc_peak / 1024, **nat,
        }
    finally:
        prog.close()


def fill_nat(maps, a: argparse.Namespace, scrape) -> dict:
    """Time scrapes with the NAT table empty, then fill it with a.nat_entries live entries (half
    forward, half reply; the replies to the SNAT address, all states) and time the NAT summary
    alone. The caller times the filled scrapes."""
    from lbxdp import abi, conntrack
    from lbxdp.maps import nat_now
    empty = []
    for _ in range(a.scrapes):
        t = time.perf_counter()
        scrape()
        empty.append((time.perf_counter() - t) * 1000)
    m = maps.m[abi.Map.NAT]
    n = min(a.nat_entries, m.info.max_entries)
    now, snat = nat_now(), ipaddress.ip_address("10.250.0.1").packed
    keys, vals = [], []
    for i in range(n):
        k, v = m.Key(), m.Leaf()
        k.family, k.proto = 4, 6 if i % 4 else 17
        k.sport, k.dport = socket.htons(1024 + (i >> 1) % 60000), socket.htons(80)
        k.src.w[0] = 0x0A000000 + i
        if i % 2:
            ctypes.memmove(ctypes.addressof(k.dst), snat, 4)   # a reply to the SNAT address
        else:
            k.dst.w[0] = 0x0AFA0101
        v.dir, v.state, v.family, v.proto = i % 2, (i >> 1) % 4, 4, k.proto
        v.backend_id, v.seen, v.created, v.timeout = 0, now, now, 1 << 30
        keys.append(k)
        vals.append(v)
    for i in range(0, n, 8192):
        m.update_batch(keys[i:i + 8192], vals[i:i + 8192])
    summary = []
    for _ in range(a.scrapes):
        t = time.perf_counter()
        conntrack.summarize(maps)
        summary.append((time.perf_counter() - t) * 1000)
    return {"nat_entries": m.count(), "nat_empty_scrape_ms_median": statistics.median(empty),
            "nat_summary_ms_median": statistics.median(summary), "nat_summary_ms_max": max(summary)}


if __name__ == "__main__":
    main()
