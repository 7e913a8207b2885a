/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_decap's lookups and counters: the address table (decap_abi.h: open addressing in an
 * array map, so every probe is an inlined array access, not a call) and per-CPU counters.
 */
#ifndef LBX_DECAP_TABLE_H
#define LBX_DECAP_TABLE_H

#include "decap_maps.h"
#include "decap_parse.h"

/* The slot holding (a, family) in the table the control plane made active, or NULL. */
static __always_inline struct decap_slot *find_addr(const struct lbx_addr *a, __u8 family, __u8 active)
{
	__u32 h = ((a->w[0] ^ a->w[1] ^ a->w[2] ^ a->w[3]) * LBX_VIP_FILTER_MUL) >> (32 - LBX_DECAP_SLOT_BITS);
	__u32 base = active ? LBX_DECAP_SLOTS : 0;
	struct decap_slot *s;
	__u32 k;

#pragma unroll
	for (int i = 0; i < LBX_DECAP_PROBES; i++) {
		k = base + ((h + i) & (LBX_DECAP_SLOTS - 1));
		s = lbxd_addrs.lookup(&k);
		if (!s || !s->family)
			return NULL;   /* an empty slot ends the probe sequence */
		if (s->family == family && s->addr.w[0] == a->w[0] && s->addr.w[1] == a->w[1] &&
		    s->addr.w[2] == a->w[2] && s->addr.w[3] == a->w[3])
			return s;
	}
	return NULL;
}

/* Count a frame under its reason; every exit of lbxdp_decap reads `return decap_count(...)`. */
static __always_inline int decap_count(__u32 reason, const struct tunnel *t)
{
	struct lbx_count *c = lbxd_reasons.lookup(&reason);

	if (c) {
		c->packets++;
		c->bytes += t->len;
	}
	return XDP_PASS;
}

/*
 * Count a frame decapsulated to a VIP under that VIP only: lbxd_reasons[LBX_D_PASS_DECAP] holds
 * just the ones opened to no VIP (loose mode), and readers add the VIP rows to it
 * (lbxdp.decap.reason_counts). A per-CPU counter update costs ~8 ns here (docs/benchmarks.md
 * "decap"), a sixth of the whole program: one per packet, not two.
 */
static __always_inline int count_vip(const struct decap_slot *vip, const struct tunnel *t)
{
	__u32 id = vip->vip_id;
	struct lbx_count *c = lbxd_vip_stats.lookup(&id);

	if (c) {
		c->packets++;
		c->bytes += t->len;
	}
	return XDP_PASS;
}

#endif /* LBX_DECAP_TABLE_H */
