/* SPDX-License-Identifier: GPL-2.0 */
/* Counters. Per-CPU maps only: no atomics on the hot path; readers sum over CPUs. */
#ifndef LBX_STATS_H
#define LBX_STATS_H

#include "maps.h"
#include "parse.h"
#include "select.h"
#include "trace.h"

/*
 * Count a packet under its reason and return the verdict, so every exit reads `return count(...)`.
 * LBX_R_TX_FORWARD is the one reason not counted here: a forwarded packet is counted once, by
 * account() in its backend's entry, and the control plane derives the reason's count from those
 * (lbxdp.maps.Maps.reasons: the backends' sums, plus lbx_vip_retired's, less the ICMP errors
 * steered, which account() counts too). At the forwarded exit the reason is a constant and the
 * test is compiled out; at an exit whose reason is a variable it is one compare.
 */
static __always_inline int count(int verdict, __u32 reason, const struct pkt *pkt)
{
	struct lbx_count *c;

	if (reason != LBX_R_TX_FORWARD) {
		c = lbx_reasons.lookup(&reason);
		if (c) {
			c->packets++;
			c->bytes += pkt->len;
		}
	}
	LBX_TRACE_END(verdict, reason, &pkt->flow);   /* trace.h: nothing unless -DLBX_TRACE */
	return verdict;
}

static __always_inline void add_stats(struct lbx_stats *s, const struct pkt *pkt, __u8 new_flow)
{
	if (!s)
		return;
	s->packets++;
	s->bytes += pkt->len;
	s->new_flows += new_flow;
}

/* Traffic of the backend that the packet was sent to: its VIP's is the sum of its backends'
 * (lbx_vip_retired above them), so one per-CPU counter per forwarded packet. */
static __always_inline void account(const struct selection *sel, const struct pkt *pkt)
{
	LBX_TRACE_SEL(sel->vip_id, sel->backend_id);
	add_stats(lbx_be_stats.lookup((__u32 *)&sel->backend_id), pkt, sel->new_flow);
}

#endif /* LBX_STATS_H */
