/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_decap: the backend's XDP program (`lbxdp decap attach`). It opens the tunnels lbxdp's
 * balancer sends (IPIP, IP6IP6, 4-in-6, GUE) on hosts whose kernel has no ipip/fou/ip6_tunnel
 * module, and passes the inner packet to the stack; everything else passes untouched. It
 * never drops: a frame it will not open is the stack's to judge, counted under its reason.
 * Table of contents: parse (IPIP over IPv4 and GUE over IPv6 in one test each, parse_ipip4 and
 * parse_gue6; every other frame through parse_tunnel) -> outer destination is ours -> inner
 * destination is a VIP (unless loose) -> strip -> count.
 *
 * Compiled by bcc through lbxdp/loader.py (loader.DECAP), like lbxdp.c, but specialised to the
 * instance: its settings, the half of the address table it reads and (for sets of up to
 * lbxdp.decap.CONST_ADDRS) the host addresses and VIPs themselves are compile-time constants
 * (lbxdp/decap.py: program_defines; decap_abi.h), so the opened packet reads no map but its
 * counter. A change of any of them compiles the program again and replaces it atomically.
 */
#include "decap_abi.h"
#include "decap_maps.h"
#include "decap_parse.h"
#include "decap_table.h"
#include "decap_strip.h"

/*
 * A parsed tunnel (t) is opened when its outer destination is a host address and its inner one
 * a VIP (or the instance is loose). outer and inner are t's families: constants on the fast
 * paths (IPIP over IPv4, GUE over IPv6; fast: untagged, t->strip a constant, every byte the
 * strip writes already bounds-checked), so each gets its own copy with one family's lookups.
 */
static __always_inline int open_tunnel(struct xdp_md *ctx, const struct tunnel *t, void *data, void *end,
				       __u8 outer, __u8 inner, int fast)
{
	__u64 len = end - data;
	struct lbx_count *c = NULL;
	__u32 vip;
	int r;

	if (LBX_D_UNLIKELY(!is_host(t->outer_dst, outer)))   /* decap_table.h */
		return decap_count(LBX_D_PASS_NOT_LOCAL, len);
	vip = vip_of(t->inner_dst, inner);                   /* its id + 1; 0: no VIP */
	if (LBX_D_UNLIKELY(!vip && !LBXD_LOOSE))
		return decap_count(LBX_D_PASS_NOT_VIP, len);
	/* The VIP's counter is found before the strip, not after: its two cache lines (the map's
	 * per-CPU pointer, the value) are then fetched while the strip runs (docs/benchmarks.md
	 * "decap": ~4 ns less per opened packet). */
	if (vip)
		c = vip_counter(vip - 1);
	if (fast)   /* decap_strip.h */
		r = strip_eth(ctx, data, t->strip, inner == LBX_FAMILY_V4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6));
	else
		r = strip_outer(ctx, data, end, t);
	if (LBX_D_LIKELY(r == LBX_D_PASS_DECAP && c)) {
		c->packets++;   /* the only counter of an opened packet */
		c->bytes += len;
		return XDP_PASS;
	}
	return decap_count(r, len);
}

int lbxdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tunnel t = {};
	int r;

	if (LBX_D_LIKELY(parse_ipip4(data, end, &t)))     /* decap_parse.h: the common tunnels */
		return open_tunnel(ctx, &t, data, end, LBX_FAMILY_V4, LBX_FAMILY_V4, 1);
	if (LBXD_GUE_PORT && parse_gue6(data, end, &t, LBXD_GUE_PORT))
		return open_tunnel(ctx, &t, data, end, LBX_FAMILY_V6, LBX_FAMILY_V6, 1);
	r = parse_tunnel(data, end, &t, LBXD_GUE_PORT);   /* every other frame */
	if (r != LBX_D_OK)
		return decap_count(r, end - data);
	return open_tunnel(ctx, &t, data, end, t.outer_family, t.inner_family, 0);
}
