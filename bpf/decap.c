/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_decap: the backend's XDP program (`lbxdp decap attach`). It opens the tunnels lbxdp's
 * balancer sends (IPIP, IP6IP6, 4-in-6, GUE) on hosts whose kernel has no ipip/fou/ip6_tunnel
 * module, and passes the inner packet to the stack; everything else passes untouched. It
 * never drops: a frame it will not open is the stack's to judge, counted under its reason.
 * Table of contents: parse (IPIP over IPv4 in one test, parse_ipip4; every other frame through
 * parse_tunnel) -> outer destination is ours -> inner destination is a VIP (unless loose) ->
 * strip -> count.
 *
 * Compiled by bcc through lbxdp/loader.py (loader.DECAP), like lbxdp.c.
 */
#include "decap_abi.h"
#include "decap_maps.h"
#include "decap_parse.h"
#include "decap_table.h"
#include "decap_strip.h"

/*
 * A parsed tunnel (t) is opened when its outer destination is a host address and its inner one
 * a VIP (or the instance is loose). outer and inner are t's families: constants for IPIP over
 * IPv4 (parse_ipip4), so that path gets its own copy with the v4 lookups only.
 */
static __always_inline int open_tunnel(struct xdp_md *ctx, const struct decap_ctl *ctl, const struct tunnel *t,
				       void *data, void *end, __u8 outer, __u8 inner)
{
	__u32 base = ctl->active ? LBX_DECAP_SLOTS : 0;
	__u64 len = end - data;
	struct decap_slot *host, *vip;
	int r;

	host = find_addr_in(t->outer_dst, outer, base);   /* decap_table.h */
	if (LBX_D_UNLIKELY(!host || !(host->flags & LBX_DECAP_F_HOST)))
		return decap_count(LBX_D_PASS_NOT_LOCAL, len);
	vip = find_addr_in(t->inner_dst, inner, base);
	if (vip && !(vip->flags & LBX_DECAP_F_VIP))
		vip = NULL;
	if (LBX_D_UNLIKELY(!vip && !(ctl->flags & LBX_DECAP_CTL_F_LOOSE)))
		return decap_count(LBX_D_PASS_NOT_VIP, len);
	r = strip_outer(ctx, data, end, t);               /* decap_strip.h */
	if (LBX_D_LIKELY(r == LBX_D_PASS_DECAP && vip))
		return count_vip(vip, len);   /* the only counter of an opened packet */
	return decap_count(r, len);
}

int lbxdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tunnel t = {};
	struct decap_ctl *ctl;
	__u32 zero = 0;
	int r;

	ctl = lbxd_ctl.lookup(&zero);
	if (!ctl)
		return XDP_PASS;                          /* cannot happen: an array has key 0 */
	if (LBX_D_LIKELY(parse_ipip4(data, end, &t)))     /* decap_parse.h: the common tunnel */
		return open_tunnel(ctx, ctl, &t, data, end, LBX_FAMILY_V4, LBX_FAMILY_V4);
	r = parse_tunnel(data, end, &t, ctl->gue_port);   /* decap_parse.h: every other frame */
	if (r != LBX_D_OK)
		return decap_count(r, end - data);
	return open_tunnel(ctx, ctl, &t, data, end, t.outer_family, t.inner_family);
}
