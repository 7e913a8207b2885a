/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Remove the outer header: [Ethernet [VLAN]][outer IP [UDP [GUE]]][inner IP ...] becomes
 * [Ethernet [VLAN]][inner IP ...]. The L2 header is first copied to just in front of the inner
 * packet (with the inner EtherType: 4-in-6 turns IPv6 into IPv4), over the end of the outer
 * header, and then the frame start is moved there with bpf_xdp_adjust_head(). Copying before
 * the move needs no save on the stack and no second bounds check after the helper, whose
 * packet pointers are void (docs/benchmarks.md "decap": the saved-header version cost ~5 ns
 * more). Source and destination never overlap: the outer header is at least 20 bytes, the L2
 * header at most 18. MACs are kept. The inner packet is not touched: its checksums were valid
 * and stay so. Ethernet padding after the outer packet stays too (the stack trims to the inner
 * total length).
 */
#ifndef LBX_DECAP_STRIP_H
#define LBX_DECAP_STRIP_H

#include "decap_parse.h"

struct l2_hdr {   /* Ethernet with one VLAN tag; the untagged header is its first 14 bytes */
	__u8 macs[12];
	__be16 proto;
	struct vlan_hdr vlan;
};

static __always_inline int strip_outer(struct xdp_md *ctx, const struct tunnel *t)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 strip = t->strip & 0x7f;   /* <= 40 + 8 + 4: a bound the verifier can see */
	struct l2_hdr *from = data, *to = data + strip;

	if ((void *)(from + 1) > end || (void *)(to + 1) > end)
		return LBX_D_PASS_TRUNCATED_OUTER;   /* cannot happen: the inner IP header follows */
	__builtin_memcpy(to->macs, from->macs, sizeof(to->macs));
	if (t->l2_len != sizeof(struct ethhdr)) {
		to->proto = from->proto;
		to->vlan.tci = from->vlan.tci;
		to->vlan.proto = bpf_htons(t->inner_eth_proto);
	} else {
		to->proto = bpf_htons(t->inner_eth_proto);
	}
	/* Cannot fail: more than ETH_HLEN bytes stay in the frame. Were it to fail, the frame
	 * would pass with its outer header's tail overwritten, counted under this reason. */
	if (bpf_xdp_adjust_head(ctx, strip))
		return LBX_D_PASS_ADJUST_FAILED;
	return LBX_D_PASS_DECAP;
}

#endif /* LBX_DECAP_STRIP_H */
