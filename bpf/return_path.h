/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The return path: traffic that belongs to a flow lbxdp forwarded but is not addressed to a
 * VIP. Empty today (DSR backends answer clients directly); it is where these will go:
 *   - NAT replies from backends, addressed to the client (DNAT) or to the balancer's own
 *     address (SNAT, lbx_ctl.own_v4/own_v6), rewritten to come from the VIP (issue 12).
 * ICMP errors about a VIP flow are not here: they are addressed to the VIP (the quoted packet's
 * source), so they take the normal pipeline with the quoted tuple reversed as their flow key
 * (parse.h, icmp.h; lbxdp.c says why).
 * It runs before may_be_vip() because none of this traffic is addressed to a VIP: the VIP
 * prefilter would pass it to the kernel. It must stay cheap for everything else (one test of
 * the protocol or a flag), as every non-VIP frame crosses it: docs/benchmarks.md measures
 * non-VIP traffic for that reason.
 *
 * Contract: return LBX_R_OK for "not mine, go on", or the reason the frame was handled with,
 * its verdict in *verdict.
 */
#ifndef LBX_RETURN_PATH_H
#define LBX_RETURN_PATH_H

#include "maps.h"
#include "parse.h"

static __always_inline int return_path(struct xdp_md *ctx, struct pkt *pkt, int *verdict)
{
	return LBX_R_OK;
}

#endif /* LBX_RETURN_PATH_H */
