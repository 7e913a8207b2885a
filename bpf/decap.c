/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_decap: the backend's XDP program (`lbxdp decap attach`). It opens the tunnels lbxdp's
 * balancer sends (IPIP, IP6IP6, 4-in-6, GUE) on hosts whose kernel has no ipip/fou/ip6_tunnel
 * module, and passes the inner packet to the stack; everything else passes untouched. It
 * never drops: a frame it will not open is the stack's to judge, counted under its reason.
 * Table of contents: parse -> outer destination is ours -> inner destination is a VIP (unless
 * loose) -> strip -> count.
 *
 * Compiled by bcc through lbxdp/loader.py (loader.DECAP), like lbxdp.c.
 */
#include "decap_abi.h"
#include "decap_maps.h"
#include "decap_parse.h"
#include "decap_table.h"
#include "decap_strip.h"

int lbxdp_decap(struct xdp_md *ctx)
{
	struct tunnel t = {};
	struct decap_slot *host, *vip;
	struct decap_ctl *ctl;
	__u32 zero = 0;
	int r;

	ctl = lbxd_ctl.lookup(&zero);
	if (!ctl)
		return XDP_PASS;                          /* cannot happen: an array has key 0 */
	r = parse_tunnel(ctx, &t, ctl);                   /* decap_parse.h: no maps */
	if (r != LBX_D_OK)
		return decap_count(r, &t);
	host = find_addr(&t.outer_dst, t.outer_family, ctl->active);   /* decap_table.h */
	if (!host || !(host->flags & LBX_DECAP_F_HOST))
		return decap_count(LBX_D_PASS_NOT_LOCAL, &t);
	vip = find_addr(&t.inner_dst, t.inner_family, ctl->active);
	if (vip && !(vip->flags & LBX_DECAP_F_VIP))
		vip = NULL;
	if (!vip && !(ctl->flags & LBX_DECAP_CTL_F_LOOSE))
		return decap_count(LBX_D_PASS_NOT_VIP, &t);
	r = strip_outer(ctx, &t);                         /* decap_strip.h */
	if (r == LBX_D_PASS_DECAP && vip)
		return count_vip(vip, &t);   /* the only counter of an opened packet */
	return decap_count(r, &t);
}
