/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_ingress: the XDP program, one per attached interface. This file is the table of
 * contents: parse -> return path (NAT replies) -> VIP prefilter -> guards -> NAT conntrack or
 * the connection table, or classify and select -> forward (by the backend entry's mode) ->
 * account; every exit names its reason. NAT forwards by a call of its own (forward_nat()), from
 * its conntrack and from a NAT VIP's selection, so that the verifier walks NAT's open path only
 * with NAT's states (forward.h; docs/design.md "Verifier budget").
 * The order is cost-driven: most traffic for no VIP leaves after one bit of the VIP address
 * filter, and an established flow after one connection-table lookup (its backend entry names
 * its VIP and its mode); only a new flow pays for the VIP lookup too (docs/benchmarks.md has
 * the figures).
 *
 * ICMP errors about a VIP flow (icmp.h) go through this same pipeline, not return_path(): they
 * ARE addressed to a VIP address (the quoted packet's source), so the VIP prefilter lets them
 * in, and once parse.h has made their flow key the quoted tuple reversed, the MAC and source
 * guards, the connection table, the VIP's table and forward() (any mode) are exactly what
 * steering needs. return_path() stays for traffic addressed to no VIP (NAT replies). The cost
 * for TCP/UDP is nil before the guards (parse_l4 tests ICMP after TCP and UDP) and one flag
 * test of pkt after them.
 *
 * Compiled by bcc through lbxdp/loader.py, which inlines the local headers below (bcc only
 * rewrites map calls such as lbx_vips.lookup() in its main file) with #line markers, so
 * compiler and verifier messages still name the header and line.
 */
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "classify.h"
#include "return_path.h"
#include "guard.h"
#include "select.h"
#include "quic.h"
#include "admit.h"
#include "icmp.h"
#include "forward.h"
#include "stats.h"

/* The end of every path that forwards: r is forward()'s or forward_nat()'s outcome. */
static __always_inline int forwarded(struct pkt *pkt, const struct selection *sel, int r)
{
	if (r != LBX_R_OK)
		return count(forward_verdict(r), r, pkt);
	account(sel, pkt);                              /* stats.h: the backend's counter */
	if (pkt->flags & LBX_PKT_F_ICMP_ERR)
		return count(XDP_TX, LBX_R_TX_ICMP_STEERED, pkt);
	return count(XDP_TX, LBX_R_TX_FORWARD, pkt);    /* stats.h: account() counted it */
}

int lbxdp_ingress(struct xdp_md *ctx)
{
	struct pkt pkt = {};
	struct selection sel = {};
	struct nat_flow nf = {};
	struct vip_meta *vip;
	int r, verdict;

	LBX_TRACE_BEGIN(ctx);                           /* trace.h: nothing unless -DLBX_TRACE */
	r = parse_packet(ctx, &pkt);                    /* parse.h: bounds checks, no maps */
	if (r != LBX_R_OK)
		return count(XDP_PASS, r, &pkt);
	r = return_path(ctx, &pkt, &verdict);           /* return_path.h: flows' replies, ICMP errors */
	if (r != LBX_R_OK)
		return count(verdict, r, &pkt);
	if (!may_be_vip(&pkt))                          /* classify.h: one bit, no hash lookup */
		return count(XDP_PASS, LBX_R_PASS_NOT_VIP, &pkt);
	r = addressed_to_us(ctx);                       /* guard.h: lbx_ctl's MAC */
	if (r != LBX_R_OK)
		return count(XDP_PASS, r, &pkt);
	if (plausible_source(&pkt) != LBX_R_OK)         /* guard.h: no martians */
		return count(XDP_DROP, LBX_R_DROP_BAD_SOURCE, &pkt);
	if (pkt.flags & LBX_PKT_F_ICMP_ERR) {           /* icmp.h: the error's own source */
		r = icmp_error_guard(ctx, &pkt);
		if (r != LBX_R_OK)
			return count(icmp_guard_verdict(r), r, &pkt);
	}
	if (nat_established(&pkt, &sel, &nf))          /* nat.h: NAT conntrack, behind one bit */
		return forwarded(&pkt, &sel, forward_nat(ctx, &pkt, &sel, &nf));
	/* On a NAT VIP's address the VIP comes first: a NAT VIP's packets never meet the connection
	 * table, whose flows hold no NAT backend entry (forward.h), so its lookup is skipped. The
	 * price: a DSR/encap VIP on an address that also has a NAT VIP (or shares its filter bit)
	 * pays this VIP lookup on its established packets too. */
	vip = nf.nat_dst ? classify(&pkt) : NULL;
	if ((vip && vip->mode == LBX_MODE_NAT) || !established(&pkt, &sel)) { /* select.h: the connection table */
		if (!nf.nat_dst)
			vip = classify(&pkt);           /* classify.h: the VIP lookup */
		if (!vip)
			return count(XDP_PASS, LBX_R_PASS_NOT_VIP, &pkt);
		r = admit(vip, &pkt);                   /* admit.h: ACLs, per-source new-flow limits */
		if (r != LBX_R_OK)
			return count(XDP_DROP, r, &pkt);
		if (vip->mode == LBX_MODE_NAT) {        /* nat.h: the VIP's table, nothing recorded */
			r = nat_select(vip, &pkt, &sel);
			if (r == LBX_R_OK && sel.be->mode == LBX_MODE_NAT)
				return forwarded(&pkt, &sel, forward_nat(ctx, &pkt, &sel, &nf));
		} else if ((vip->flags & LBX_VIP_F_QUIC) && quic_by_id(ctx, vip, &pkt, &sel))
			r = LBX_R_OK;                   /* quic.h: by the server id in the DCID */
		else
			r = select_backend(vip, &pkt, &sel); /* select.h: the VIP's table, by its scheduler */
		if (r == LBX_R_PASS_NO_BACKEND || r == LBX_R_PASS_ICMP_NO_FLOW || r == LBX_R_PASS_NAT_ICMP_NO_FLOW ||
		    r == LBX_R_PASS_BACKENDS_FULL)
			return count(XDP_PASS, r, &pkt);
		if (r != LBX_R_OK)
			return count(XDP_DROP, r, &pkt);
	}
	return forwarded(&pkt, &sel, forward(ctx, &pkt, &sel)); /* forward.h: by the entry's mode */
}
