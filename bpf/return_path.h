/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The return path: traffic that belongs to a flow lbxdp forwarded but is not addressed to a
 * VIP: NAT replies (issue 12) from backends, addressed to the client (DNAT) or to the SNAT
 * address (SNAT), rewritten to come from the VIP and sent to the client's next hop (the MAC the
 * connection's first packet came from); and ICMP errors about such a reply's connection sent
 * from the backend's side (a router on the way to the client or the SNAT address): parse.h made
 * their flow key the quoted tuple reversed, which is the connection's reply key, so the same
 * lookup finds them (nat.h translates the outer and the quoted headers).
 * ICMP errors about a VIP flow from the client's side are not here: they are addressed to the
 * VIP (the quoted packet's source), so they take the normal pipeline with the quoted tuple
 * reversed as their flow key (parse.h, icmp.h; lbxdp.c says why), NAT ones included.
 * It runs before may_be_vip() because none of this traffic is addressed to a VIP: the VIP
 * prefilter would pass it to the kernel. It must stay cheap for everything else: one bit of
 * lbx_nat_filter at the source (a NAT backend's address, which every reply and every such
 * error's flow key has), as every non-VIP frame crosses it (docs/benchmarks.md measures
 * non-VIP traffic for that reason).
 *
 * Contract: return LBX_R_OK for "not mine, go on", or the reason the frame was handled with,
 * its verdict in *verdict.
 */
#ifndef LBX_RETURN_PATH_H
#define LBX_RETURN_PATH_H

#include "maps.h"
#include "parse.h"
#include "classify.h"
#include "guard.h"
#include "nat.h"

static __always_inline int return_path(struct xdp_md *ctx, struct pkt *pkt, int *verdict)
{
	struct hs_at at;   /* unused here */
	struct nat_entry *e;
	__u8 fresh, held;
	__u32 now;
	int r;

	if (!nat_filter_has(&pkt->flow.src))             /* one bit: no NAT backend sent it */
		return LBX_R_OK;
	now = nat_now();
	e = nat_lookup(&pkt->flow, 1, now, &fresh, &held, &at, 1);
	if (!e || e->dir != LBX_NAT_DIR_REPLY) {
		/* A NAT backend's address, no connection: its own traffic to the balancer (health
		 * check answers, ssh), a reply of an expired connection, or a packet of it for a
		 * VIP (a backend may be another VIP's client): that one goes on. */
		if (may_be_vip(pkt))
			return LBX_R_OK;
		*verdict = XDP_PASS;
		return LBX_R_PASS_NAT_NO_FLOW;
	}
	r = addressed_to_us(ctx);                        /* guard.h: lbx_ctl's MAC */
	if (r != LBX_R_OK) {
		*verdict = XDP_PASS;
		return r;
	}
	if (!(pkt->flags & LBX_PKT_F_ICMP_ERR))
		nat_track(ctx, pkt, e, now, fresh, 1);
	r = nat_translate(ctx, pkt, e, e->mac);
	if (r != LBX_R_OK) {
		*verdict = XDP_ABORTED;
		return r;
	}
	*verdict = XDP_TX;
	return pkt->flags & LBX_PKT_F_ICMP_ERR ? LBX_R_TX_NAT_ICMP_REPLY : LBX_R_TX_NAT_REPLY;
}

#endif /* LBX_RETURN_PATH_H */
