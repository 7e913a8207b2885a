/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map of the program. Each is pinned under LBX_PIN_DIR (set by the loader to
 * /sys/fs/bpf/lbxdp/<ifname>) so a CLI process, a restarted daemon or a new program version
 * finds and reuses it. Names stay under 16 characters: the kernel keeps 15.
 */
#ifndef LBX_MAPS_H
#define LBX_MAPS_H

#include "abi.h"

#ifndef LBX_PIN_DIR
#error "LBX_PIN_DIR must be defined by the loader"
#endif

/* (vip addr, port, proto, family) -> vip_meta. Written by lbxdp.maps.Maps.put_vip only. */
BPF_TABLE_PINNED("hash", struct vip_key, struct vip_meta, lbx_vips, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_vips");

/* address-hash bit / 64 -> 64 bits of the VIP address filter (abi.h). Written by lbxdp.maps only. */
BPF_TABLE_PINNED("array", __u32, __u64, lbx_vip_filter, LBX_VIP_FILTER_WORDS,
		 LBX_PIN_DIR "/lbx_vip_filter");

/* backend id -> backend. Written by the control plane (lbxdp.maps); id 0 is never used. */
BPF_TABLE_PINNED("array", __u32, struct backend, lbx_backends, LBX_MAX_BACKENDS,
		 LBX_PIN_DIR "/lbx_backends");

/*
 * Template of the per-VIP tables below (abi.h: four 16-bit slots per u64 value, so the value
 * type is __u64); never used itself. BPF_F_INNER_MAP lets every VIP's table have its own size
 * (a 65537-slot Maglev table beside a 3-slot round robin); BPF_F_MMAPABLE lets the control
 * plane write a new table as memory (0.4 ms for 65537 slots) instead of by a batch update,
 * which the kernel applies slot by slot (13 ms). Every table gets these flags: the kernel
 * refuses an inner map whose flags differ.
 */
BPF_TABLE_PINNED("array", __u32, __u64, lbx_table_tmpl, 1, LBX_PIN_DIR "/lbx_table_tmpl",
		 BPF_F_INNER_MAP | BPF_F_MMAPABLE);

/*
 * vip id -> that VIP's table: slot -> backend id (packed four to a value, abi.h), built by
 * lbxdp.ring (Maglev or a weighted sequence). Written by lbxdp.maps.Maps.write_tables only: it
 * builds a new table aside and swaps it in with one write of this map (many VIPs' tables per
 * write), so a packet never sees a half-written table.
 */
BPF_TABLE_PINNED("array_of_maps$lbx_table_tmpl", int, int, lbx_tables, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_tables");

/*
 * flow 5-tuple -> (backend id, its generation). Written by the program when a flow starts, read for
 * every later packet so a flow keeps its backend when the backend set changes. A shared (not
 * per-CPU) LRU: one flow's packets may be handled on different CPUs.
 */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_val, lbx_flows, LBX_FLOW_CAPACITY,
		 LBX_PIN_DIR "/lbx_flows");

/*
 * The half-open table: flow hash -> a bucket of LBX_HALF_OPEN_WAYS slots, each (flow 5-tuple,
 * backend id, its generation, the SYN's time) of a flow whose opening packet (a TCP SYN, a first
 * UDP datagram) the VIP's table could not be trusted to repeat: round robin, leastconn, caps, or a
 * table that changed within LBX_SETTLE_UNITS. Written by the program (select.h); the client's next
 * packet finds it and records the flow in lbx_flows. Small, so a SYN flood churns only this table.
 * A set-associative cache in an array, not an LRU hash: a lookup is inlined (no helper call, no
 * bucket lock, no LRU list) and an insert overwrites the bucket's free or oldest slot, which an
 * LRU insert (~300 ns, docs/benchmarks.md) does not match. An entry pushed out early gets the
 * table's choice for its ACK, as an LRU eviction would. BPF_F_MMAPABLE: the kernel then places
 * the values page-aligned, so every 64-byte slot is one cache line.
 */
BPF_TABLE_PINNED("array", __u32, struct half_open_bucket, lbx_half_open,
		 LBX_HALF_OPEN_CAPACITY / LBX_HALF_OPEN_WAYS, LBX_PIN_DIR "/lbx_half_open", BPF_F_MMAPABLE);
_Static_assert((LBX_HALF_OPEN_CAPACITY & (LBX_HALF_OPEN_CAPACITY - 1)) == 0 &&
	       LBX_HALF_OPEN_CAPACITY >= LBX_HALF_OPEN_WAYS, "a power of two: select.h masks the hash");

/* 0 -> this CPU's new-flow flood state (struct lbx_flood). Written by the program only. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_flood, lbx_flood, 1, LBX_PIN_DIR "/lbx_flood");

/* vip id -> this CPU's round-robin position. Written by the program only. */
BPF_TABLE_PINNED("percpu_array", __u32, __u32, lbx_rr, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_rr");

/* vip id -> the counters of its backend entries retired so far; LBX_RETIRED_ALL -> those of every
 * entry ever retired. Written by the control plane only (lbxdp.maps.Maps.retire_backend_counters):
 * the program counts a forwarded packet once, in lbx_be_stats, and a VIP's counters (and the
 * tx_forward reason) are its backends' sums plus these (docs/benchmarks.md: two per-CPU counters
 * less per packet, ~15 ns on an established flow). Before this map, lbx_vip_stats was written
 * per packet; lbxdp.migrate fills this one from it. */
BPF_TABLE_PINNED("array", __u32, struct lbx_stats, lbx_vip_retired, LBX_MAX_VIPS + 1,
		 LBX_PIN_DIR "/lbx_vip_retired");

/* backend id -> traffic counters. Written by the program; folded into lbx_vip_retired and reset
 * by the control plane when the entry is retired. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_stats, lbx_be_stats, LBX_MAX_BACKENDS,
		 LBX_PIN_DIR "/lbx_be_stats");

/* 0 -> struct lbx_ctl (the interface's MAC). Written by lbxdp.maps.Maps.set_ctl only. */
BPF_TABLE_PINNED("array", __u32, struct lbx_ctl, lbx_ctl, 1, LBX_PIN_DIR "/lbx_ctl");

/* enum lbx_reason -> packets and bytes that left the program for that reason. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_count, lbx_reasons, LBX_R_MAX,
		 LBX_PIN_DIR "/lbx_reasons");

/*
 * Admission of new flows (admit.h). vip id, or LBX_ADMIT_GLOBAL -> the scope's new-flow limit and
 * ACL flags. Written by lbxdp.maps.Maps.write_admission only (before a new VIP is inserted).
 */
BPF_TABLE_PINNED("array", __u32, struct lbx_admit, lbx_admit, LBX_MAX_VIPS + 1,
		 LBX_PIN_DIR "/lbx_admit");

/* Template of the ACL trie below; never used itself (an inner map needs its template's flags). */
BPF_TABLE_PINNED("lpm_trie", struct acl_key, __u8, lbx_acl_tmpl, LBX_ACL_MAX,
		 LBX_PIN_DIR "/lbx_acl_tmpl", BPF_F_NO_PREALLOC);

/*
 * 0 -> the ACL trie: (scope, source prefix) -> enum lbx_acl_action, every scope's rules in one
 * trie. Written by lbxdp.maps.Maps.write_admission only: it builds a whole new trie aside and
 * swaps it in with one write of this map, so a packet sees the old rule set or the new one,
 * never a half-written one (the same scheme as lbx_tables).
 */
BPF_TABLE_PINNED("array_of_maps$lbx_acl_tmpl", int, int, lbx_acl, 1, LBX_PIN_DIR "/lbx_acl");

/*
 * The same rules as a multibit trie in one array value (the blob, struct lbx_acl_blob; acl.h walks
 * it, lbxdp/acl_mbt.py builds it and says its layout): LBX_ACL_MBT_WORDS words, and
 * LBX_ACL_MBT_PAD more so that a leaf read at a masked offset stays inside. 0 -> the blob,
 * written by lbxdp.maps.Maps.write_admission only, built aside and swapped in like lbx_acl (after
 * it). An empty slot: every scope uses lbx_acl. The template has one entry and no
 * BPF_F_INNER_MAP, so the program's lookups of both are inlined; it is preallocated, never used
 * itself.
 *
 * The template is declared to bcc with a one-word value and created at the blob's size by the
 * loader before bcc compiles (lbxdp/loader.py: precreate_templates; bcc reuses a pin it finds):
 * bcc generates a text reader and writer for every table's value type, one step per array
 * element, and for the 2 MiB blob clang took ~40 s of a ~46 s compile (5.8 s without it).
 */
struct lbx_acl_blob {
	__u32 w[LBX_ACL_MBT_WORDS + LBX_ACL_MBT_PAD];
};
_Static_assert(sizeof(struct lbx_acl_blob) == 2097408, "4 * (LBX_ACL_MBT_WORDS + LBX_ACL_MBT_PAD)");
struct lbx_acl_mbt {   /* what bcc is told lbx_mbt_tmpl holds; the loader describes it as the blob */
	__u32 w[1];
};
_Static_assert(sizeof(struct lbx_acl_mbt) == 4, "one word");
BPF_TABLE_PINNED("array", __u32, struct lbx_acl_mbt, lbx_mbt_tmpl, 1, LBX_PIN_DIR "/lbx_mbt_tmpl");
BPF_TABLE_PINNED("array_of_maps$lbx_mbt_tmpl", int, int, lbx_acl_mbt, 1, LBX_PIN_DIR "/lbx_acl_mbt");

/*
 * The per-source limiter's buckets (limit.h): set index (limit.h src_set_index) -> a set of
 * LBX_SRC_LIMIT_WAYS (source or its /64, scope, theoretical arrival time), IPv4 sources in
 * lbx_src_limit4 (a set per cache line), IPv6 /64s in lbx_src_limit. Written by the program
 * only. Per-CPU arrays: a CPU reads and writes only its own buckets, without atomics or a
 * lock, and the lookup is inlined by the verifier (the per-CPU LRU hashes they replace were a
 * call: jhash, bucket walk, LRU bookkeeping); the price is that each CPU has its own bucket
 * per source (limit.h says what that does to the limit). LBX_SRC_LIMIT_CAPACITY buckets per
 * family and CPU.
 */
BPF_TABLE_PINNED("percpu_array", __u32, struct src_set6, lbx_src_limit, LBX_SRC_LIMIT_SETS,
		 LBX_PIN_DIR "/lbx_src_limit");
BPF_TABLE_PINNED("percpu_array", __u32, struct src_set4, lbx_src_limit4, LBX_SRC_LIMIT_SETS,
		 LBX_PIN_DIR "/lbx_src_limit4");

/*
 * NAT conntrack (issue 12; abi.h says what an entry is): a connection's forward key (client ->
 * VIP as received) and its reply key (backend -> client or SNAT address:port) -> how to rewrite
 * that direction. Written by the program (nat.h opens both entries on a connection's first
 * packet, return_path.h and nat.h move their state); read and aged by the control plane. A
 * shared LRU: one connection's directions may run on different CPUs.
 *
 * Two tables, as a conntrack keeps "assured" connections apart from unanswered ones: a TCP
 * connection opened by a SYN has its entries in lbx_nat_new until its client acknowledges the
 * backend's SYN-ACK (the handshake's ACK proves the client's address, as issue 11's gate does
 * for DSR), a UDP flow until its client's second datagram (DSR records UDP there too); that
 * packet moves them to lbx_nat. A flood of spoofed SYNs or datagrams then evicts only other new
 * connections, never an established one. A TCP connection picked up mid-stream (no SYN seen:
 * after a flush) opens in lbx_nat as before. Lookups read lbx_nat first.
 *
 * lbx_nat_new is no hash but a set-associative array (struct nat_new_bucket; nat.h hs_*), as the
 * half-open table is: opening a handshake writes two slots, assuring it empties their check
 * words, where an LRU hash took an element from its free list under a lock per insert and
 * freed one per delete (docs/benchmarks.md "NAT handshakes in their own table"). Mmapable: the
 * control plane empties a slot with one 4-byte store, as the program does.
 */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct nat_entry, lbx_nat, LBX_NAT_CAPACITY,
		 LBX_PIN_DIR "/lbx_nat");
BPF_TABLE_PINNED("array", __u32, struct nat_new_bucket, lbx_nat_new, LBX_NAT_NEW_CAPACITY / LBX_NAT_NEW_WAYS,
		 LBX_PIN_DIR "/lbx_nat_new", BPF_F_MMAPABLE);
_Static_assert((LBX_NAT_NEW_CAPACITY & (LBX_NAT_NEW_CAPACITY - 1)) == 0 && LBX_NAT_NEW_CAPACITY >= LBX_NAT_NEW_WAYS,
	       "a power of two: nat.h masks the hash");

/* 0 -> struct nat_cfg (SNAT addresses, port pool, timeouts). Written by lbxdp.maps.Maps.set_nat_cfg only. */
BPF_TABLE_PINNED("array", __u32, struct nat_cfg, lbx_nat_cfg, 1, LBX_PIN_DIR "/lbx_nat_cfg");

/*
 * The NAT address filter: the VIP filter's hash and layout (abi.h), with the bits of every NAT
 * VIP's address and every NAT backend's address. A clear bit at the destination means "no NAT
 * VIP" (a DSR or encap flow then skips the lbx_nat lookup), at the source "no NAT backend" (a
 * non-VIP frame then skips the reply lookup). Written by lbxdp.maps.Maps.set_nat_filter only.
 */
BPF_TABLE_PINNED("array", __u32, __u64, lbx_nat_filter, LBX_VIP_FILTER_WORDS,
		 LBX_PIN_DIR "/lbx_nat_filter");

/* backend id -> passive-health signals and SNAT port cursor (struct nat_backend). Written by the
 * program; zeroed by the control plane when the id gets a new owner. */
BPF_TABLE_PINNED("array", __u32, struct nat_backend, lbx_nat_be, LBX_MAX_BACKENDS,
		 LBX_PIN_DIR "/lbx_nat_be");

/* 0 -> this CPU's scratch space for opening a NAT connection (struct nat_scratch). Program only;
 * pinned like every map, though it holds nothing between packets. */
BPF_TABLE_PINNED("percpu_array", __u32, struct nat_scratch, lbx_nat_scratch, 1,
		 LBX_PIN_DIR "/lbx_nat_scratch");

/* backend id -> open connections and cap hits (struct lbx_conns, sched.h, issue 13). Atomic adds
 * by the program; recounted from lbx_flows and zeroed on an id's reuse by the control plane. */
BPF_TABLE_PINNED("array", __u32, struct lbx_conns, lbx_conns, LBX_MAX_BACKENDS,
		 LBX_PIN_DIR "/lbx_conns");

/* VIP id -> its backups for new flows its full primaries refuse (struct lbx_backups, sched.h,
 * issue 13). Written by lbxdp.maps.Maps.write_backups only. */
BPF_TABLE_PINNED("array", __u32, struct lbx_backups, lbx_backups, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_backups");

/* VIP id -> new flows sent to a backup because every primary candidate was full (per CPU). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lbx_overflows, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_overflows");

/* (VIP id, server id) -> backend entry of a QUIC VIP (struct quic_id_val, quic.h, issue 13).
 * Written by lbxdp.maps.Maps.write_quic_ids only. */
BPF_TABLE_PINNED("hash", struct quic_id_key, struct quic_id_val, lbx_quic_ids, LBX_MAX_BACKENDS,
		 LBX_PIN_DIR "/lbx_quic_ids");

/* server id (16 bits) -> the entry of one VIP using it (struct quic_sid_val, abi.h): quic.h's
 * inlined first lookup, before the hash above. Written by lbxdp.maps.Maps.write_quic_ids only. */
BPF_TABLE_PINNED("array", __u32, struct quic_sid_val, lbx_quic_sid, 65536,
		 LBX_PIN_DIR "/lbx_quic_sid");

/* enum lbx_quic_reason -> packets (per CPU): how QUIC VIPs' new-tuple packets were routed. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lbx_quic_stats, LBX_QUIC_MAX,
		 LBX_PIN_DIR "/lbx_quic_stats");

/* VIP id * LBX_QUIC_MAX + enum lbx_quic_reason -> packets (per CPU): the same, per QUIC VIP
 * (status and the exporter by VIP; zeroed on a VIP id's reuse by the control plane). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lbx_quic_vip, LBX_MAX_VIPS * LBX_QUIC_MAX,
		 LBX_PIN_DIR "/lbx_quic_vip");

#endif /* LBX_MAPS_H */
