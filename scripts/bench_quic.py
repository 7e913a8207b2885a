"""QUIC id routing vs UDP established in one run (issue 13), with scripts/bench_datapath.py's measure().

Rows (each program: the current sources, or --bpf-dir; and with --baseline-dir the same rows of
older sources, marked 'before:', interleaved per repetition so that before/after share the
machine's state):
  udp established v4                          a recorded UDP flow (the reference)
  quic short header, established tuple        a QUIC VIP's recorded tuple (no QUIC parse)
  quic short header by id, unknown tuple      the same frame every call from a tuple the table does
                                              not know (a migrated client): what every packet of a
                                              migrated connection costs when id routing records
                                              nothing (bpf/quic.h); with sources that record, the
                                              first call records it and the rest are established
  quic short header by id, new tuple each     a new tuple every call (the first packet of each
                                              migrated connection: with sources that record, an
                                              LRU insert each)
  udp new tuple (recorded, maglev)            a plain UDP VIP's first datagram, for scale
Target (issue 13): "quic short header by id, unknown tuple" <= "udp established v4" + 40 ns.

    sudo flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/bench_quic.py --calls 40000 --reps 5 \
        --baseline-dir /tmp/quic-before/bpf
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import statistics
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
import bench_datapath as bd  # noqa: E402
from lbxdp import bpfsys, loader, model  # noqa: E402
from lbxdp.balancer import Balancer  # noqa: E402
from lbxdp.maps import Maps  # noqa: E402

ip = ipaddress.ip_address
ESTABLISHED, BY_ID = "udp established v4", "quic short header by id, unknown tuple"
TARGET_NS = 40.0


def bes(prefix: str, tag: int, sids: list[int]) -> tuple[model.Backend, ...]:
    return tuple(model.Backend(ip(f"{prefix}{i+1}"), 443, mac=f"02:be:{tag:02x}:00:00:{i+1:02x}", server_id=s)
                 for i, s in enumerate(sids))


CFG = model.Config(vips=(
    model.Vip(ip(bd.VIP4), 443, model.Protocol.UDP, backends=bes("10.99.5.", 5, [0x101 * (i + 1) for i in range(8)]), quic=True),
    model.Vip(ip(bd.VIP4), 53, model.Protocol.UDP, backends=bes("10.99.6.", 6, [0] * 8)),
))
SHORT = bytes([0x41, 0x5a, 0x03, 0x03]) + bytes(5) + bytes(30)   # short header, DCID of server id 0x0303
# a v1 Initial (type 0) with a client-chosen 8-byte DCID, from the established case's port
INITIAL_998 = bd.frame(bd.CLIENT4, bd.VIP4, 998, 443, 17, bytes([0xc0, 0, 0, 0, 1, 8]) + bytes(8) + bytes([0]) + bytes(40))


def many(n: int, dport: int, payload: bytes) -> list[bytes]:
    return [bd.frame(bd.CLIENT4 if i < 60000 else "100.64.1.%d" % (i // 60000), bd.VIP4, 1024 + i % 60000,
                     dport, 17, payload) for i in range(n)]


def cases(label: str, prog: loader.Program, newq: list[bytes], newu: list[bytes]) -> tuple[list[bd.Case], Maps]:
    maps = Maps(prog.maps)
    Balancer(maps).apply(CFG, macs={})
    maps.set_own_mac(bd.LB_MAC)
    lb = bpfsys.TestRunner(prog.fd)

    def clear() -> None:
        bd.clear_flows(maps)
        maps.set_flood_threshold(2**32 - 1)

    def opened() -> None:
        """The connection opened from port 998: its Initials go by the table, the second one records
        the tuple (half-open first while the VIP's table is new); a routed-by-id packet would not."""
        clear()
        for _ in range(2):
            assert lb.run(INITIAL_998).retval == bd.XDP_TX
    return [
        bd.Case(label + ESTABLISHED, lb, [bd.frame(bd.CLIENT4, bd.VIP4, 999, 53, 17, b"query")], bd.XDP_TX, clear,
                recorded=bd.recorded(maps, 999, 53)),
        bd.Case(label + "quic short header, established tuple", lb, [bd.frame(bd.CLIENT4, bd.VIP4, 998, 443, 17, SHORT)],
                bd.XDP_TX, opened, recorded=bd.recorded(maps, 998, 443)),
        bd.Case(label + BY_ID, lb, [bd.frame("100.64.9.9", bd.VIP4, 997, 443, 17, SHORT)], bd.XDP_TX, clear),
        bd.Case(label + "quic short header by id, new tuple each", lb, newq, bd.XDP_TX, clear),
        bd.Case(label + "udp new tuple (recorded, maglev)", lb, newu, bd.XDP_TX, clear),
    ], maps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=40_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--bpf-dir", type=Path, default=None, help="compile these C sources instead of bpf/")
    ap.add_argument("--baseline-dir", type=Path, default=None,
                    help="also measure these C sources (rows 'before:'), interleaved, in the same run")
    args = ap.parse_args()
    if not 1_000 <= args.calls <= 500_000 or not 1 <= args.reps <= 20:
        ap.error("--calls within 1000..500000, --reps within 1..20")
    os.sched_setaffinity(0, {args.cpu})
    n = args.calls + bd.WARMUP
    newq, newu = many(n, 443, SHORT), many(n, 53, b"query")
    progs, pins, all_cases, all_maps = [], [], [], []
    try:
        for label, src in [("", args.bpf_dir)] + ([("before: ", args.baseline_dir)] if args.baseline_dir else []):
            pins.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
            progs.append(loader.compile_program(loader.BuildConfig(pin_dir=pins[-1], src_dir=src)))
            cs, maps = cases(label, progs[-1], newq, newu)
            all_cases += cs
            all_maps.append((label, maps))
        res: dict[str, list[float]] = {c.name: [] for c in all_cases}
        for _ in range(args.reps):
            for c in all_cases:
                res[c.name].append(bd.measure(c, args.calls))
        for label, maps in all_maps:
            print(f"{label or 'after: '}quic_stats {dict((r.name, v) for r, v in maps.quic_stats().items())}")
    finally:
        for p in progs:
            p.close()
        for d in pins:
            shutil.rmtree(d, ignore_errors=True)
    print(f"{args.calls} calls x {args.reps} reps, CPU {args.cpu}")
    print("| case | median ns | min ns | reps |")
    print("|---|---:|---:|---|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    for label, _ in all_maps:
        extra = statistics.median(res[label + BY_ID]) - statistics.median(res[label + ESTABLISHED])
        print(f"target {label}{BY_ID} <= {ESTABLISHED} + {TARGET_NS:.0f} ns: {extra:+.1f} ns "
              f"{'PASS' if extra <= TARGET_NS else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
