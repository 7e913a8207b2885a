/* SPDX-License-Identifier: GPL-2.0 */
/*
 * LBX_MODE_IPIP and LBX_MODE_GUE: L3 direct server return by encapsulation. Called by forward()
 * only. The inner packet (the client's, as it arrived) is left untouched, except for an opt-in
 * MSS clamp on SYNs; outer headers are put in front of it:
 *   ipip: IPv4 in IPv4 (IPIP, protocol 4), IPv6 in IPv6 (IP6IP6, next header 41) or IPv4 in
 *         IPv6 (4-in-6, next header 4), by the backend's family (an IPv6 VIP never has an IPv4
 *         backend: the model refuses it);
 *   gue:  the same in UDP, GUE variant 1 (draft-ietf-intarea-gue: the inner IP header right
 *         after the UDP header, no GUE header; what Katran sends and what Linux's fou/gue
 *         receivers take with `ip fou add port 6080 ipproto 4|41` or `... gue`).
 * Outer header: TOS / traffic class copied from the inner packet (ECN included, RFC 6040's
 * normal mode), TTL / hop limit LBX_ENCAP_TTL, IPv4 DF and id copied from the inner IPv4
 * header (so a DF-less inner packet may still be fragmented on the way), IPv6 flow label and
 * GUE source port from the flow hash (receivers' RSS and routers' ECMP see the client flows
 * spread), source the balancer's own address (lbx_ctl) or, with LBX_ENC_F_FLOW_SOURCE, an
 * address of a configured prefix derived from the flow hash.
 * A packet whose encapsulation would exceed the entry's mtu is answered with an ICMP "too big"
 * error to the client instead (send_too_big()).
 * Returns LBX_R_OK, LBX_R_TX_ICMP_TOO_BIG (the frame is now that ICMP error), or why not.
 */
#ifndef LBX_ENCAP_H
#define LBX_ENCAP_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "select.h"
#include "csum.h"
#include "encap_hdr.h"

#define LBX_IP_DF 0x4000
#define LBX_L2_MAX 18 /* Ethernet and one VLAN tag (parse_eth()) */
#define LBX_ICMP_HDR 8

static __always_inline __u32 encap_overhead(const struct backend *be)
{
	return (be->family == LBX_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) +
	       (be->mode == LBX_MODE_GUE ? sizeof(struct udphdr) : 0);
}

/*
 * The outer source: our own address of the backend's family, or (LBX_ENC_F_FLOW_SOURCE) an
 * address of the configured prefix whose host bits come from the flow hash. LBX_R_OK, or
 * LBX_R_DROP_NO_OWN_ADDR when lbx_ctl has no such address (attach writes them).
 */
static __always_inline int outer_source(const struct lbx_ctl *ctl, const struct backend *be, __u32 h,
					struct lbx_addr *src)
{
	if (be->family == LBX_FAMILY_V4) {
		if (be->encap_flags & LBX_ENC_F_FLOW_SOURCE) {
			if (!ctl->flow_src_v4)
				return LBX_R_DROP_NO_OWN_ADDR;
			src->w[0] = ctl->flow_src_v4 | (h & ~ctl->flow_src_v4_mask);
		} else {
			src->w[0] = ctl->own_v4;
		}
		return src->w[0] ? LBX_R_OK : LBX_R_DROP_NO_OWN_ADDR;
	}
	if (be->encap_flags & LBX_ENC_F_FLOW_SOURCE) {
		if (!(ctl->flow_src_v6[0] | ctl->flow_src_v6[1]))
			return LBX_R_DROP_NO_OWN_ADDR;
		src->w[0] = ctl->flow_src_v6[0];
		src->w[1] = ctl->flow_src_v6[1];
		src->w[2] = h;
		src->w[3] = mix32(h ^ 0x5bd1e995);
		return LBX_R_OK;
	}
	*src = ctl->own_v6;
	return (src->w[0] | src->w[1] | src->w[2] | src->w[3]) ? LBX_R_OK : LBX_R_DROP_NO_OWN_ADDR;
}

/*
 * Opt-in (struct backend.mss): lower the MSS option of a client's SYN to what fits the tunnel,
 * so that the flow never needs an ICMP "too big". Only an MSS that is the first option is
 * clamped, where Linux, Windows, macOS and the BSDs put it: walking the options is a loop whose
 * states, multiplied by the paths that reach forward(), exceed the verifier's limit (measured).
 * The TCP checksum is updated for the one word (RFC 1624 eqn. 3).
 */
static __always_inline void clamp_mss(struct xdp_md *ctx, const struct pkt *pkt, __u16 mss)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tcphdr *tcp = data + (pkt->l4_off & 0x7f);
	__u8 *opt = (void *)(tcp + 1);
	__be16 *v = (void *)(opt + 2), new;

	if (pkt->flow.proto != IPPROTO_TCP || (void *)(v + 1) > end || !tcp->syn || tcp->doff < 6)
		return;
	if (opt[0] != 2 || opt[1] != 4 || bpf_ntohs(*v) <= mss)
		return;
	new = bpf_htons(mss);
	tcp->check = lbx_csum_replace2(tcp->check, *v, new);
	*v = new;
}

/*
 * The sum of the inner packet's bytes, which the GUE checksum covers, without reading its
 * payload: a valid L4 checksum makes the L4 bytes sum to minus the inner pseudo-header (that
 * is what the receiver checks), so header + L4 = header - pseudo-header (Linux's "local
 * checksum offload", lco_csum(), uses the same identity). A packet whose L4 checksum is wrong
 * gets an outer checksum wrong by as much, so it is dropped at the tunnel's end instead of at
 * its TCP: the same fate. The one exception is an IPv4 UDP datagram without checksum (0):
 * its sum is unknown without reading every byte, and a loop over the payload is more than the
 * verifier accepts on this path (measured: the 1M-instruction limit; a 2-byte loop exceeds
 * its 8192-jump history), so it gets no outer checksum either (LBX_R_NO_CSUM): allowed over
 * IPv4 (RFC 768) and, for tunnels, over IPv6 (RFC 6935/6936: Linux receivers need
 * udp6zerocsumrx; lbxdp's decap accepts it).
 */
#define LBX_R_NO_CSUM (-1)
static __always_inline int inner_sum(struct xdp_md *ctx, const struct pkt *pkt, __u64 *sum)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l3 = data + (pkt->l3_off & 0x1f);
	struct udphdr *udp = data + (pkt->l4_off & 0x7f);
	__u64 pseudo = lbx_csum_addr(&pkt->flow.src) + lbx_csum_addr(&pkt->flow.dst) +
		       bpf_htons(pkt->flow.proto) + bpf_htons(pkt->l4_len);

	if (pkt->flow.family == LBX_FAMILY_V4) {
		if (l3 + sizeof(struct iphdr) > end)
			return LBX_R_ABORT_REWRITE;
		*sum = lbx_csum_words(l3, 5);
		if (pkt->flow.proto == IPPROTO_UDP) {
			if ((void *)(udp + 1) > end)
				return LBX_R_ABORT_REWRITE;
			if (udp->check == 0)
				return LBX_R_NO_CSUM;
		}
	} else {
		if (l3 + sizeof(struct ipv6hdr) > end)
			return LBX_R_ABORT_REWRITE;
		*sum = lbx_csum_words(l3, 10);
	}
	*sum += lbx_csum_neg(pseudo);
	return LBX_R_OK;
}

/* TOS / traffic class, IPv4 id and DF of the inner packet, and what protocol it is outside. */
static __always_inline int inner_fields(struct xdp_md *ctx, const struct pkt *pkt, struct encap_info *e)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l3 = data + (pkt->l3_off & 0x1f);
	struct iphdr *ip = l3;
	__u8 *b = l3;

	if (l3 + sizeof(struct ipv6hdr) > end && l3 + sizeof(struct iphdr) > end)
		return LBX_R_ABORT_REWRITE;
	if (pkt->flow.family == LBX_FAMILY_V4) {
		if ((void *)(ip + 1) > end)
			return LBX_R_ABORT_REWRITE;
		e->tos = ip->tos;
		e->id = ip->id;
		e->df = ip->frag_off & bpf_htons(LBX_IP_DF);
		e->inner_proto = IPPROTO_IPIP;
	} else {
		if (l3 + 2 > end)
			return LBX_R_ABORT_REWRITE;
		e->tos = (b[0] << 4) | (b[1] >> 4);
		e->inner_proto = IPPROTO_IPV6;
	}
	return LBX_R_OK;
}

/*
 * Ethernet (and the VLAN tag the frame came with) in front of the outer header: to the next
 * hop (the entry's mac: the backend on-link, else the gateway), from our own MAC.
 */
struct l2_tag {
	__be16 tpid; /* 802.1Q / 802.1ad, or 0: no tag */
	__be16 tci;
};

static __always_inline int write_l2(void *data, void *end, const __u8 *dst, const __u8 *src,
				    struct l2_tag tag, __be16 proto)
{
	struct ethhdr *eth = data;

	if (data + LBX_L2_MAX > end)
		return LBX_R_ABORT_REWRITE;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	if (tag.tpid) {
		eth->h_proto = tag.tpid;
		*(__be16 *)(data + 14) = tag.tci;
		*(__be16 *)(data + 16) = proto;
		return LBX_R_OK;
	}
	eth->h_proto = proto;
	return LBX_R_OK;
}

/*
 * Answer the client with ICMP "fragmentation needed" (IPv4) / "packet too big" (IPv6) carrying
 * mtu, the largest inner packet the tunnel takes, from the VIP (the address the client sent to,
 * so its socket finds the error), quoting as much of its packet as fits the family's minimum
 * MTU. IPv4 without DF asked for no such error and lbxdp does not fragment: dropped, counted.
 */
static __always_inline int send_too_big(struct xdp_md *ctx, const struct pkt *pkt, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 l2 = pkt->l3_off, hdrs, quote;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u8 client[ETH_ALEN], own[ETH_ALEN];
	struct l2_tag tag = {};
	void *l3, *icmp;
	__u64 s;

	if (l2 > LBX_L2_MAX || data + LBX_L2_MAX > end || (void *)(eth + 1) > end)
		return LBX_R_ABORT_REWRITE;
	ip = data + l2;
	if (pkt->flow.family == LBX_FAMILY_V4) {
		if ((void *)(ip + 1) > end)
			return LBX_R_ABORT_REWRITE;
		if (!(ip->frag_off & bpf_htons(LBX_IP_DF)))
			return LBX_R_DROP_TOO_BIG;
		hdrs = sizeof(struct iphdr) + LBX_ICMP_HDR;
		quote = LBX_ICMP4_QUOTE;
	} else {
		hdrs = sizeof(struct ipv6hdr) + LBX_ICMP_HDR;
		quote = LBX_ICMP6_QUOTE;
	}
	/* The control plane's mtu floor (1280) makes every oversize packet longer than the quote. */
	if (pkt->l3_len < quote)
		return LBX_R_DROP_TOO_BIG;
	__builtin_memcpy(client, eth->h_source, ETH_ALEN);
	__builtin_memcpy(own, eth->h_dest, ETH_ALEN);
	if (l2 == LBX_L2_MAX)
		tag = *(struct l2_tag *)(data + 12);
	if (bpf_xdp_adjust_tail(ctx, (int)(l2 + quote) - (int)pkt->len) ||
	    bpf_xdp_adjust_head(ctx, -(int)hdrs))
		return LBX_R_ABORT_REWRITE;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (write_l2(data, end, client, own, tag,
		     bpf_htons(pkt->flow.family == LBX_FAMILY_V4 ? ETH_P_IP : ETH_P_IPV6)))
		return LBX_R_ABORT_REWRITE;
	l3 = data + (l2 & 0x1f);
	if (pkt->flow.family == LBX_FAMILY_V4) {
		icmp = l3 + sizeof(struct iphdr);
		if (icmp + LBX_ICMP_HDR + LBX_ICMP4_QUOTE > end)
			return LBX_R_ABORT_REWRITE;
		ip = l3;
		*(__u16 *)ip = bpf_htons(0x4500);
		ip->tot_len = bpf_htons(sizeof(struct iphdr) + LBX_ICMP_HDR + LBX_ICMP4_QUOTE);
		ip->id = 0;
		ip->frag_off = 0;
		ip->ttl = LBX_ENCAP_TTL;
		ip->protocol = IPPROTO_ICMP;
		ip->saddr = pkt->flow.dst.w[0];
		ip->daddr = pkt->flow.src.w[0];
		ip->check = 0;
		ip->check = lbx_csum_fold(lbx_csum_words(ip, 5));
		*(__be32 *)icmp = bpf_htonl(3 << 24 | 4 << 16); /* destination unreachable, frag needed */
		*(__be32 *)(icmp + 4) = bpf_htonl(mtu & 0xffff);
		/* bpf_csum_diff sums at most 512 bytes a call, in multiples of 4: 556 = 512 + 44 */
		s = (__u32)bpf_csum_diff(0, 0, icmp, 512, 0);
		s += (__u32)bpf_csum_diff(0, 0, icmp + 512, 44, 0);
		*(__u16 *)(icmp + 2) = lbx_csum_fold(s);
		return LBX_R_TX_ICMP_TOO_BIG;
	}
	icmp = l3 + sizeof(struct ipv6hdr);
	if (icmp + LBX_ICMP_HDR + LBX_ICMP6_QUOTE > end)
		return LBX_R_ABORT_REWRITE;
	{
		struct ipv6hdr *ip6 = l3;

		*(__be32 *)ip6 = bpf_htonl(0x60000000);
		ip6->payload_len = bpf_htons(LBX_ICMP_HDR + LBX_ICMP6_QUOTE);
		ip6->nexthdr = IPPROTO_ICMPV6;
		ip6->hop_limit = LBX_ENCAP_TTL;
		__builtin_memcpy(&ip6->saddr, &pkt->flow.dst, sizeof(ip6->saddr));
		__builtin_memcpy(&ip6->daddr, &pkt->flow.src, sizeof(ip6->daddr));
	}
	*(__be32 *)icmp = bpf_htonl(2 << 24); /* packet too big, code 0, checksum 0 */
	*(__be32 *)(icmp + 4) = bpf_htonl(mtu);
	/* pseudo-header (addresses, length, next header) + 1240 bytes = 512 + 512 + 216 */
	s = lbx_csum_addr(&pkt->flow.src) + lbx_csum_addr(&pkt->flow.dst) +
	    bpf_htonl(LBX_ICMP_HDR + LBX_ICMP6_QUOTE) + bpf_htonl(IPPROTO_ICMPV6);
	s += (__u32)bpf_csum_diff(0, 0, icmp, 512, 0);
	s += (__u32)bpf_csum_diff(0, 0, icmp + 512, 512, 0);
	s += (__u32)bpf_csum_diff(0, 0, icmp + 1024, 216, 0);
	*(__u16 *)(icmp + 2) = lbx_csum_fold(s);
	return LBX_R_TX_ICMP_TOO_BIG;
}

static __always_inline int forward_encap(struct xdp_md *ctx, const struct pkt *pkt, const struct backend *be)
{
	__u32 zero = 0, l2 = pkt->l3_off, overhead = encap_overhead(be), keep;
	struct lbx_ctl *ctl = lbx_ctl.lookup(&zero);
	struct encap_info e = {};
	__u8 own[ETH_ALEN];
	struct l2_tag tag = {};
	void *data, *end, *outer;
	int r;

	if (!ctl || l2 > LBX_L2_MAX)
		return LBX_R_ABORT_REWRITE;
	if (be->family == LBX_FAMILY_V4 && pkt->flow.family != LBX_FAMILY_V4)
		return LBX_R_ABORT_REWRITE; /* 6-in-4: refused by the model */
	if (be->mtu && pkt->l3_len + overhead > be->mtu)
		return send_too_big(ctx, pkt, be->mtu - overhead);
	e.hash = flow_hash(&pkt->flow);
	r = outer_source(ctl, be, e.hash, &e.src);
	if (r != LBX_R_OK)
		return r;
	if (be->mss)
		clamp_mss(ctx, pkt, be->mss);
	r = inner_fields(ctx, pkt, &e);
	if (r == LBX_R_OK && be->mode == LBX_MODE_GUE) {
		r = inner_sum(ctx, pkt, &e.inner_sum);
		if (r == LBX_R_NO_CSUM) {
			e.no_csum = 1;
			r = LBX_R_OK;
		}
	}
	if (r != LBX_R_OK)
		return r;
	e.inner_len = pkt->l3_len;
	__builtin_memcpy(own, ctl->mac, ETH_ALEN);
	if (l2 == LBX_L2_MAX) {
		data = (void *)(long)ctx->data;
		end = (void *)(long)ctx->data_end;
		if (data + LBX_L2_MAX > end)
			return LBX_R_ABORT_REWRITE;
		tag = *(struct l2_tag *)(data + 12);
	}
	/* Ethernet padding after the inner packet would trail the outer one: cut it. */
	keep = l2 + pkt->l3_len;
	if (pkt->len > keep && bpf_xdp_adjust_tail(ctx, (int)keep - (int)pkt->len))
		return LBX_R_ABORT_REWRITE;
	if (bpf_xdp_adjust_head(ctx, -(int)overhead))
		return LBX_R_ABORT_REWRITE;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (write_l2(data, end, be->mac, own, tag,
		     bpf_htons(be->family == LBX_FAMILY_V4 ? ETH_P_IP : ETH_P_IPV6)))
		return LBX_R_ABORT_REWRITE;
	outer = data + (l2 & 0x1f);
	if (be->family == LBX_FAMILY_V4)
		return write_outer4(outer, end, be, &e);
	return write_outer6(outer, end, be, &e);
}

#endif /* LBX_ENCAP_H */
