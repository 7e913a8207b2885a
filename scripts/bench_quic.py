"""QUIC id routing vs UDP established in one run (issue 13), with scripts/bench_datapath.py's measure().

    sudo flock /tmp/lbxdp-heavy.lock .venv/bin/python scripts/bench_quic.py 40000 5   # calls, reps
"""
import dataclasses, os, shutil, statistics, sys, uuid, ipaddress
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
import bench_datapath as bd
from lbxdp import bpfsys, loader, model
from lbxdp.balancer import Balancer
from lbxdp.maps import Maps

CALLS, REPS = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {1})
ip = ipaddress.ip_address
def bes(prefix, tag, sids):
    return tuple(model.Backend(ip(f"{prefix}{i+1}"), 443, mac=f"02:be:{tag:02x}:00:00:{i+1:02x}", server_id=s)
                 for i, s in enumerate(sids))
cfg = model.Config(vips=(
    model.Vip(ip(bd.VIP4), 443, model.Protocol.UDP, backends=bes("10.99.5.", 5, [0x101 * (i + 1) for i in range(8)]), quic=True),
    model.Vip(ip(bd.VIP4), 53, model.Protocol.UDP, backends=bes("10.99.6.", 6, [0] * 8)),
))
pin = Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}")
prog = loader.compile_program(loader.BuildConfig(pin_dir=pin))
try:
    maps = Maps(prog.maps); Balancer(maps).apply(cfg, macs={}); maps.set_own_mac(bd.LB_MAC)
    lb = bpfsys.TestRunner(prog.fd)
    short = bytes([0x41, 0x5a, 0x03, 0x03]) + bytes(5) + bytes(30)
    def clear():
        bd.clear_flows(maps); maps.set_flood_threshold(2**32 - 1)
    n = CALLS + bd.WARMUP
    newq = [bd.frame(bd.CLIENT4, bd.VIP4, 1024 + i % 60000, 443, 17, short) if i < 60000 else
            bd.frame("100.64.1.%d" % (i // 60000), bd.VIP4, 1024 + i % 60000, 443, 17, short) for i in range(n)]
    newu = [bd.frame(bd.CLIENT4, bd.VIP4, 1024 + i % 60000, 53, 17, b"query") if i < 60000 else
            bd.frame("100.64.1.%d" % (i // 60000), bd.VIP4, 1024 + i % 60000, 53, 17, b"query") for i in range(n)]
    cases = [
        bd.Case("udp established v4", lb, [bd.frame(bd.CLIENT4, bd.VIP4, 999, 53, 17, b"query")], bd.XDP_TX, clear),
        bd.Case("quic short header, established tuple", lb, [bd.frame(bd.CLIENT4, bd.VIP4, 998, 443, 17, short)], bd.XDP_TX, clear),
        bd.Case("udp new tuple (recorded, maglev)", lb, newu, bd.XDP_TX, clear),
        bd.Case("quic id routing: short header, new tuple (recorded)", lb, newq, bd.XDP_TX, clear),
    ]
    res = {c.name: [] for c in cases}
    for _ in range(REPS):
        for c in cases:
            res[c.name].append(bd.measure(c, CALLS))
    print(maps.quic_stats())
    for k, v in res.items():
        print(f"{k:55s} median {statistics.median(v):7.1f} ns  min {min(v):7.1f}  reps {[round(x,1) for x in v]}")
finally:
    prog.close(); shutil.rmtree(pin, ignore_errors=True)
