/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Rewrite: make the frame leave for the chosen backend. Returns 0, or -1 if the frame cannot
 * be rewritten (the caller aborts).
 */
#ifndef LBX_REWRITE_H
#define LBX_REWRITE_H

#include <linux/if_ether.h>

#include "abi.h"

/*
 * DSR on a shared L2 segment: only the MACs change. The frame reached us addressed to our own
 * MAC (addressed_to_us() in guard.h made sure), so that address becomes the source: no lookup. IP and
 * L4 are untouched, so no checksum changes; the backend holds the VIP on its loopback.
 */
static __always_inline int rewrite_dsr(struct xdp_md *ctx, const struct backend *be)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	return 0;
}

#endif /* LBX_REWRITE_H */
