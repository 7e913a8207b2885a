"""Issue 11 scratch variants of bpf/ (docs/benchmarks.md, "Issue 11: the performance targets"), each
one edit of a copy: make_variants.py SRC_BPF_DIR OUT_DIR makes OUT_DIR/<name>/bpf for the names below.
Measurement aids only (several break semantics on purpose); nothing here is built by lbxdp."""
import shutil, sys
from pathlib import Path

MAPS_FLOWS = 'BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_val, lbx_flows, LBX_FLOW_CAPACITY,\n\t\t LBX_PIN_DIR "/lbx_flows");'
LIMIT_MAP = 'BPF_TABLE_PINNED("lru_percpu_hash", struct src_limit_key, __u64, lbx_src_limit, LBX_SRC_LIMIT_CAPACITY,\n\t\t LBX_PIN_DIR "/lbx_src_limit", BPF_F_NO_COMMON_LRU);'
END_MAPS = "#endif /* LBX_MAPS_H */"

MBT_MAPS = '''/* scratch: multibit trie: node * 2^stride + chunk -> child << 2 | (verdict + 1) */
BPF_TABLE_PINNED("array", __u32, __u32, lbx_acl_nodes, NODES_ENTRIES, LBX_PIN_DIR "/lbx_acl_nodes");
BPF_TABLE_PINNED("array", __u32, __u32, lbx_acl_root, (LBX_MAX_VIPS + 1) * 2, LBX_PIN_DIR "/lbx_acl_root");

''' + END_MAPS

MBT_ACL = '''static __always_inline int acl_verdict(const struct lbx_admit *adm, __u32 id, const struct pkt *pkt)
{
	int v6 = pkt->flow.family != LBX_FAMILY_V4;
	__u8 want = v6 ? LBX_ADMIT_F_ACL_V6 : LBX_ADMIT_F_ACL_V4;
	__u32 ri = id * 2 + v6, *e, best, node, nmax = v6 ? 128 / STRIDE : 32 / STRIDE, w = 0;

	if (!(adm->flags & want))
		return LBX_R_OK;
	e = lbx_acl_root.lookup(&ri);
	if (!e)
		return LBX_R_OK;
	best = *e & 3;
	node = *e >> 2;
	for (__u32 i = 0; i < 128 / STRIDE; i++) {
		__u32 idx;

		if (!node || i >= nmax)
			break;
		if ((i & (32 / STRIDE - 1)) == 0)
			w = bpf_ntohl(pkt->flow.src.w[(i / (32 / STRIDE)) & 3]);
		idx = node * (1 << STRIDE) + ((w >> (32 - STRIDE - STRIDE * (i & (32 / STRIDE - 1)))) & ((1 << STRIDE) - 1));
		e = lbx_acl_nodes.lookup(&idx);
		if (!e)
			break;
		if (*e & 3)
			best = *e & 3;
		node = *e >> 2;
	}
	if (best <= 1)
		return LBX_R_OK;
	return best == 2 ? LBX_R_DROP_ACL_DENY : LBX_R_DROP_ACL_NOT_ALLOWED;
}

'''


def edit(d: Path, name: str, old: str, new: str) -> None:
    p = d / name
    s = p.read_text()
    assert old in s, (d, name, old[:60])
    p.write_text(s.replace(old, new, 1))


def nowin(d):     # a SYN counts as flooded without the per-CPU window (the window's cost)
    edit(d, "select.h", "flooded(new_flow_window(1), 1)) {", "1) {")


def notable(d):   # no inner-table lookup: backend 1 + slot % 8 (the table lookup's cost)
    edit(d, "select.h", "id = bpf_map_lookup_elem(table, &slot);", "__u32 fake = 1 + (slot & 7); id = &fake;")


def hot(d):       # the inner-table lookup of a slot among the first 8 (the call without the cache miss)
    edit(d, "select.h", "id = bpf_map_lookup_elem(table, &slot);", "slot &= 7; id = bpf_map_lookup_elem(table, &slot);")


def hotfront(d):  # a 4,096-entry hot LRU in front of lbx_flows: records go there, the 2nd packet promotes
    edit(d, "maps.h", MAPS_FLOWS, MAPS_FLOWS + '\nBPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_val, lbx_hot, 4096,\n\t\t LBX_PIN_DIR "/lbx_hot");')
    edit(d, "select.h", "	known = lbx_flows.lookup(&pkt->flow);\n	if (!known)\n		return 0;",
         """	known = lbx_hot.lookup(&pkt->flow);
	if (known) {
		struct flow_val v = *known;
		lbx_flows.update(&pkt->flow, &v);
		lbx_hot.delete(&pkt->flow);
		known = lbx_flows.lookup(&pkt->flow);
	} else {
		known = lbx_flows.lookup(&pkt->flow);
	}
	if (!known)
		return 0;""")
    edit(d, "select.h", "	struct flow_val v = { .backend_id = sel->backend_id, .gen = sel->be->gen };\n\n	lbx_flows.update(&pkt->flow, &v);\n}",
         "	struct flow_val v = { .backend_id = sel->backend_id, .gen = sel->be->gen };\n\n	lbx_hot.update(&pkt->flow, &v);\n}")


def nocommon(d):  # lbx_flows with per-CPU LRU lists
    edit(d, "maps.h", MAPS_FLOWS, MAPS_FLOWS.replace('"/lbx_flows");', '"/lbx_flows", BPF_F_NO_COMMON_LRU);'))


def lim8(d):      # the limiter's IPv4 sources in a map of their own with an 8-byte key
    edit(d, "maps.h", END_MAPS, 'struct src_limit_key4 { __u32 src; __u32 scope; };\nBPF_TABLE_PINNED("lru_percpu_hash", struct src_limit_key4, __u64, lbx_src_limit4, LBX_SRC_LIMIT_CAPACITY,\n\t\t LBX_PIN_DIR "/lbx_src_limit4", BPF_F_NO_COMMON_LRU);\n\n' + END_MAPS)
    edit(d, "limit.h", """	if (pkt->flow.family == LBX_FAMILY_V6) {
		key.src.w[2] = 0;
		key.src.w[3] = 0;
	}
	tat = lbx_src_limit.lookup(&key);
	if (!tat) {
		t = now + adm->interval_ns;
		lbx_src_limit.update(&key, &t);
		return 0;
	}""", """	if (pkt->flow.family == LBX_FAMILY_V6) {
		key.src.w[2] = 0;
		key.src.w[3] = 0;
		tat = lbx_src_limit.lookup(&key);
		if (!tat) {
			t = now + adm->interval_ns;
			lbx_src_limit.update(&key, &t);
			return 0;
		}
	} else {
		struct src_limit_key4 k4 = { .src = pkt->flow.src.w[0], .scope = id };

		tat = lbx_src_limit4.lookup(&k4);
		if (!tat) {
			t = now + adm->interval_ns;
			lbx_src_limit4.update(&k4, &t);
			return 0;
		}
	}""")


def limpch(d):    # the limiter on a per-CPU hash (no LRU: a full table admits new sources unlimited)
    edit(d, "maps.h", LIMIT_MAP, 'BPF_TABLE_PINNED("percpu_hash", struct src_limit_key, __u64, lbx_src_limit, LBX_SRC_LIMIT_CAPACITY,\n\t\t LBX_PIN_DIR "/lbx_src_limit");')


def limlookup(d): # the limiter's lookup only (no update, always admits)
    edit(d, "limit.h", "	tat = lbx_src_limit.lookup(&key);\n", "	tat = lbx_src_limit.lookup(&key);\n	return tat == 0 && now == 1;\n")


def limnone(d):   # the limiter's key only, no lookup
    edit(d, "limit.h", "	tat = lbx_src_limit.lookup(&key);\n", "	return key.scope == 7 && now == 1;\n	tat = lbx_src_limit.lookup(&key);\n")


def _mbt(d, stride, entries):
    edit(d, "maps.h", END_MAPS, MBT_MAPS.replace("NODES_ENTRIES", entries))
    s = (d / "acl.h").read_text()
    start, end = s.index("static __always_inline int acl_verdict"), s.index("#endif /* LBX_ACL_H */")
    (d / "acl.h").write_text(s[:start] + f"#define STRIDE {stride}\n" + MBT_ACL + s[end:])


def mbt(d):       # the ACL as a stride-4 multibit trie in one flat array (inlined lookups); mbt.py fills it
    _mbt(d, 4, "1 << 18")


def mbt8(d):      # the same, stride 8
    _mbt(d, 8, "1 << 24")


VARIANTS = [nowin, notable, hot, hotfront, nocommon, lim8, limpch, limlookup, limnone, mbt, mbt8]

if __name__ == "__main__":
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    for v in VARIANTS:
        dst = out / v.__name__ / "bpf"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        v(dst)
        print(dst)
