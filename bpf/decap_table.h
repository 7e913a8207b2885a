/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_decap's lookups and counters: the address table (decap_abi.h: open addressing in an
 * array map, so every probe is an inlined array access, not a call) and per-CPU counters.
 */
#ifndef LBX_DECAP_TABLE_H
#define LBX_DECAP_TABLE_H

#include "decap_maps.h"
#include "decap_parse.h"

/* Does slot s hold (w0..w3, family)? A v4 slot's other words are 0 (decap.py: addr_bytes). */
static __always_inline int slot_is(const struct decap_slot *s, __u8 family, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	if (family == LBX_FAMILY_V4)
		return s->family == family && s->addr.w[0] == w0;
	return s->family == family && s->addr.w[0] == w0 && s->addr.w[1] == w1 && s->addr.w[2] == w2 &&
	       s->addr.w[3] == w3;
}

/*
 * The slot holding the address at a (in the frame: 1 word for LBX_FAMILY_V4, 4 for V6) in the
 * table starting at slot base (0 or LBX_DECAP_SLOTS: LBXD_BASE, the half this program reads), or NULL.
 * family is a constant at each call (is_host, vip_of): the v4 version neither loads nor compares
 * the words an IPv4 address leaves 0. The home slot is probed first, straight; the next ones
 * (collisions: rare, the table stays at most 1/4 full) in a loop that is not unrolled, so the
 * program's code is not 2 x 2 x 8 inlined probes.
 */
static __always_inline struct decap_slot *find_addr(const __be32 *a, __u8 family, __u32 base)
{
	__u32 w0 = a[0], w1 = 0, w2 = 0, w3 = 0, h, k;
	struct decap_slot *s;

	if (family == LBX_FAMILY_V6) {
		w1 = a[1];
		w2 = a[2];
		w3 = a[3];
	}
	h = ((w0 ^ w1 ^ w2 ^ w3) * LBX_VIP_FILTER_MUL) >> (32 - LBX_DECAP_SLOT_BITS);
	k = base + h;
	s = lbxd_addrs.lookup(&k);
	if (!s || !s->family)
		return NULL;   /* an empty slot ends the probe sequence */
	if (LBX_D_LIKELY(slot_is(s, family, w0, w1, w2, w3)))
		return s;
#pragma clang loop unroll(disable)
	for (int i = 1; i < LBX_DECAP_PROBES; i++) {
		k = base + ((h + i) & (LBX_DECAP_SLOTS - 1));
		s = lbxd_addrs.lookup(&k);
		if (!s || !s->family)
			return NULL;
		if (slot_is(s, family, w0, w1, w2, w3))
			return s;
	}
	return NULL;
}

/*
 * The lookups the program makes (family is a constant at each call): compile-time constants
 * when the set was small enough to be compiled in (decap_abi.h: LBXD_HOSTS4 and the others; a
 * chain of compares with immediates, no map, no cache line to fetch), the table otherwise.
 * LBXD_BASE: the first slot of the half this program reads.
 */
#define LBXD_BASE (LBXD_HALF ? LBX_DECAP_SLOTS : 0)
#define LBXD_IS4(x) || (w0 == (x))
#define LBXD_IS6(x0, x1, x2, x3) || (w0 == (x0) && w1 == (x1) && w2 == (x2) && w3 == (x3))
#define LBXD_VIP4(x, id) if (w0 == (x)) return (id) + 1;
#define LBXD_VIP6(x0, x1, x2, x3, id) if (w0 == (x0) && w1 == (x1) && w2 == (x2) && w3 == (x3)) return (id) + 1;

/* Is the address at a (in the frame) one of the host's? */
static __always_inline int is_host(const __be32 *a, __u8 family)
{
	struct decap_slot *s;

	if (LBX_D_LIKELY(family == LBX_FAMILY_V4)) {
#ifdef LBXD_HOSTS4
		__be32 w0 = a[0];

		return 0 LBXD_HOSTS4(LBXD_IS4);
#else
		s = find_addr(a, LBX_FAMILY_V4, LBXD_BASE);
		return s && (s->flags & LBX_DECAP_F_HOST);
#endif
	}
#ifdef LBXD_HOSTS6
	{
		__be32 w0 = a[0], w1 = a[1], w2 = a[2], w3 = a[3];

		return 0 LBXD_HOSTS6(LBXD_IS6);
	}
#else
	s = find_addr(a, LBX_FAMILY_V6, LBXD_BASE);
	return s && (s->flags & LBX_DECAP_F_HOST);
#endif
}

/* The VIP at a (in the frame): its id (lbxd_vip_stats) + 1, or 0 when it is no VIP. */
static __always_inline __u32 vip_of(const __be32 *a, __u8 family)
{
	struct decap_slot *s;

	if (LBX_D_LIKELY(family == LBX_FAMILY_V4)) {
#ifdef LBXD_VIPS4
		__be32 w0 = a[0];

		LBXD_VIPS4(LBXD_VIP4)
		return 0;
#else
		s = find_addr(a, LBX_FAMILY_V4, LBXD_BASE);
		return s && (s->flags & LBX_DECAP_F_VIP) ? s->vip_id + 1 : 0;
#endif
	}
#ifdef LBXD_VIPS6
	{
		__be32 w0 = a[0], w1 = a[1], w2 = a[2], w3 = a[3];

		LBXD_VIPS6(LBXD_VIP6)
		return 0;
	}
#else
	s = find_addr(a, LBX_FAMILY_V6, LBXD_BASE);
	return s && (s->flags & LBX_DECAP_F_VIP) ? s->vip_id + 1 : 0;
#endif
}

/* Count a frame of len bytes under its reason; every exit of lbxdp_decap reads
 * `return decap_count(...)`. */
static __always_inline int decap_count(__u32 reason, __u64 len)
{
	struct lbx_count *c = lbxd_reasons.lookup(&reason);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
	return XDP_PASS;
}

/*
 * The counter of a frame decapsulated to VIP id (the caller adds to it): such a frame is
 * counted under that VIP only; lbxd_reasons[LBX_D_PASS_DECAP] holds just the ones opened to no
 * VIP (loose mode), and readers add the VIP rows to it (lbxdp.decap.reason_counts). A per-CPU
 * counter costs ~5-10 ns here (docs/benchmarks.md "decap": two dependent cache lines): one per
 * packet, not two.
 */
static __always_inline struct lbx_count *vip_counter(__u32 id)
{
	return lbxd_vip_stats.lookup(&id);
}

#endif /* LBX_DECAP_TABLE_H */
