"""Issue 12 scratch driver: the NAT rows of scripts/bench_datapath.py (nat_cases) and the DSR
new-flow rows for several bpf/ directories in one run, interleaved per repetition.

    flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/gate_variants/natv.py --calls 20000 --reps 9 head=bpf x=/tmp/x/bpf
"""
import sys, uuid, shutil, statistics, os, argparse
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import bench_datapath as b
from lbxdp import loader, bpfsys
ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=20000); ap.add_argument("--reps", type=int, default=9)
ap.add_argument("--full", action="store_true", help="also the rows on a full conntrack (default capacity)")
ap.add_argument("--rows", default="tcp syn new flow v4, not under flood;tcp ack new flow v4 (recorded)",
                help="the DSR rows (program_cases), ;-separated")
ap.add_argument("--paired", metavar="LABEL", help="also print each row's per-repetition difference from this "
                "build's same row (rows of the builds measured back to back): median (q25, q75)")
ap.add_argument("dirs", nargs="+")  # label=dir[:DEF1,DEF2]
a = ap.parse_args()
os.sched_setaffinity(0, {1})
n = a.calls + b.WARMUP
stub, stub_fd = loader.compile_stub()
syn4 = b.frame(b.CLIENT4, b.VIP4, 999, 80, 6)
cases = [b.Case("floor", bpfsys.TestRunner(stub_fd), [syn4], b.XDP_PASS)]
nf = {"v4": b.new_flow_frames(n, b.VIP4, b.CLIENT4), "ack4": b.new_flow_frames(n, b.VIP4, b.CLIENT4, tcp_flags=0x10),
      "rr": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 81), "v6": b.new_flow_frames(n, b.VIP6, b.CLIENT6),
      "nat85": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 85), "nat86": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 86)}
rows = set(a.rows.split(";"))
progs, pins = [], []
roomy = 1 << (2 * n - 1).bit_length()
try:
    for spec in a.dirs:
        label, _, rest = spec.partition("=")
        d, _, defs = rest.partition(":")
        extra = tuple(x for x in defs.split(",") if x)
        for full in ((False, True) if a.full else (False,)):
            pins.append(Path(f"/sys/fs/bpf/lbxdp-nv-{uuid.uuid4().hex[:10]}"))
            progs.append(loader.compile_program(loader.BuildConfig(pin_dir=pins[-1], src_dir=Path(d) if d else None,
                         defines=extra + (() if full else (f"LBX_NAT_CAPACITY={roomy}",)))))
            cs = b.nat_cases(progs[-1], nf, full)
            if not full:   # the DSR rows on a program of their own (program_cases applies its own VIPs)
                pins.append(Path(f"/sys/fs/bpf/lbxdp-nv-{uuid.uuid4().hex[:10]}"))
                progs.append(loader.compile_program(loader.BuildConfig(pin_dir=pins[-1], src_dir=Path(d) if d else None,
                             defines=extra)))
                cs += [c for c in b.program_cases("", progs[-1], nf, syn4) if c.name in rows]
            cases += b.labelled(cs, label)
    if a.paired:   # the same row of every build back to back, so that a pair shares the moment
        order = {c.name.partition(": ")[2]: i for i, c in enumerate(cases)}
        cases.sort(key=lambda c: order.get(c.name.partition(": ")[2], -1) if c.name != "floor" else -1)
    reps = b.interleaved(cases, a.reps, a.calls)
finally:
    b.release(progs, stub, pins)
b.print_medians(reps, f"calls {a.calls} x reps {a.reps}")
if a.paired:
    print(f"paired: each row minus {a.paired}'s same row, per repetition: median (q25, q75)")
    for k, v in reps.items():
        label, _, name = k.partition(": ")
        base = reps.get(f"{a.paired}: {name}")
        if base is None or label == a.paired:
            continue
        d = sorted(x - y for x, y in zip(v, base))
        q = statistics.quantiles(d, n=4) if len(d) > 1 else [d[0]] * 3
        print(f"| {k} | {statistics.median(d):+.1f} ({q[0]:+.1f}, {q[2]:+.1f}) |")
