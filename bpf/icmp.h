/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ICMP (issue 10): errors about a VIP flow go to the backend that owns the flow, in every mode.
 *
 * Why: in DSR (and encap) a backend answers the client from the VIP. A router on that path
 * whose next hop is too small for the backend's packets sends "fragmentation needed" (v4) or
 * "packet too big" (v6) to the VIP, which routes to the balancer. Passed to the balancer's
 * kernel they are dropped (it has no such socket), and path-MTU discovery fails for every flow:
 * a PMTU black hole. Time exceeded and unreachables matter the same way to the backend's stack.
 *
 * How: parse.h (parse_icmp4/6) reads the error's quoted header and makes the flow key the quoted
 * tuple reversed (client -> VIP) with pkt.flags LBX_PKT_F_ICMP_ERR; the normal stages run on
 * it: the VIP prefilter and guards, the connection table, else the VIP's table (hash and Maglev
 * reproduce the flow's choice from the same tuple, so steering survives `lbxdp flows flush` and
 * works on another balancer with the same tables; a round-robin VIP has nothing to reproduce,
 * so without a table entry the error is passed, LBX_R_PASS_ICMP_NO_FLOW), then forward() with
 * the backend entry's mode: the whole ICMP frame leaves as any packet of the flow would (DSR:
 * the MAC; encap: encapsulated). select.h never records the error in the connection table nor
 * counts it as a new flow; it is counted as LBX_R_TX_ICMP_STEERED.
 *
 * Echo requests to a VIP are passed (LBX_R_PASS_ICMP_ECHO): whether a VIP answers ping is the
 * operator's choice, made by the balancer's kernel (the VIP on its loopback answers it; none
 * configured: no answer), not something lbxdp decides for addresses it may only partly serve.
 */
#ifndef LBX_ICMP_H
#define LBX_ICMP_H

#include <linux/ip.h>
#include <linux/ipv6.h>

#include "maps.h"
#include "parse.h"
#include "guard.h"

/*
 * The checks an ICMP error needs beyond the VIP frame guards (which ran on the quoted tuple:
 * the client must be plausible): the test switch, and the outer source must be a plausible
 * unicast router (parse.h already refused the client itself). LBX_R_OK or the reason.
 */
static __always_inline int icmp_error_guard(struct xdp_md *ctx, const struct pkt *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct lbx_ctl *ctl = lbx_ctl.lookup(&zero);
	__u16 off = pkt->l3_off;

	if (!ctl || (ctl->flags & LBX_CTL_F_NO_ICMP_STEER))
		return LBX_R_PASS_ICMP_STEER_OFF;
	/* l3_off is 14 or 18 (parse_eth): bound it so the verifier sees a constant range. */
	if (off > 18)
		return LBX_R_PASS_TRUNCATED;
	if (pkt->flow.family == LBX_FAMILY_V4) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > data_end)
			return LBX_R_PASS_TRUNCATED;
		/* An error "from" the VIP itself is as spoofed as a packet from it. */
		return bad_source_v4(ip->saddr) || ip->saddr == pkt->flow.dst.w[0] ?
			LBX_R_DROP_BAD_SOURCE : LBX_R_OK;
	}
	{
		struct ipv6hdr *ip6 = data + off;
		struct lbx_addr s;

		if ((void *)(ip6 + 1) > data_end)
			return LBX_R_PASS_TRUNCATED;
		__builtin_memcpy(&s, &ip6->saddr, sizeof(s));
		return bad_source_v6(&s) || same_addr(&pkt->flow.dst, &ip6->saddr) ?
			LBX_R_DROP_BAD_SOURCE : LBX_R_OK;
	}
}

/* The verdict of icmp_error_guard()'s reasons. */
static __always_inline int icmp_guard_verdict(int reason)
{
	return reason == LBX_R_DROP_BAD_SOURCE ? XDP_DROP : XDP_PASS;
}

#endif /* LBX_ICMP_H */
