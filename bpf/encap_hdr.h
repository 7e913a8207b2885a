/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The outer IPv4 / IPv6 (and GUE's UDP) header of an encapsulated packet, written at `outer`
 * from a backend entry and what was gathered about the inner packet (struct encap_info).
 * Context-free (a pointer and the end of the packet, no xdp_md or __sk_buff, no maps), so the
 * balancer's XDP path (encap.h) and the health probes' tc-egress program (probe.c) write the
 * same bytes. Contract: the room for the outer header is already made and `outer + IP header +
 * UDP header <= end` is checked here; returns LBX_R_OK or LBX_R_ABORT_REWRITE.
 */
#ifndef LBX_ENCAP_HDR_H
#define LBX_ENCAP_HDR_H

#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "abi.h"
#include "csum.h"

/* What the outer headers are made of, gathered from the frame before it moves. */
struct encap_info {
	struct lbx_addr src;  /* outer source */
	__u64 inner_sum;      /* gue: sum of the inner packet's bytes (header and L4) */
	__u32 hash;           /* the flow hash: flow label, GUE source port, flow source */
	__u16 inner_len;      /* the inner IP packet's length */
	__be16 id;            /* inner IPv4 id and DF, copied to an IPv4 outer header */
	__be16 df;
	__u8 tos;             /* inner TOS / traffic class */
	__u8 inner_proto;     /* IPPROTO_IPIP or IPPROTO_IPV6: what the outer header carries */
	__u8 no_csum;         /* gue: the outer UDP checksum is 0 (inner_sum()) */
};

static __always_inline int write_outer4(void *outer, void *end, const struct backend *be,
					const struct encap_info *e)
{
	struct iphdr *ip = outer;
	struct udphdr *udp = (void *)(ip + 1);
	__u16 len = e->inner_len + sizeof(*ip);
	__u64 s;

	if ((void *)(udp + 1) > end)
		return LBX_R_ABORT_REWRITE;
	*(__u16 *)ip = bpf_htons(0x4500 | e->tos);
	ip->id = e->id;
	ip->frag_off = e->df;
	ip->ttl = LBX_ENCAP_TTL;
	ip->protocol = e->inner_proto;
	ip->saddr = e->src.w[0];
	ip->daddr = be->addr.w[0];
	if (be->mode == LBX_MODE_GUE) {
		len += sizeof(*udp);
		ip->protocol = IPPROTO_UDP;
		udp->source = bpf_htons(LBX_GUE_SPORT_BASE | (e->hash & LBX_GUE_SPORT_MASK));
		udp->dest = be->encap_port;
		udp->len = bpf_htons(e->inner_len + sizeof(*udp));
		udp->check = 0;
		s = (__u64)ip->saddr + ip->daddr + bpf_htons(IPPROTO_UDP) + udp->len +
		    lbx_csum_words(udp, 2) + e->inner_sum;
		udp->check = e->no_csum ? 0 : lbx_csum_fold(s) ?: 0xffff; /* 0 would mean "no checksum" */
	}
	ip->tot_len = bpf_htons(len);
	ip->check = 0;
	ip->check = lbx_csum_fold(lbx_csum_words(ip, 5));
	return LBX_R_OK;
}

static __always_inline int write_outer6(void *outer, void *end, const struct backend *be,
					const struct encap_info *e)
{
	struct ipv6hdr *ip6 = outer;
	struct udphdr *udp = (void *)(ip6 + 1);
	__u64 s;

	if ((void *)(udp + 1) > end)
		return LBX_R_ABORT_REWRITE;
	*(__be32 *)ip6 = bpf_htonl(0x60000000 | (__u32)e->tos << 20 | (e->hash & 0xfffff));
	ip6->payload_len = bpf_htons(e->inner_len);
	ip6->nexthdr = e->inner_proto;
	ip6->hop_limit = LBX_ENCAP_TTL;
	__builtin_memcpy(&ip6->saddr, &e->src, sizeof(ip6->saddr));
	__builtin_memcpy(&ip6->daddr, &be->addr, sizeof(ip6->daddr));
	if (be->mode != LBX_MODE_GUE)
		return LBX_R_OK;
	ip6->payload_len = bpf_htons(e->inner_len + sizeof(*udp));
	ip6->nexthdr = IPPROTO_UDP;
	udp->source = bpf_htons(LBX_GUE_SPORT_BASE | (e->hash & LBX_GUE_SPORT_MASK));
	udp->dest = be->encap_port;
	udp->len = ip6->payload_len;
	udp->check = 0;
	s = lbx_csum_addr(&e->src) + lbx_csum_addr(&be->addr) + bpf_htonl(IPPROTO_UDP) + udp->len +
	    lbx_csum_words(udp, 2) + e->inner_sum;
	udp->check = e->no_csum ? 0 : lbx_csum_fold(s) ?: 0xffff; /* mandatory over IPv6 (RFC 8200 8.1) */
	return LBX_R_OK;
}

#endif /* LBX_ENCAP_HDR_H */
