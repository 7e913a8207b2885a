/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Schedulers beyond round robin and the 5-tuple hash (issue 13), and connection caps. select.h
 * includes this file after backend_by_id() and dispatches here in four one-line places:
 *   table_choice():  a source or leastconn VIP, or a VIP with caps (LBX_VIP_F_CAPS), chooses by
 *                    sched_choice() below; every other VIP takes select.h's path unchanged;
 *   reproducible():  sched_repeats(): leastconn and capped VIPs cannot repeat a SYN's choice for
 *                    its ACK (counts move), so their SYNs go into the half-open table like round
 *                    robin's, and the flow is recorded (and counted) by the client's next packet;
 *   record():        sched_opened(): +1 open connection of a LBX_BE_F_COUNTED backend entry;
 *   established():   sched_closed(): -1 at the client's first FIN or RST of a counted flow.
 * DSR sees only the client's half: a server's FIN, or a connection that ends by timeout, is not
 * seen; the control plane's recount from lbx_flows (lbxdp.maps.Maps.recount_conns, run by the
 * daemon) corrects that drift, and LRU evictions'. A FIN-closed flow keeps its entry (flagged
 * LBX_FLOW_F_CLOSED, so a retransmitted FIN counts once) until the LRU or a flush removes it, or
 * a SYN reusing its tuple (select.h established(): a new connection, chosen and counted anew).
 *
 * Counts (lbx_conns) are shared and changed with atomic adds, not per CPU: a choice compares two
 * backends' totals, which per-CPU counters would make a read of every CPU's copy per candidate,
 * and a connection's FIN may be handled by another CPU than its ACK. The add happens once per
 * opened and once per closed connection, never per established packet.
 */
#ifndef LBX_SCHED_H
#define LBX_SCHED_H

#include "maps.h"
#include "parse.h"

/*
 * Slots past a full backend's that a capped choice tries before giving up (a bounded loop, not
 * unrolled). The slots of a Maglev table are independent weighted draws, so a full backend with
 * a share p of the weight fills the next k slots with probability p^k: 32 leave 0.1% at p = 0.8.
 */
#define LBX_CAP_PROBES 32

/*
 * The client's address, its first vip->src_prefix bits, hashed: nothing of the port, the VIP or
 * the node, so every connection of one client (or one /24, /64) takes one slot, on every node with
 * the same table.
 */
static __always_inline __u32 source_hash(const struct vip_meta *vip, const struct pkt *pkt)
{
	__u32 prefix = vip->src_prefix, h = 0x5bd1e995;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 w = pkt->flow.src.w[i];

		if (prefix < 32 * (i + 1)) {
			__u32 bits = prefix > 32 * i ? prefix - 32 * i : 0;

			w &= bits ? bpf_htonl(~0U << (32 - bits)) : 0;
		}
		h = mix32(h ^ w);
	}
	return h;
}

/* Whether the VIP's choice for a SYN is the one its ACK will get (select.h: reproducible()). */
static __always_inline int sched_repeats(const struct vip_meta *vip)
{
	return vip->sched != LBX_SCHED_RR && vip->sched != LBX_SCHED_LEASTCONN &&
	       !(vip->flags & LBX_VIP_F_CAPS);
}

/*
 * The backend entry a slot names (NULL: none, or inactive); *id set. The empty asm keeps clang
 * from turning "active ? be : NULL" into a mask of the pointer, which the verifier refuses.
 */
static __always_inline struct backend *slot_backend(void *table, __u32 slot, __u32 *id)
{
	struct backend *be;
	__u32 k = table_slot(table, slot);   /* select.h */

	*id = k;
	be = lbx_backends.lookup(&k);
	if (!be)
		return NULL;
	if (!(be->flags & LBX_BE_F_ACTIVE))
		return NULL;
	asm volatile("" : "+r"(be));
	return be;
}

static __always_inline __s64 open_conns(__u32 id)
{
	struct lbx_conns *c = lbx_conns.lookup(&id);

	return c ? c->open : 0;
}

/* A backend at its cap: counted (its cap_hits), and the choice goes on. */
static __always_inline int at_cap(const struct backend *be, __u32 id)
{
	struct lbx_conns *c;

	if (!be->max_conns)
		return 0;
	c = lbx_conns.lookup(&id);
	if (!c || c->open < (__s64)be->max_conns)
		return 0;
	__sync_fetch_and_add(&c->cap_hits, 1);
	return 1;
}

static __always_inline void chose(struct selection *sel, struct backend *be, __u32 id, __u32 vip_id)
{
	sel->be = be;
	sel->backend_id = id;
	sel->vip_id = vip_id;
}

/*
 * Every primary candidate is full: the VIP's backups (lbx_backups, written for a capped VIP while
 * its table holds primaries), from a start given by the flow hash, the first one active, still
 * this VIP's and under its own cap; counted in lbx_overflows. None: on_all_down. Only
 * this overflow reads lbx_backups: the normal choice pays nothing for it.
 */
static __always_inline int backup_choice(const struct vip_meta *vip, struct pkt *pkt,
					 struct selection *sel)
{
	struct lbx_backups *b = lbx_backups.lookup((__u32 *)&vip->id);
	__u32 n, start, id;
	struct backend *be;
	__u64 *cnt;

	if (b && b->n) {
		n = b->n < LBX_BACKUP_MAX ? b->n : LBX_BACKUP_MAX;
		start = flow_hash(&pkt->flow) % n;
#pragma unroll
		for (int i = 0; i < LBX_BACKUP_MAX; i++) {
			__u32 k = start + i;

			if (i >= n)
				break;
			if (k >= n)
				k -= n;
			asm volatile("" : "+r"(k));   /* the bound below checks the register indexed */
			if (k >= LBX_BACKUP_MAX)
				break;
			id = b->id[k];
			be = backend_by_id(id);
			if (!be || be->vip_id != vip->id || at_cap(be, id))
				continue;
			chose(sel, be, id, vip->id);
			cnt = lbx_overflows.lookup((__u32 *)&vip->id);
			if (cnt)
				*cnt += 1;
			return LBX_R_OK;
		}
	}
	return vip->flags & LBX_VIP_F_PASS_NO_BACKEND ? LBX_R_PASS_BACKENDS_FULL : LBX_R_DROP_BACKENDS_FULL;
}

/*
 * The choice of a source or leastconn VIP, or of any VIP with caps. leastconn: power of two
 * choices, the flow's slot of the weighted table and one of its backend's peers, the lower
 * open/weight (compared crosswise, no division); ties go to the first. A full backend
 * (max_conns) is skipped for the other candidate, then for the next LBX_CAP_PROBES slots, then the VIP's backups
 * (backup_choice); none left: the VIP's on_all_down with LBX_R_{PASS,DROP}_BACKENDS_FULL. An ICMP error ignores caps (it is about a
 * flow that exists) and, on leastconn, cannot name the flow's backend (like round robin).
 */
static __always_inline int sched_choice(const struct vip_meta *vip, struct pkt *pkt, void *table,
					struct selection *sel)
{
	struct backend *be, *be2;
	__u32 slot, slot2, id = 0, id2 = 0, h;
	int r;

	switch (vip->sched) {
	case LBX_SCHED_SOURCE:
		slot = source_hash(vip, pkt) % vip->table_size;
		break;
	case LBX_SCHED_LEASTCONN:
		if (pkt->flags & LBX_PKT_F_ICMP_ERR)
			return LBX_R_PASS_ICMP_NO_FLOW;
		/* the half-open lookup before this choice hashed the flow already (select.h) */
		h = sel->hashed ? sel->hash : flow_hash(&pkt->flow);
		slot = h % vip->table_size;
		be = slot_backend(table, slot, &id);
		if (!be) {      /* an entry out of service, its table not yet rebuilt: the next slot */
			slot = slot + 1 < vip->table_size ? slot + 1 : 0;
			break;
		}
		/*
		 * The second candidate: one of the first's peers (struct backend.lc_peer, other
		 * entries of this VIP, lbxdp.balancer.lc_peers; the last word 0: two of them), by
		 * other bits of the hash. An inlined array read where a second table slot is an
		 * inner-map lookup (a helper call); always another backend, so a loaded one always
		 * meets a less loaded one.
		 */
		slot2 = (((h >> 8) & 0xff) * (be->lc_peer[LBX_LC_PEERS - 1] ? LBX_LC_PEERS : LBX_LC_PEERS - 1)) >> 8;
		asm volatile("" : "+r"(slot2));   /* the verifier loses the bound through the multiply */
		if (slot2 >= LBX_LC_PEERS)
			slot2 = 0;
		id2 = be->lc_peer[slot2];
		be2 = id2 ? backend_by_id(id2) : NULL;
		if (be2 && (!(be2->flags & LBX_BE_F_ACTIVE) || be2->vip_id != vip->id))
			be2 = NULL;
		if (be2 && open_conns(id2) * (be->weight ? be->weight : 1) <
			   open_conns(id) * (be2->weight ? be2->weight : 1)) {
			/* the second is less loaded: it first, the other as the fallback */
			struct backend *t = be;

			h = id;
			id = id2;
			id2 = h;
			be = be2;
			be2 = t;
		}
		if (!(vip->flags & LBX_VIP_F_CAPS) || !at_cap(be, id)) {
			chose(sel, be, id, vip->id);
			return LBX_R_OK;
		}
		if (be2 && !at_cap(be2, id2)) {
			chose(sel, be2, id2, vip->id);
			return LBX_R_OK;
		}
		slot = slot + 1 < vip->table_size ? slot + 1 : 0;   /* both full: the slots after */
		break;
	default:
		r = pick_slot(vip, pkt, &slot);
		if (r != LBX_R_OK)
			return r;
	}
	if (!(vip->flags & LBX_VIP_F_CAPS) || (pkt->flags & LBX_PKT_F_ICMP_ERR))
		goto unchecked;
	id2 = ~0U;      /* the last full backend met: not looked up (nor counted) again in a row */
#pragma nounroll
	for (int i = 0; i <= LBX_CAP_PROBES; i++) {
		be = slot_backend(table, slot, &id);
		if (be && id != id2) {
			if (!at_cap(be, id)) {
				chose(sel, be, id, vip->id);
				return LBX_R_OK;
			}
			id2 = id;
		}
		slot = slot + 1 < vip->table_size ? slot + 1 : 0;
	}
	return backup_choice(vip, pkt, sel);   /* every primary tried is full */
unchecked:
	be = slot_backend(table, slot, &id);
	if (!be)
		return LBX_R_DROP_BACKEND_GONE;
	chose(sel, be, id, vip->id);
	return LBX_R_OK;
}

/* A flow being recorded (select.h: record()): counted if its backend entry is. A FIN or RST that
 * records a flow (its entry was flushed or evicted) records it closed, uncounted. */
static __always_inline void sched_opened(const struct pkt *pkt, const struct selection *sel,
					 struct flow_val *v)
{
	struct lbx_conns *c;
	__u32 id = sel->backend_id;

	if (!(sel->be->flags & LBX_BE_F_COUNTED))
		return;
	if (pkt->flags & LBX_PKT_F_FIN) {
		v->pad = LBX_FLOW_F_CLOSED;
		return;
	}
	c = lbx_conns.lookup(&id);
	if (!c)
		return;
	__sync_fetch_and_add(&c->open, 1);
	v->pad = LBX_FLOW_F_COUNTED;
}

/* The client's FIN or RST of a recorded flow (select.h: established()): -1, once. */
static __always_inline void sched_closed(struct flow_val *known)
{
	struct lbx_conns *c;
	__u32 id = known->backend_id;

	if ((known->pad & (LBX_FLOW_F_COUNTED | LBX_FLOW_F_CLOSED)) != LBX_FLOW_F_COUNTED)
		return;
	known->pad |= LBX_FLOW_F_CLOSED;
	c = lbx_conns.lookup(&id);
	if (c)
		__sync_fetch_and_add(&c->open, -1);
}

#endif /* LBX_SCHED_H */
