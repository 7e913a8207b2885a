/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Remove the outer header: [Ethernet [VLAN]][outer IP [UDP [GUE]]][inner IP ...] becomes
 * [Ethernet [VLAN]][inner IP ...]. The L2 header is saved, the frame start moved past the
 * outer header with bpf_xdp_adjust_head(), and the L2 header written back in front of the
 * inner packet with the inner EtherType (4-in-6 turns IPv6 into IPv4). MACs are kept. The inner
 * packet is not touched: its checksums were valid and stay so. Ethernet padding after the outer
 * packet stays too (the stack trims to the inner total length).
 */
#ifndef LBX_DECAP_STRIP_H
#define LBX_DECAP_STRIP_H

#include "decap_parse.h"

static __always_inline int strip_outer(struct xdp_md *ctx, const struct tunnel *t)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr eth, *e;
	struct vlan_hdr vlan, *v;
	int tagged = t->l2_len != sizeof(eth);

	if (data + sizeof(eth) + sizeof(vlan) > end)
		return LBX_D_PASS_TRUNCATED_OUTER;   /* cannot happen: a tunnel is longer */
	__builtin_memcpy(&eth, data, sizeof(eth));
	__builtin_memcpy(&vlan, data + sizeof(eth), sizeof(vlan));
	if (bpf_xdp_adjust_head(ctx, t->strip))
		return LBX_D_PASS_ADJUST_FAILED;
	/* Every packet pointer is void after adjust_head: reload and check again. */
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	e = data;
	v = data + sizeof(eth);
	if ((void *)(v + 1) > end)
		return LBX_D_PASS_ADJUST_FAILED;   /* cannot happen: the inner IP header follows */
	if (tagged) {
		vlan.proto = bpf_htons(t->inner_eth_proto);
		*v = vlan;
	} else {
		eth.h_proto = bpf_htons(t->inner_eth_proto);
	}
	*e = eth;
	return LBX_D_PASS_DECAP;
}

#endif /* LBX_DECAP_STRIP_H */
