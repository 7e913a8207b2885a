/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark only, never attached (scripts/bench_datapath.py --fib): what a per-packet
 * bpf_fib_lookup() for the backend's address would add to an encapsulated packet, the
 * alternative to the next hops lbxdp resolves at apply time (lbxdp/nexthop.py) and the daemon
 * keeps fresh. The program does the lookup an encapsulating forward() would do (outer
 * destination = the backend, source = the balancer's own address, ingress = the frame's
 * interface), takes the MACs it returns into the frame, and returns XDP_TX; the bench compares
 * it with the floor (bpf/stub.c) in the same run. FIB_DST4 / FIB_SRC4 / FIB_DST6 / FIB_SRC6 are
 * given as -D flags (network-order words; the v6 ones store four words into an array).
 */
#include <linux/if_ether.h>
#include <linux/in.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

static __always_inline int fib_tx(struct xdp_md *ctx, struct bpf_fib_lookup *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return XDP_ABORTED;
	p->ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, p, sizeof(*p), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, p->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p->smac, ETH_ALEN);
	return XDP_TX;
}

int fib_v4(struct xdp_md *ctx)
{
	struct bpf_fib_lookup p = {};

	p.family = AF_INET;
	p.l4_protocol = IPPROTO_IPIP;
	p.tot_len = 60;
	p.ipv4_src = FIB_SRC4;
	p.ipv4_dst = FIB_DST4;
	return fib_tx(ctx, &p);
}

int fib_v6(struct xdp_md *ctx)
{
	struct bpf_fib_lookup p = {};

	p.family = AF_INET6;
	p.l4_protocol = IPPROTO_UDP;
	p.tot_len = 100;
	FIB_SRC6(p.ipv6_src);   /* word by word: bcc has no .rodata for an initialised array */
	FIB_DST6(p.ipv6_dst);
	return fib_tx(ctx, &p);
}
