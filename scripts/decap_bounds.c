/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark only, never attached (scripts/bench_datapath.py, the "decap bound" rows): the least
 * any decapsulating XDP program must do to an IPIP frame, to put lbxdp_decap's figures next to
 * what the target (<= 1.3x the floor, bpf/stub.c) leaves room for.
 *   bound_parse: check the frame holds Ethernet + IPv4 + IPv4, read the EtherType, the outer
 *     version/IHL and protocol, return XDP_PASS: no map, no lookup, no counter.
 *   bound_strip: the same, then what opening it takes: move the Ethernet header 20 bytes on and
 *     bpf_xdp_adjust_head(20).
 */
#include <linux/if_ether.h>
#include <linux/ip.h>

static __always_inline int ipip4(void *data, void *end)
{
	if (data + sizeof(struct ethhdr) + 2 * sizeof(struct iphdr) > end)
		return 0;
	return *(__be16 *)(data + 12) == bpf_htons(ETH_P_IP) && *(__u8 *)(data + 14) == 0x45 &&
	       *(__u8 *)(data + 23) == 4;
}

int bound_parse(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	return ipip4(data, end) ? XDP_PASS : XDP_DROP;
}

int bound_strip(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	if (!ipip4(data, end))
		return XDP_DROP;
	*(__u64 *)(data + 20) = *(__u64 *)data;
	*(__u32 *)(data + 28) = *(__u32 *)(data + 8);
	*(__be16 *)(data + 32) = bpf_htons(ETH_P_IP);
	if (bpf_xdp_adjust_head(ctx, 20))
		return XDP_ABORTED;
	return XDP_PASS;
}
