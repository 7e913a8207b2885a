/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Selection: which backend gets this packet. established() finds a known flow's backend in the
 * connection table; select_backend() gives a new flow (or one whose backend entry is gone) a
 * slot of its VIP's table, by its scheduler (round robin or a hash of its 5-tuple), and records it.
 * An ICMP error about a flow (pkt.flags LBX_PKT_F_ICMP_ERR, icmp.h) is looked up the same way but
 * never recorded.
 */
#ifndef LBX_SELECT_H
#define LBX_SELECT_H

#include "maps.h"
#include "parse.h"

struct selection {
	struct backend *be;
	__u32 backend_id;
	__u32 vip_id;
	__u8 new_flow;
};

/* Final mixer of MurmurHash3 (public domain): every input bit flips about half the output. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/*
 * The ports are mixed before the source address joins them: XORed in raw, the source port's two
 * bytes cancel against the address's last two, and a /24 of clients on 256 ports hashed to only
 * 256 values (tests/datapath/test_flows.py::test_hash_spreads_a_nat_pool_over_every_backend).
 */
static __always_inline __u32 flow_hash(const struct flow_key *f)
{
	__u32 h = mix32(((__u32)f->sport << 16 | f->dport) ^ ((__u32)f->proto << 8));

#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ f->src.w[i]) + f->dst.w[i];
	return mix32(h);
}

/* Per-CPU position: no atomics on the hot path; CPUs interleave, shares stay even. */
static __always_inline __u32 next_rr_slot(const struct vip_meta *vip)
{
	__u32 *pos = lbx_rr.lookup((__u32 *)&vip->id);
	__u32 slot;

	if (!pos)
		return 0;
	/* The table may have shrunk since this CPU's last turn: wrap without a division. */
	slot = *pos < vip->table_size ? *pos : 0;
	*pos = slot + 1;
	return slot;
}

/*
 * The slot of the VIP's table a new flow takes, by its scheduler: LBX_R_OK with *slot set, or
 * LBX_R_DROP_UNKNOWN_SCHED for a scheduler this program does not know (never a guess).
 */
static __always_inline int pick_slot(const struct vip_meta *vip, const struct pkt *pkt, __u32 *slot)
{
	switch (vip->sched) {
	case LBX_SCHED_RR:
		*slot = next_rr_slot(vip);
		return LBX_R_OK;
	case LBX_SCHED_HASH:
	case LBX_SCHED_MAGLEV:
		*slot = flow_hash(&pkt->flow) % vip->table_size;
		return LBX_R_OK;
	}
	return LBX_R_DROP_UNKNOWN_SCHED;
}

static __always_inline struct backend *backend_by_id(__u32 id)
{
	struct backend *be = lbx_backends.lookup(&id);

	return be && (be->flags & LBX_BE_F_ACTIVE) ? be : NULL;
}

/*
 * A known flow whose backend entry is still the one it started on. A match proves the VIP still
 * has that backend: deleting a VIP or removing a backend deactivates the entry, and giving the id
 * to another backend (of any VIP, even one that reused the VIP id) bumps its generation. So an
 * established flow needs no VIP lookup; anything else goes on to classify().
 */
static __always_inline int established(struct pkt *pkt, struct selection *sel)
{
	struct flow_val *known = lbx_flows.lookup(&pkt->flow);
	struct backend *be;

	if (!known)
		return 0;
	be = backend_by_id(known->backend_id);
	if (!be || be->gen != known->gen)
		return 0;
	sel->be = be;
	sel->backend_id = known->backend_id;
	sel->vip_id = be->vip_id;
	return 1;
}

static __always_inline int select_backend(const struct vip_meta *vip, struct pkt *pkt,
					  struct selection *sel)
{
	struct flow_val fresh = {};
	__u32 slot, *id;
	void *table;
	int r;

	if (vip->table_size == 0)
		return vip->flags & LBX_VIP_F_PASS_NO_BACKEND ? LBX_R_PASS_NO_BACKEND : LBX_R_DROP_NO_BACKEND;
	table = lbx_tables.lookup((int *)&vip->id);
	if (!table)
		return LBX_R_DROP_NO_BACKEND;
	/* An ICMP error (icmp.h) must reach the flow's backend: round robin cannot say which. */
	if ((pkt->flags & LBX_PKT_F_ICMP_ERR) && vip->sched == LBX_SCHED_RR)
		return LBX_R_PASS_ICMP_NO_FLOW;
	r = pick_slot(vip, pkt, &slot);
	if (r != LBX_R_OK)
		return r;
	/* An inner map's lookup is a call, not inlined: only new flows pay it. */
	id = bpf_map_lookup_elem(table, &slot);
	if (!id)
		return LBX_R_DROP_BACKEND_GONE;
	sel->be = backend_by_id(*id);
	if (!sel->be)
		return LBX_R_DROP_BACKEND_GONE;
	sel->backend_id = *id;
	sel->vip_id = vip->id;
	/* An error about a flow is no flow: never recorded, never counted as a new one. */
	if (pkt->flags & LBX_PKT_F_ICMP_ERR)
		return LBX_R_OK;
	sel->new_flow = 1;
	fresh.backend_id = *id;
	fresh.gen = sel->be->gen;
	lbx_flows.update(&pkt->flow, &fresh);
	return LBX_R_OK;
}

#endif /* LBX_SELECT_H */
