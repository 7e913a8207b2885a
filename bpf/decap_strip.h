/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Remove the outer header: [Ethernet [VLAN]][outer IP [UDP [GUE]]][inner IP ...] becomes
 * [Ethernet [VLAN]][inner IP ...]. The L2 header is first copied to just in front of the inner
 * packet (with the inner EtherType: 4-in-6 turns IPv6 into IPv4), over the end of the outer
 * header, and then the frame start is moved there with bpf_xdp_adjust_head(). Copying before
 * the move needs no save on the stack and no second bounds check after the helper, whose
 * packet pointers are void (docs/benchmarks.md "decap": the saved-header version cost ~5 ns
 * more). The copy is 3 or 4 whole-word moves (u64 + u32 of MACs, [u32 of VLAN], u16 EtherType).
 * Source and destination never overlap: the outer header is at least 20 bytes, the L2 header
 * at most 18. MACs are kept. The inner packet is not touched: its checksums were valid and stay
 * so. Ethernet padding after the outer packet stays too (the stack trims to the inner total
 * length).
 */
#ifndef LBX_DECAP_STRIP_H
#define LBX_DECAP_STRIP_H

#include "decap_parse.h"

/* The copy and the move for untagged Ethernet (the fast paths: parse_ipip4, parse_gue6), whose
 * single bounds check already covered every byte written here (the inner IP header alone is
 * longer than the 14 bytes copied to its front): no check of its own. */
static __always_inline int strip_eth(struct xdp_md *ctx, void *data, __u32 strip, __be16 proto)
{
	void *to = data + strip;

	*(__u64 *)to = *(__u64 *)data;
	*(__u32 *)(to + 8) = *(__u32 *)(data + 8);
	*(__be16 *)(to + 12) = proto;
	if (bpf_xdp_adjust_head(ctx, strip))
		return LBX_D_PASS_ADJUST_FAILED;   /* cannot happen: see below */
	return LBX_D_PASS_DECAP;
}

/* data: the frame start, already checked to hold l2_len + strip + an inner IP header. */
static __always_inline int strip_outer(struct xdp_md *ctx, void *data, void *end, const struct tunnel *t)
{
	__u32 strip = t->strip & 0x7f;   /* <= 40 + 8 + 4: a bound the verifier can see */
	__be16 proto = t->inner_family == LBX_FAMILY_V4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	void *to = data + strip;

	if (to + sizeof(struct ethhdr) + sizeof(struct vlan_hdr) > end || data + sizeof(struct ethhdr) + sizeof(struct vlan_hdr) > end)
		return LBX_D_PASS_TRUNCATED_OUTER;   /* cannot happen: the inner IP header follows */
	*(__u64 *)to = *(__u64 *)data;
	*(__u32 *)(to + 8) = *(__u32 *)(data + 8);
	if (LBX_D_LIKELY(t->l2_len == sizeof(struct ethhdr))) {
		*(__be16 *)(to + 12) = proto;
	} else {
		*(__u32 *)(to + 12) = *(__u32 *)(data + 12);   /* TPID, TCI */
		*(__be16 *)(to + 16) = proto;
	}
	/* Cannot fail: more than ETH_HLEN bytes stay in the frame. Were it to fail, the frame
	 * would pass with its outer header's tail overwritten, counted under this reason. */
	if (bpf_xdp_adjust_head(ctx, strip))
		return LBX_D_PASS_ADJUST_FAILED;
	return LBX_D_PASS_DECAP;
}

#endif /* LBX_DECAP_STRIP_H */
