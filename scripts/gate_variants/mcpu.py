"""Issue 11 scratch driver (docs/benchmarks.md): the recorded-new-flow (bare ACK) cost with 1 and 2 CPUs inserting into the same program's
connection table at once (fork after compile; each child pinned to its CPU, own sources)."""
import sys, uuid, shutil, statistics, os, argparse, struct
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import bench_datapath as b
from lbxdp import loader, bpfsys
from lbxdp.maps import Maps
from lbxdp.balancer import Balancer
ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=30000); ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--dport", type=int, default=80)
ap.add_argument("--flags", type=lambda x: int(x, 0), default=0x10)
ap.add_argument("dirs", nargs="+")
a = ap.parse_args()
n = a.calls + b.WARMUP
frames = {0: b.new_flow_frames(n, b.VIP4, "100.64.0.1", a.dport, a.flags), 1: b.new_flow_frames(n, b.VIP4, "100.65.0.1", a.dport, a.flags)}

def child(fd, cpu, w):
    os.sched_setaffinity(0, {cpu})
    r = bpfsys.TestRunner(fd)
    fr = frames[cpu]
    for i in range(b.WARMUP):
        r.run(fr[a.calls + i])
    t = 0
    for i in range(a.calls):
        t += r.run(fr[i]).duration_ns
    os.write(w, struct.pack("d", t / a.calls))
    os._exit(0)

def run(fd, cpus):
    pids, pipes = [], []
    for c in cpus:
        rd, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            child(fd, c, w)
        pids.append(pid); pipes.append(rd)
    out = []
    for pid, rd in zip(pids, pipes):
        os.waitpid(pid, 0); out.append(struct.unpack("d", os.read(rd, 8))[0]); os.close(rd)
    return out

progs, pins, res = [], [], {}
try:
    for spec in a.dirs:
        label, _, d = spec.partition("=")
        pins.append(Path(f"/sys/fs/bpf/lbxdp-gp-{uuid.uuid4().hex[:10]}"))
        p = loader.compile_program(loader.BuildConfig(pin_dir=pins[-1], src_dir=Path(d) if d else None))
        progs.append((label, p))
        m = Maps(p.maps); Balancer(m).apply(b.config(), macs={}); m.set_own_mac(b.LB_MAC); m.set_flood_threshold(2**32 - 1)
    for _ in range(a.reps):
        for label, p in progs:
            m = Maps(p.maps)
            for cpus in ([1], [0, 1]):
                b.clear_flows(m)
                r = run(p.fd, cpus)
                res.setdefault(f"{label} {len(cpus)} cpu", []).extend(r)
finally:
    for _, p in progs: p.close()
    for d in pins: shutil.rmtree(d, ignore_errors=True)
for k, v in res.items():
    print(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} | {' '.join(f'{x:.0f}' for x in v)} |")
