/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Selection: which backend gets this packet. An established flow keeps the backend recorded
 * in the connection table; a new flow takes a slot of its VIP's table (by round robin or by a
 * hash of its 5-tuple) and is recorded. Returns LBX_R_OK with sel filled, or a drop reason.
 */
#ifndef LBX_SELECT_H
#define LBX_SELECT_H

#include "maps.h"
#include "parse.h"

struct selection {
	struct backend *be;
	__u32 backend_id;
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

static __always_inline __u32 flow_hash(const struct flow_key *f)
{
	__u32 h = ((__u32)f->sport << 16 | f->dport) ^ ((__u32)f->proto << 8);

#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ f->src.w[i]) + f->dst.w[i];
	return mix32(h);
}

static __always_inline __u32 pick_slot(const struct vip_meta *vip, const struct pkt *pkt)
{
	__u32 *pos;

	if (vip->sched == LBX_SCHED_HASH)
		return flow_hash(&pkt->flow) % vip->ring_size;
	/* Per-CPU position: no atomics on the hot path; CPUs interleave, shares stay even. */
	__u32 slot;

	pos = lbx_rr.lookup((__u32 *)&vip->id);
	if (!pos)
		return 0;
	/* The table may have shrunk since this CPU's last turn: wrap without a division. */
	slot = *pos < vip->ring_size ? *pos : 0;
	*pos = slot + 1;
	return slot;
}

static __always_inline struct backend *backend_by_id(__u32 id)
{
	struct backend *be = lbx_backends.lookup(&id);

	return be && (be->flags & LBX_BE_F_ACTIVE) ? be : NULL;
}

static __always_inline int select_backend(const struct vip_meta *vip, struct pkt *pkt,
					  struct selection *sel)
{
	struct flow_val *known = lbx_flows.lookup(&pkt->flow);
	struct flow_val fresh = { .vip_id = vip->id };
	__u32 idx, *id;

	if (known) {
		sel->be = backend_by_id(known->backend_id);
		/* The id may have been freed and reused by another VIP's backend since. */
		if (sel->be && sel->be->vip_id == vip->id) {
			sel->backend_id = known->backend_id;
			return LBX_R_OK;
		}
		/* Its backend was deleted: the flow starts over on a live one. */
	}
	if (vip->ring_size == 0)
		return LBX_R_DROP_NO_BACKEND;
	idx = ((vip->id * 2 + (vip->ring_half & 1)) * LBX_RING_MAX) +
	      (pick_slot(vip, pkt) & (LBX_RING_MAX - 1));
	id = lbx_ring.lookup(&idx);
	if (!id)
		return LBX_R_DROP_BACKEND_GONE;
	sel->be = backend_by_id(*id);
	if (!sel->be)
		return LBX_R_DROP_BACKEND_GONE;
	sel->backend_id = *id;
	sel->new_flow = 1;
	fresh.backend_id = *id;
	lbx_flows.update(&pkt->flow, &fresh);
	return LBX_R_OK;
}

#endif /* LBX_SELECT_H */
