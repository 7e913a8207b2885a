/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Classification: is this parsed packet for a VIP? may_be_vip() answers "certainly not" for
 * most other traffic from one bit of the VIP address filter (abi.h); classify() is the exact
 * answer, one hash lookup. Nothing here writes a map.
 */
#ifndef LBX_CLASSIFY_H
#define LBX_CLASSIFY_H

#include "maps.h"
#include "parse.h"

static __always_inline int may_be_vip(const struct pkt *pkt)
{
	const __u32 *w = (const __u32 *)pkt->flow.dst.w;
	__u32 bit = ((w[0] ^ w[1] ^ w[2] ^ w[3]) * LBX_VIP_FILTER_MUL) >> (32 - LBX_VIP_FILTER_BITS);
	__u32 word = bit / 64;
	__u64 *bits = lbx_vip_filter.lookup(&word);

	return bits && ((*bits >> (bit % 64)) & 1);
}

static __always_inline struct vip_meta *classify(const struct pkt *pkt)
{
	struct vip_key key = {
		.addr = pkt->flow.dst,
		.port = pkt->flow.dport,
		.proto = pkt->flow.proto,
		.family = pkt->flow.family,
	};
	struct vip_meta *vip = lbx_vips.lookup(&key);

	if (vip)
		return vip;
	/* An any-port VIP is keyed with port 0. Only traffic to a VIP address pays this second
	 * lookup: may_be_vip() has already turned the rest away. */
	key.port = 0;
	return lbx_vips.lookup(&key);
}

#endif /* LBX_CLASSIFY_H */
