/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Guards for traffic to a VIP address, run after may_be_vip() so other traffic never pays them:
 * is the frame addressed to this balancer, and could its source be a client? Each returns
 * LBX_R_OK or the reason the frame must not be forwarded. Nothing here writes a map.
 */
#ifndef LBX_GUARD_H
#define LBX_GUARD_H

#include <linux/if_ether.h>

#include "maps.h"
#include "parse.h"

/*
 * Forward only frames sent to our own MAC. A VIP frame for another host (flooded unknown
 * unicast, promiscuous mode, generic XDP on a bridge port) or for a broadcast/multicast MAC
 * would otherwise be re-sent with that MAC as its source and poison switches' MAC tables.
 * Without a MAC from the control plane nothing is forwarded (fail closed).
 */
static __always_inline int addressed_to_us(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct lbx_ctl *ctl = lbx_ctl.lookup(&zero);
	struct ethhdr *eth = data;

	if (!ctl || !(ctl->flags & LBX_CTL_F_MAC_SET))
		return LBX_R_PASS_NO_OWN_MAC;
	if ((void *)(eth + 1) > data_end)
		return LBX_R_PASS_TRUNCATED;
	/* Two loads and two compares instead of a byte loop (the MAC starts both the frame and ctl). */
	if (*(__u32 *)eth->h_dest != *(__u32 *)ctl->mac ||
	    *(__u16 *)(eth->h_dest + 4) != *(__u16 *)(ctl->mac + 4))
		return LBX_R_PASS_NOT_FOR_US;
	return LBX_R_OK;
}

/* 0.0.0.0/8, 127.0.0.0/8, and 224.0.0.0/3: multicast, reserved (240/4), 255.255.255.255. */
static __always_inline int bad_source_v4(__be32 a)
{
	__u8 first = bpf_ntohl(a) >> 24;

	return first == 0 || first == 127 || first >= 224;
}

/* ::, ::1, ff00::/8 (multicast), ::ffff:0:0/96 (v4-mapped: never on the wire). */
static __always_inline int bad_source_v6(const struct lbx_addr *a)
{
	if (a->w[0] == 0 && a->w[1] == 0) {
		if (a->w[2] == 0)
			return a->w[3] == 0 || a->w[3] == bpf_htonl(1);
		return a->w[2] == bpf_htonl(0xffff);
	}
	return (bpf_ntohl(a->w[0]) >> 24) == 0xff;
}

/* A source that cannot be a client: no reply could reach it, so the frame is spoofed. */
static __always_inline int plausible_source(const struct pkt *pkt)
{
	const struct lbx_addr *s = &pkt->flow.src, *d = &pkt->flow.dst;

	if (s->w[0] == d->w[0] && s->w[1] == d->w[1] && s->w[2] == d->w[2] && s->w[3] == d->w[3])
		return LBX_R_DROP_BAD_SOURCE;
	if (pkt->flow.family == LBX_FAMILY_V4 ? bad_source_v4(s->w[0]) : bad_source_v6(s))
		return LBX_R_DROP_BAD_SOURCE;
	return LBX_R_OK;
}

#endif /* LBX_GUARD_H */
