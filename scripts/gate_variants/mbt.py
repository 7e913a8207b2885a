"""Issue 11 scratch driver (docs/benchmarks.md): ACL rows (1000 random-length prefixes) on the kernel LPM trie vs a stride-4 multibit trie in a flat array."""
import sys, uuid, shutil, statistics, os, argparse, socket, ctypes, ipaddress
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import bench_datapath as b
from lbxdp import loader, bpfsys, abi
from lbxdp.maps import Maps, acl_entries
ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=30000); ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--prefixes", type=int, default=1000)
ap.add_argument("--stride", type=int, default=4)
ap.add_argument("--lpm", default="bpf", help="bpf/ with the kernel LPM trie")
ap.add_argument("--multibit", required=True, help="bpf/ with patches/mbt.patch (stride 4) or mbt8.patch (8)")
a = ap.parse_args()
b.ACL_PREFIXES = a.prefixes
os.sched_setaffinity(0, {1})
n = a.calls + b.WARMUP
nf = {"v4": b.new_flow_frames(n, b.VIP4, b.CLIENT4), "v6": b.new_flow_frames(n, b.VIP6, b.CLIENT6),
      "lim4": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 83), "acl4": b.new_flow_frames(n, b.VIP4, b.CLIENT4, 84),
      "acl6": b.new_flow_frames(n, b.VIP6, b.CLIENT6, 84)}

def build(groups):
    S = a.stride; W = 1 << S
    nodes = [[0] * W]
    vlen = {}
    roots = {}
    def new():
        nodes.append([0] * W); return len(nodes) - 1
    for key, rules in groups.items():
        root, rv = new(), 0
        bits = 32 if key[1] == 4 else 128
        for net, act in sorted(rules, key=lambda r: r[0].prefixlen):
            L, v = net.prefixlen, int(act) + 1
            if L == 0:
                rv = v; continue
            x = int(net.network_address)
            nib = lambda lvl: (x >> (bits - S * (lvl + 1))) & (W - 1)
            d = (L - 1) // S
            node = root
            for lvl in range(d):
                e = nodes[node][nib(lvl)]
                child = e >> 2
                if not child:
                    child = new(); nodes[node][nib(lvl)] = child << 2 | (e & 3)
                node = child
            k = L - S * d
            base = nib(d) & ((W - 1) & ~((1 << (S - k)) - 1))
            for s in range(base, base + (1 << (S - k))):
                if vlen.get((node, s), -1) <= L:
                    nodes[node][s] = (nodes[node][s] & ~3) | v; vlen[(node, s)] = L
        roots[key] = root << 2 | rv
    return nodes, roots

stub, stub_fd = loader.compile_stub()
cases = [b.Case("floor", bpfsys.TestRunner(stub_fd), [nf["v4"][0]], b.XDP_PASS)]
progs, pins = [], []
try:
    for label, d in (("lpm", a.lpm), ("multibit", a.multibit)):
        pins.append(Path(f"/sys/fs/bpf/lbxdp-gp-{uuid.uuid4().hex[:10]}"))
        p = loader.compile_program(loader.BuildConfig(pin_dir=pins[-1], src_dir=Path(d)))
        progs.append(p)
        cs = [c for c in b.admission_cases(p, nf) if "new flow" in c.name and "limit" not in c.name]
        if label == "multibit":
            m = Maps(p.maps)
            ids = {}
            for k in m.vip_map.keys():
                ids[(socket.ntohs(k.port), k.family)] = m.vip_map.lookup(k).id
            admissions = {vid: b.acl_rules(b.CLIENT4 if fam == 4 else b.CLIENT6) for (port, fam), vid in ids.items() if port == 84}
            groups = {}
            for e in acl_entries(admissions):
                groups.setdefault((e.scope, e.network.version), []).append((e.network, e.action))
            nodes, roots = build(groups)
            print(f"multibit: {len(nodes)} nodes ({len(nodes) * (1 << a.stride) * 4 // 1024} KiB)", file=sys.stderr)
            nm = bpfsys.Map.pinned(pins[-1] / "lbx_acl_nodes", ctypes.c_uint32, ctypes.c_uint32)
            rm = bpfsys.Map.pinned(pins[-1] / "lbx_acl_root", ctypes.c_uint32, ctypes.c_uint32)
            flat = [e for nd in nodes for e in nd]
            keys = list(range(len(flat)))
            for i in range(0, len(flat), 8192):
                nm.update_batch([nm.Key(k) for k in keys[i:i + 8192]], [nm.Leaf(v) for v in flat[i:i + 8192]])
            for (scope, ver), r in roots.items():
                rm.update(rm.Key(scope * 2 + (ver == 6)), rm.Leaf(r))
        cases += b.labelled(cs, label)
    # agreement check: a random address inside each of 400 random rules, both programs
    import random
    rnd = random.Random(5)
    runners = [bpfsys.TestRunner(p.fd) for p in progs]
    for client, vip in ((b.CLIENT4, b.VIP4), (b.CLIENT6, b.VIP6)):
        rules = b.acl_rules(client)
        nets = list(rules.allow) + list(rules.deny)
        bad = 0; dropped = 0
        for net in rnd.sample(nets, 400):
            addr = net.network_address + rnd.randrange(net.num_addresses)
            f = b.frame(str(addr), vip, 2000 + rnd.randrange(60000), 84, 6)
            r = [x.run(f).retval for x in runners]
            bad += r[0] != r[1]; dropped += r[0] == 1
        print(f"agreement {client}: {400 - bad}/400 same verdict ({dropped} dropped by the trie)", file=sys.stderr)
    reps = b.interleaved(cases, a.reps, a.calls)
finally:
    b.release(progs, stub, pins)
b.print_medians(reps, f"calls {a.calls} x reps {a.reps}, {a.prefixes} prefixes")
