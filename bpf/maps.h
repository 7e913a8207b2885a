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
 * Template of the per-VIP tables below; never used itself. BPF_F_INNER_MAP lets every VIP's
 * table have its own size (a 65537-slot Maglev table beside a 3-slot round robin);
 * BPF_F_MMAPABLE lets the control plane write a new table as memory (0.4 ms for 65537 slots)
 * instead of by a batch update, which the kernel applies slot by slot (13 ms).
 * Every table gets these flags: the kernel refuses an inner map whose flags differ.
 */
BPF_TABLE_PINNED("array", __u32, __u32, lbx_table_tmpl, 1, LBX_PIN_DIR "/lbx_table_tmpl",
		 BPF_F_INNER_MAP | BPF_F_MMAPABLE);

/*
 * vip id -> that VIP's table: slot -> backend id, built by lbxdp.ring (Maglev or a weighted
 * sequence). Written by lbxdp.maps.Maps.write_tables only: it builds a new table aside and swaps
 * it in with one write of this map (many VIPs' tables per write), so a packet never sees a
 * half-written table.
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

/* vip id -> this CPU's round-robin position. Written by the program only. */
BPF_TABLE_PINNED("percpu_array", __u32, __u32, lbx_rr, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_rr");

/* vip id -> traffic counters. Written by the program, read by lbxdp status and the exporter. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_stats, lbx_vip_stats, LBX_MAX_VIPS,
		 LBX_PIN_DIR "/lbx_vip_stats");

/* backend id -> traffic counters. Written by the program; reset by the control plane on reuse. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_stats, lbx_be_stats, LBX_MAX_BACKENDS,
		 LBX_PIN_DIR "/lbx_be_stats");

/* 0 -> struct lbx_ctl (the interface's MAC). Written by lbxdp.maps.Maps.set_ctl only. */
BPF_TABLE_PINNED("array", __u32, struct lbx_ctl, lbx_ctl, 1, LBX_PIN_DIR "/lbx_ctl");

/* enum lbx_reason -> packets and bytes that left the program for that reason. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_count, lbx_reasons, LBX_R_MAX,
		 LBX_PIN_DIR "/lbx_reasons");

#endif /* LBX_MAPS_H */
