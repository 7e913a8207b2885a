#!/usr/bin/env python3
"""Cost of building Maglev tables (lbxdp.ring), with the C helper and in pure Python.

No kernel and no privileges: times lbxdp.ring.maglev() alone (median of --runs builds) for
M=65537 with 10 and 100 backends, M=4099 with 10, a weighted set, and the total for --vips VIPs
of 10 backends each at M=65537 (a cold load of a big config). The C column needs
`python -m lbxdp.ring build` (or a C compiler: it is built into a temporary directory here).

    .venv/bin/python scripts/bench_ring.py [--runs 9] [--vips 1000] [--fill both|c|python] [--json]
"""

from __future__ import annotations

import argparse
import array
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lbxdp import ring  # noqa: E402


def backends(n: int, vip: int = 0, weights: list[int] | None = None) -> list[tuple[str, int]]:
    return [(f"10.{vip // 250}.{vip % 250}.{i + 1}:8080", weights[i] if weights else 1)
            for i in range(n)]


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9, help="builds per figure (median)")
    ap.add_argument("--vips", type=int, default=1000, help="VIPs (10 backends each) for the load figure")
    ap.add_argument("--fill", choices=["both", "c", "python"], default="both")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    fills: dict[str, object] = {}
    if a.fill in ("both", "c"):
        lib = ring._lib()
        if lib is None and shutil.which("cc"):
            lib = ring.load_accelerator(ring.build_accelerator(dest=Path(tempfile.mkdtemp())))
        if lib is None:
            print("no C helper and no compiler: C figures skipped", file=sys.stderr)
        else:
            fills["c"] = lib
    if a.fill in ("both", "python"):
        fills["python"] = None

    cases = [
        ("M=65537 N=10", 65537, backends(10)),
        ("M=65537 N=100", 65537, backends(100)),
        ("M=4099 N=10", 4099, backends(10)),
        ("M=65537 N=10 weighted 1..10", 65537, backends(10, weights=list(range(1, 11)))),
    ]
    ids = list(range(1000, 1010))
    results: dict[str, dict[str, float]] = {}
    for name, lib in fills.items():
        ring._lib = lambda lib=lib: lib        # noqa: E731 - pick the fill for this column
        r: dict[str, float] = {}
        for label, m, bes in cases:
            r[label] = median_ms(lambda: ring.maglev(bes, m), a.runs)
        table = ring.maglev(backends(10))
        r["index -> backend id (65537)"] = median_ms(
            lambda: array.array("I", map(ids.__getitem__, table)), a.runs)
        vips = [backends(10, v) for v in range(a.vips)]
        t = time.perf_counter()
        for bes in vips:
            ring.maglev(bes)
        r[f"{a.vips} VIPs x 10, M=65537 (total)"] = (time.perf_counter() - t) * 1e3
        results[name] = r

    if a.json:
        print(json.dumps({"unit": "ms", "runs": a.runs, "results": results}, indent=2))
        return
    labels = list(next(iter(results.values()))) if results else []
    width = max(map(len, labels), default=10)
    print(f"{'build time (ms, median of ' + str(a.runs) + ')':<{width}}" +
          "".join(f"{name:>12}" for name in results))
    for label in labels:
        print(f"{label:<{width}}" + "".join(f"{results[n][label]:12.2f}" for n in results))


if __name__ == "__main__":
    main()
