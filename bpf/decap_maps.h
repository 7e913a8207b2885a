/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map of lbxdp_decap, pinned under LBX_PIN_DIR (the loader sets it to the decap
 * instance's directory, /sys/fs/bpf/lbxdp-decap/<ifname>). Names under 16 characters.
 */
#ifndef LBX_DECAP_MAPS_H
#define LBX_DECAP_MAPS_H

#include "decap_abi.h"

#ifndef LBX_PIN_DIR
#error "LBX_PIN_DIR must be defined by the loader"
#endif

/* 0 -> struct decap_ctl. Written by lbxdp.decap only (at attach). */
BPF_TABLE_PINNED("array", __u32, struct decap_ctl, lbxd_ctl, 1, LBX_PIN_DIR "/lbxd_ctl");

/* table * LBX_DECAP_SLOTS + slot -> struct decap_slot (decap_abi.h). Written by lbxdp.decap only:
 * the table lbxd_ctl.active does not name, then the flip. */
BPF_TABLE_PINNED("array", __u32, struct decap_slot, lbxd_addrs, 2 * LBX_DECAP_SLOTS,
		 LBX_PIN_DIR "/lbxd_addrs");

/* vip id -> packets and bytes decapsulated to that VIP. Written by the program. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_count, lbxd_vip_stats, LBX_DECAP_MAX_VIPS,
		 LBX_PIN_DIR "/lbxd_vip_stats");

/* enum lbx_decap_reason -> packets and bytes that left the program for that reason; frames
 * decapsulated to a VIP are counted in lbxd_vip_stats only (decap_table.h: vip_counter). */
BPF_TABLE_PINNED("percpu_array", __u32, struct lbx_count, lbxd_reasons, LBX_D_MAX,
		 LBX_PIN_DIR "/lbxd_reasons");

#endif /* LBX_DECAP_MAPS_H */
