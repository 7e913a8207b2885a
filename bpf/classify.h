/* SPDX-License-Identifier: GPL-2.0 */
/* Classification: is this parsed packet for a VIP? One hash lookup, nothing written. */
#ifndef LBX_CLASSIFY_H
#define LBX_CLASSIFY_H

#include "maps.h"
#include "parse.h"

static __always_inline struct vip_meta *classify(const struct pkt *pkt)
{
	struct vip_key key = {
		.addr = pkt->flow.dst,
		.port = pkt->flow.dport,
		.proto = pkt->flow.proto,
		.family = pkt->flow.family,
	};

	return lbx_vips.lookup(&key);
}

#endif /* LBX_CLASSIFY_H */
