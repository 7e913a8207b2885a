"""Issue 11 scratch driver (docs/benchmarks.md, "Issue 11: the performance targets"): the gate rows
of scripts/bench_datapath.py (program_cases), or with --admission its admission rows, for several
bpf/ directories in one run, interleaved per repetition so that they share the machine's state.

    flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/gate_variants/multi.py --calls 50000 --reps 9 \
        before=/tmp/gatebase/bpf after=bpf            # label=dir[:DEFINE,DEFINE]
"""
import sys, uuid, shutil, statistics, os, time, argparse
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import bench_datapath as b
from lbxdp import loader, bpfsys
ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=30000); ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--rows", default="tcp syn new flow v4;tcp syn new flow v6;tcp ack new flow v4 (recorded);tcp syn new flow v4, rr;"
                "tcp established v4;tcp syn new flow v4, not under flood;non-vip pass v4", help="program_cases rows, ;-separated")
ap.add_argument("--admission", action="store_true")
ap.add_argument("--cap", type=int, default=65536)
ap.add_argument("dirs", nargs="+")  # label=dir[:DEF1,DEF2]
a = ap.parse_args()
rows = a.rows.split(";")
os.sched_setaffinity(0, {1})
n = a.calls + b.WARMUP
stub, stub_fd = loader.compile_stub()
syn4 = b.frame(b.CLIENT4, b.VIP4, 999, 80, 6)
cases = [b.Case("floor", bpfsys.TestRunner(stub_fd), [syn4], b.XDP_PASS)]
nf = {"v4": b.new_flow_frames(n, b.VIP4, b.CLIENT4), "rr": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 81),
      "v6": b.new_flow_frames(n, b.VIP6, b.CLIENT6), "ack4": b.new_flow_frames(n, b.VIP4, b.CLIENT4, tcp_flags=0x10),
      "lim4": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 83), "acl4": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 84),
      "acl6": b.new_flow_frames(n, b.VIP6, b.CLIENT6, 84),
      "lim6": b.new_flow_frames(n, b.VIP6, b.CLIENT6, 83)}
progs, pins = [], []
try:
    for spec in a.dirs:
        label, _, rest = spec.partition("=")
        d, _, defs = rest.partition(":")
        pins.append(Path(f"/sys/fs/bpf/lbxdp-gp-{uuid.uuid4().hex[:10]}"))
        progs.append(loader.compile_program(loader.BuildConfig(pin_dir=pins[-1], src_dir=Path(d) if d else None,
                     flow_capacity=a.cap, defines=tuple(x for x in defs.split(",") if x))))
        if a.admission:
            cs = b.admission_cases(progs[-1], nf)
            cs = [c for c in cs if "new flow" in c.name]
        else:
            cs = [c for c in b.program_cases("", progs[-1], nf, syn4) if c.name in rows]
        cases += b.labelled(cs, label)
    reps = b.interleaved(cases, a.reps, a.calls)
finally:
    b.release(progs, stub, pins)
b.print_medians(reps, f"calls {a.calls} x reps {a.reps}")
if a.admission:
    # Paired: each row minus its program's "no rules" row of the same family in the same repetition
    # (consecutive measurements), then the median and quartiles over repetitions.
    print("paired deltas over the same program's 'no rules' row, per repetition: median (q25, q75)")
    for k, v in reps.items():
        label, _, name = k.partition(": ")
        fam = "v6" if "v6" in name else "v4"
        base = reps.get(f"{label}: admit: tcp syn new flow {fam}, no rules")
        if base is None or base is v or "new flow" not in name:
            continue
        d = sorted(x - y for x, y in zip(v, base))
        q = statistics.quantiles(d, n=4) if len(d) >= 2 else [d[0]] * 3
        print(f"| {k} | {statistics.median(d):+.1f} | ({q[0]:+.1f}, {q[2]:+.1f}) |")
