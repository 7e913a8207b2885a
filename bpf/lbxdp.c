/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_ingress: the XDP program, one per attached interface. This file is the table of
 * contents: parse -> classify -> select -> rewrite -> emit, and every exit names its reason.
 *
 * Compiled by bcc through lbxdp/loader.py, which inlines the local headers below (bcc only
 * rewrites map calls such as lbx_vips.lookup() in its main file) with #line markers, so
 * compiler and verifier messages still name the header and line.
 */
#include "lbxdp.h"
#include "maps.h"
#include "parse.h"
#include "classify.h"
#include "select.h"
#include "rewrite.h"
#include "stats.h"

int lbxdp_ingress(struct xdp_md *ctx)
{
	struct pkt pkt = {};
	struct selection sel = {};
	struct vip_meta *vip;
	int r;

	r = parse_packet(ctx, &pkt);                    /* parse.h: bounds checks, no maps */
	if (r != LBX_R_OK)
		return count(XDP_PASS, r, &pkt);
	vip = classify(&pkt);                           /* classify.h */
	if (!vip)
		return count(XDP_PASS, LBX_R_PASS_NOT_VIP, &pkt);
	r = select_backend(vip, &pkt, &sel);            /* select.h: flow table, then table */
	if (r != LBX_R_OK)
		return count(XDP_DROP, r, &pkt);
	if (rewrite_dsr(ctx, sel.be) < 0)               /* rewrite.h */
		return count(XDP_ABORTED, LBX_R_ABORT_REWRITE, &pkt);
	account(vip, sel.backend_id, &pkt, sel.new_flow); /* stats.h */
	return count(XDP_TX, LBX_R_TX_FORWARD, &pkt);
}
