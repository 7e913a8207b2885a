/* SPDX-License-Identifier: GPL-2.0 */
/*
 * LBX_MODE_DSR: make the frame leave for the chosen backend on the shared segment. Called by
 * forward() only. Returns LBX_R_OK, or LBX_R_ABORT_REWRITE if the frame cannot be rewritten.
 * DSR changes no IP or L4 byte, so it needs no checksum helper (csum.h comes with encap.h).
 */
#ifndef LBX_DSR_H
#define LBX_DSR_H

#include <linux/if_ether.h>

#include "abi.h"

/*
 * DSR on a shared L2 segment: only the MACs change. The frame reached us addressed to our own
 * MAC (addressed_to_us() in guard.h made sure), so that address becomes the source: no lookup. IP and
 * L4 are untouched, so no checksum changes; the backend holds the VIP on its loopback.
 */
static __always_inline int forward_dsr(struct xdp_md *ctx, const struct backend *be)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return LBX_R_ABORT_REWRITE;
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	return LBX_R_OK;
}

#endif /* LBX_DSR_H */
