/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Forwarding: make the frame leave for the selected backend, the way its entry's mode says.
 * One header per mode (dsr.h, encap.h, nat.h; the last two share csum.h), each with one entry
 * point that takes the frame and the backend entry (NAT: the selection and its conntrack
 * entry, nat.h) and returns LBX_R_OK or the reason the frame cannot be forwarded. The mode is read from the backend entry, not the
 * VIP, so an established flow forwards without a VIP lookup.
 */
#ifndef LBX_FORWARD_H
#define LBX_FORWARD_H

#include "abi.h"
#include "parse.h"
#include "dsr.h"
#include "encap.h"
#include "nat.h"

/*
 * LBX_R_OK, or why not: a mode this program does not know (an entry written by a newer or
 * broken control plane) is dropped and counted, never forwarded as some other mode.
 */
static __always_inline int forward(struct xdp_md *ctx, const struct pkt *pkt, const struct selection *sel,
				   struct nat_flow *nf)
{
	const struct backend *be = sel->be;

	switch (be->mode) {
	case LBX_MODE_DSR:
		return forward_dsr(ctx, be);
	case LBX_MODE_IPIP:
	case LBX_MODE_GUE:
		return forward_encap(ctx, pkt, be);
	case LBX_MODE_NAT:
		return forward_nat(ctx, pkt, sel, nf);
	}
	return LBX_R_DROP_UNKNOWN_MODE;
}

/* The verdict of forward()'s other outcomes (an ICMP "too big" to the client leaves with XDP_TX). */
static __always_inline int forward_verdict(int reason)
{
	if (reason == LBX_R_TX_ICMP_TOO_BIG)
		return XDP_TX;
	if (reason == LBX_R_PASS_NAT_ICMP_NO_FLOW)
		return XDP_PASS;
	return reason == LBX_R_ABORT_REWRITE ? XDP_ABORTED : XDP_DROP;
}

#endif /* LBX_FORWARD_H */
