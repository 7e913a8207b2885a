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
 *
 * NAT is not forwarded here: a NAT connection's packets and a NAT VIP's new flows have their own
 * path to forward_nat() (lbxdp.c), so that the verifier walks NAT's open path only with the
 * states of NAT's own paths, not with every state of every DSR and encap selection: the program
 * took 874,690 of the verifier's 1,000,000 instructions with one forward() for all modes, and
 * ~490,000 with the paths apart (docs/design.md "Verifier budget"). A NAT backend entry reached
 * here (a DSR or encap VIP's table while the VIP is being switched to NAT: its entries change
 * before the VIP does) is LBX_R_DROP_UNKNOWN_MODE; a connection-table flow whose backend entry
 * became NAT is no flow any more (select.h established()) and starts over as NAT.
 */
static __always_inline int forward(struct xdp_md *ctx, const struct pkt *pkt, const struct selection *sel)
{
	const struct backend *be = sel->be;

	switch (be->mode) {
	case LBX_MODE_DSR:
		return forward_dsr(ctx, be);
	case LBX_MODE_IPIP:
	case LBX_MODE_GUE:
		return forward_encap(ctx, pkt, be);
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
