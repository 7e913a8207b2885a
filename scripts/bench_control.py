#!/usr/bin/env python3
"""Cost of applying changes through the real control plane (Balancer.apply on real maps).

The program is compiled into a private pin root under /sys/fs/bpf (removed at the end) and
filled by lbxdp.balancer.Balancer.apply, exactly as `lbxdp attach`, a daemon reload or
`lbxdp backend ...` fill it; every time is wall-clock time around one apply().

  1. One change: one VIP with a 65537-slot Maglev table and --backends backends, default
     build (16384 backend entries). --changes applies in a cycle: remove a backend, add it back,
     set its weight to 2, set it back to 1 (the next backend each cycle). Median and max, and the
     median split into phases (below).
  2. A cold load: --vips VIPs x --backends backends (Maglev 65537) applied to empty maps, on a
     build with room for them (LBX_MAX_BACKENDS 16384, the default since the 4096 of the first
     version held only 409 VIPs of 10; LBX_MAX_VIPS 1024). Then the kernel memory of the VIP tables (memlock
     of each inner map, from /proc/self/fdinfo), a no-op re-apply of the same config (the tables'
     tags say nothing changed) and one backend change re-applied with the whole config (what a
     daemon reload does).
  3. Both again with the Maglev fill in pure Python (LBXDP_RING_PURE=1) for comparison.

Phases: "read" is reading the maps (VIPs, backend entries, the VIP filter); "build" is
lbxdp.ring filling tables; "fill" is creating the new inner maps and writing their slots;
"swap" is the writes of lbx_tables (the kernel waits an RCU grace period after every update of a
map of maps, so that the old table is no longer in use when the call returns); "other" is the
rest (backend entries, VIP metas, counters, the Python in between).

    sudo .venv/bin/python scripts/bench_control.py     # = --changes 50 --vips 1000 --backends 10 --fill both
    sudo .venv/bin/python scripts/bench_control.py --fill c --json
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lbxdp import bpfsys, loader, model, ring  # noqa: E402
from lbxdp.balancer import Balancer  # noqa: E402
from lbxdp.maps import Maps  # noqa: E402

TARGET_CHANGE_MS = 20.0
TARGET_LOAD_S = 5.0
LOAD_MAX_BACKENDS = 16384
PHASES = ("read", "build", "fill", "swap", "other")


# --- configs ---------------------------------------------------------------------------------------
def make_vip(v: int, n: int, weights: dict[int, int] | None = None, skip: int | None = None) -> model.Vip:
    """VIP number v (10.200.x.y:80/tcp) with n backends, MACs given (no neighbour lookups)."""
    ip = ipaddress.ip_address
    bes = tuple(model.Backend(ip(f"10.{100 + v // 250}.{v % 250}.{b + 1}"), 8080,
                              mac=f"02:00:00:{v >> 8:02x}:{v & 255:02x}:{b + 1:02x}",
                              weight=(weights or {}).get(b, 1))
                for b in range(n) if b != skip)
    return model.Vip(ip(f"10.200.{v // 250}.{v % 250 + 1}"), 80, model.Protocol.TCP, backends=bes)


def change_cycle(n: int) -> Iterator[tuple[str, model.Vip]]:
    """Endless: (what changed, VIP 0 after the change), each one backend change away from the last."""
    k = 0
    while True:
        b = k % n
        yield f"remove {b}", make_vip(0, n, skip=b)
        yield f"add {b}", make_vip(0, n)
        yield f"weight {b} 1->2", make_vip(0, n, {b: 2})
        yield f"weight {b} 2->1", make_vip(0, n)
        k += 1


# --- timing ----------------------------------------------------------------------------------------
class Phases:
    """Wall time spent inside chosen functions, by phase; patched in for the life of the bench."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)
        spent = self.spent

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[phase] += time.perf_counter() - t
        had = attr in vars(owner)   # a module's function, or a method found on the class
        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, fn) if had else delattr(owner, attr))

    def install(self, maps: Maps) -> None:
        for name in ("vips", "backends", "vip_filter"):
            if hasattr(maps, name):
                self.wrap(maps, name, "read")
        for name in ("maglev", "weighted_rr"):
            self.wrap(ring, name, "build")
        for name in ("array_create", "array_fill", "table_fill"):
            self.wrap(bpfsys, name, "fill")
        for name in ("update", "update_batch"):
            self.wrap(maps.tables_map, name, "swap")

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """Yields a dict that holds, on exit, ms per phase (and 'total') of the block."""
        self.spent.clear()
        out: dict[str, float] = {}
        t = time.perf_counter()
        yield out
        total = time.perf_counter() - t
        out.update({p: self.spent.get(p, 0.0) * 1e3 for p in PHASES if p != "other"})
        out["other"] = total * 1e3 - sum(out.values())
        out["total"] = total * 1e3


@contextmanager
def program(pin_dir: Path, max_backends: int | None = None) -> Iterator[tuple[Maps, Balancer, Phases]]:
    build = loader.BuildConfig(pin_dir=pin_dir) if max_backends is None else \
        loader.BuildConfig(pin_dir=pin_dir, max_backends=max_backends)
    prog = loader.compile_program(build)
    maps = Maps(prog.maps)
    phases = Phases()
    phases.install(maps)
    try:
        yield maps, Balancer(maps), phases
    finally:
        phases.uninstall()
        prog.close()


# --- the figures -----------------------------------------------------------------------------------
def one_change(pin_dir: Path, n: int, changes: int) -> dict[str, Any]:
    with program(pin_dir) as (maps, lb, phases):
        lb.apply(model.Config((make_vip(0, n),)), macs={})
        cycle = change_cycle(n)
        runs = []
        for _ in range(changes):
            what, vip = next(cycle)
            with phases.measure() as ms:
                diff = lb.apply(model.Config((vip,)), macs={})
            assert not diff.empty, f"{what}: apply changed nothing"
            runs.append(ms)
    totals = [r["total"] for r in runs]
    return {"changes": changes, "ms_median": statistics.median(totals), "ms_max": max(totals),
            "phases_ms_median": {p: statistics.median(r[p] for r in runs) for p in PHASES}}


def fdinfo(fd: int) -> dict[str, str]:
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def table_memory(maps: Maps) -> dict[str, int]:
    """memlock of every VIP's inner map (what the kernel charges for it), and their slots."""
    memlock = slots = tables = 0
    for meta in maps.vips().values():
        inner = maps.tables_map.lookup(meta.id)
        if inner is None or not inner.value:
            continue
        fd = bpfsys.map_fd_by_id(inner.value)
        try:
            info = fdinfo(fd)
        finally:
            os.close(fd)
        memlock += int(info["memlock"])
        slots += meta.table_size   # not max_entries: a packed table holds four slots per entry (bpf/abi.h)
        tables += 1
    return {"tables": tables, "slots": slots, "memlock_bytes": memlock}


def cold_load(pin_dir: Path, vips: int, n: int) -> dict[str, Any]:
    cfg = model.Config(tuple(make_vip(v, n) for v in range(vips)))
    with program(pin_dir, LOAD_MAX_BACKENDS) as (maps, lb, phases):
        with phases.measure() as load:
            lb.apply(cfg, macs={})
        assert len(maps.vips()) == vips
        mem = table_memory(maps)
        noop = []
        for _ in range(3):
            with phases.measure() as ms:
                diff = lb.apply(cfg, macs={})
            assert diff.empty, f"a re-apply of the same config changed {diff.lines[:3]}"
            noop.append(ms)
        changed = []
        for i in range(4):  # remove, add back: one VIP changes, the other 999 are re-checked
            vip0 = make_vip(0, n, skip=0) if i % 2 == 0 else make_vip(0, n)
            with phases.measure() as ms:
                lb.apply(dataclasses.replace(cfg, vips=(vip0,) + cfg.vips[1:]), macs={})
            changed.append(ms)
    return {"vips": vips, "backends_per_vip": n, "load": load, **mem,
            "noop_ms_median": statistics.median(r["total"] for r in noop),
            "noop_phases_ms_median": {p: statistics.median(r[p] for r in noop) for p in PHASES},
            "change_in_full_ms_median": statistics.median(r["total"] for r in changed),
            "change_in_full_phases_ms_median": {p: statistics.median(r[p] for r in changed) for p in PHASES}}


@contextmanager
def fill(kind: str) -> Iterator[str]:
    """Maglev tables filled by the C helper ('c') or in Python ('python') inside the block."""
    old = os.environ.get(ring.ACCEL_ENV)
    if kind == "python":
        os.environ[ring.ACCEL_ENV] = "1"
    else:
        os.environ.pop(ring.ACCEL_ENV, None)
    ring._lib.cache_clear()  # it reads the variable once
    try:
        helper = ring.accelerator()
        if kind == "c" and helper is None:
            raise SystemExit("no C helper: build it with `python -m lbxdp.ring build`, or use --fill python")
        yield str(helper) if helper else "pure Python"
    finally:
        if old is None:
            os.environ.pop(ring.ACCEL_ENV, None)
        else:
            os.environ[ring.ACCEL_ENV] = old
        ring._lib.cache_clear()


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}"


def phases_str(p: dict[str, float]) -> str:
    return ", ".join(f"{k} {p[k]:.1f}" for k in PHASES)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=50, help="single changes to time (50)")
    ap.add_argument("--vips", type=int, default=1000, help="VIPs of the cold load (1000; at most 1024)")
    ap.add_argument("--backends", type=int, default=10, help="backends per VIP (10)")
    ap.add_argument("--fill", choices=["both", "c", "python"], default="both",
                    help="Maglev fill: the C helper, pure Python, or both (both)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("compiling and loading the program needs root")
    if not 1 <= a.vips <= 1024 or a.vips * a.backends >= LOAD_MAX_BACKENDS:
        ap.error(f"--vips must be 1..1024 and --vips x --backends under {LOAD_MAX_BACKENDS}")

    results: dict[str, Any] = {}
    pin_root = Path(tempfile.mkdtemp(prefix="lbxdp-bench-control-", dir="/sys/fs/bpf"))
    try:
        for kind in (["c", "python"] if a.fill == "both" else [a.fill]):
            with fill(kind) as helper:
                results[kind] = {"helper": helper,
                                 "one_change": one_change(pin_root / f"{kind}-one", a.backends, a.changes),
                                 "cold_load": cold_load(pin_root / f"{kind}-load", a.vips, a.backends)}
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)

    if a.json:
        print(json.dumps({"machine": machine(), "args": vars(a), "results": results}, indent=2))
        return 0
    kinds = list(results)
    print(f"{machine()}; Maglev fill: " + "; ".join(f"{k}: {results[k]['helper']}" for k in kinds))
    print()
    print("| figure | " + " | ".join("C helper" if k == "c" else "pure Python" for k in kinds) + " | target |")
    print("|---|" + "---:|" * len(kinds) + "---|")

    def row(label: str, fmt: Callable[[dict[str, Any]], str], target: str = "") -> None:
        print(f"| {label} | " + " | ".join(fmt(results[k]) for k in kinds) + f" | {target} |")

    n, v = a.backends, a.vips
    row(f"one change, 1 VIP x {n}, Maglev 65537: median ({a.changes} changes)",
        lambda r: f"{r['one_change']['ms_median']:.1f} ms", f"<= {TARGET_CHANGE_MS:.0f} ms")
    row("one change: max", lambda r: f"{r['one_change']['ms_max']:.1f} ms")
    for p in PHASES:
        row(f"one change: {p} (median)", lambda r, p=p: f"{r['one_change']['phases_ms_median'][p]:.1f} ms")
    row(f"cold load, {v} VIPs x {n}, Maglev 65537", lambda r: f"{r['cold_load']['load']['total'] / 1e3:.2f} s",
        f"<= {TARGET_LOAD_S:.0f} s")
    for p in PHASES:
        row(f"cold load: {p}", lambda r, p=p: f"{r['cold_load']['load'][p] / 1e3:.2f} s")
    row("kernel memory of the tables (memlock)",
        lambda r: f"{r['cold_load']['memlock_bytes'] / 2**20:.1f} MiB")
    row(f"no-op re-apply of the {v} VIPs (median of 3)", lambda r: f"{r['cold_load']['noop_ms_median']:.0f} ms")
    row(f"one change re-applied with all {v} VIPs (median of 4)",
        lambda r: f"{r['cold_load']['change_in_full_ms_median']:.0f} ms")
    print()
    for k in kinds:
        c = results[k]["cold_load"]
        print(f"{k}: {c['tables']} tables, {c['slots']} slots, memlock {c['memlock_bytes']} bytes "
              f"({c['memlock_bytes'] / c['slots']:.2f} B/slot); no-op phases (ms): "
              f"{phases_str(c['noop_phases_ms_median'])}; change-in-full phases (ms): "
              f"{phases_str(c['change_in_full_phases_ms_median'])}")
    for k in kinds:
        one, load = results[k]["one_change"]["ms_median"], results[k]["cold_load"]["load"]["total"] / 1e3
        print(f"target ({k}) one change <= {TARGET_CHANGE_MS:.0f} ms: {one:.1f} ms "
              f"{'PASS' if one <= TARGET_CHANGE_MS else 'MISS'}; cold load <= {TARGET_LOAD_S:.0f} s: {load:.2f} s "
              f"{'PASS' if load <= TARGET_LOAD_S else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
