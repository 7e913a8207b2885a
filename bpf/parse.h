/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Parsing: turn a frame into struct pkt. No maps.
 *
 * Contract of every parse_* helper: bounds-check the header at the cursor against data_end,
 * fill its part of pkt, advance the cursor past the header, and return LBX_R_OK, or the
 * enum lbx_reason that says why the frame is not one lbxdp forwards. Nothing here writes the
 * frame.
 */
#ifndef LBX_PARSE_H
#define LBX_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "abi.h"

#define LBX_IP_MF 0x2000
#define LBX_IP_OFFSET 0x1fff

/* struct pkt flags: how the flow key was obtained. Defined for issue 10, not set yet. */
#define LBX_PKT_F_ICMP_ERR 0x01 /* flow key taken from an ICMP error's quoted header, reversed:
				 * the frame is an error about that flow, not a packet of it */

/*
 * What parsing learnt about a frame, for the stages after it. The IP version is flow.family,
 * whose values are the version numbers (asserted below): one field, so the flow key and the
 * packet cannot disagree about it. The lengths are validated: l3_off + l3_len never exceeds the
 * frame (anything after it is Ethernet padding), and l4_len is the IP payload, which holds the
 * whole L4 header.
 */
struct pkt {
	struct flow_key flow;
	__u64 len;     /* frame length, counted as bytes */
	__u16 l3_off;  /* IP header, from the frame start */
	__u16 l4_off;  /* TCP/UDP header, from the frame start */
	__u16 l3_len;  /* IPv4 total length, or 40 + IPv6 payload length */
	__u16 l4_len;  /* IP payload: L4 header and data */
	__u8 ttl;      /* IPv4 TTL or IPv6 hop limit */
	__u8 flags;    /* LBX_PKT_F_* */
};
_Static_assert(LBX_FAMILY_V4 == 4 && LBX_FAMILY_V6 == 6, "pkt.flow.family is the IP version");

struct cursor {
	void *start;
	void *pos;
	void *end;
};

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* Ethernet and at most one 802.1Q/802.1ad tag; *proto gets the inner EtherType. */
static __always_inline int parse_eth(struct cursor *c, __be16 *proto)
{
	struct ethhdr *eth = c->pos;
	struct vlan_hdr *vlan;

	if ((void *)(eth + 1) > c->end)
		return LBX_R_PASS_TRUNCATED;
	c->pos = eth + 1;
	*proto = eth->h_proto;
	if (*proto == bpf_htons(ETH_P_8021Q) || *proto == bpf_htons(ETH_P_8021AD)) {
		vlan = c->pos;
		if ((void *)(vlan + 1) > c->end)
			return LBX_R_PASS_TRUNCATED;
		c->pos = vlan + 1;
		*proto = vlan->proto;
	}
	return LBX_R_OK;
}

static __always_inline int parse_ipv4(struct cursor *c, struct pkt *pkt)
{
	struct iphdr *ip = c->pos;

	if ((void *)(ip + 1) > c->end)
		return LBX_R_PASS_TRUNCATED;
	if (ip->version != 4 || ip->ihl < 5)
		return LBX_R_PASS_BAD_HEADER;
	/* Options are legal but rare; refusing them keeps L4 at a constant offset. */
	if (ip->ihl != 5)
		return LBX_R_PASS_IP_OPTIONS;
	/* Non-first fragments carry no ports and first ones would be split from them. */
	if (ip->frag_off & bpf_htons(LBX_IP_MF | LBX_IP_OFFSET))
		return LBX_R_PASS_FRAGMENT;
	/* Shorter than the frame is legal (Ethernet pads short frames to 60 bytes); longer is not,
	 * and neither is shorter than the header itself. */
	pkt->l3_len = bpf_ntohs(ip->tot_len);
	if (pkt->l3_len < sizeof(*ip) || (void *)ip + pkt->l3_len > c->end)
		return LBX_R_PASS_BAD_IP_LEN;
	if (ip->ttl == 0)
		return LBX_R_PASS_TTL_ZERO;
	pkt->l4_len = pkt->l3_len - sizeof(*ip);
	pkt->flow.family = LBX_FAMILY_V4;
	pkt->flow.proto = ip->protocol;
	pkt->flow.src.w[0] = ip->saddr;
	pkt->flow.dst.w[0] = ip->daddr;
	c->pos = ip + 1;
	return LBX_R_OK;
}

static __always_inline int is_ipv6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_MH:
	case 139: /* HIP */
	case 140: /* Shim6 */
		return 1;
	}
	return 0;
}

static __always_inline int parse_ipv6(struct cursor *c, struct pkt *pkt)
{
	struct ipv6hdr *ip6 = c->pos;

	if ((void *)(ip6 + 1) > c->end)
		return LBX_R_PASS_TRUNCATED;
	if (ip6->version != 6)
		return LBX_R_PASS_BAD_HEADER;
	/* Walking extension headers costs a bounded loop per packet; real VIP traffic has none. */
	if (is_ipv6_ext(ip6->nexthdr))
		return LBX_R_PASS_IPV6_EXT;
	/* Payload length 0 means a jumbogram, which needs a hop-by-hop header (refused above). */
	pkt->l4_len = bpf_ntohs(ip6->payload_len);
	if (pkt->l4_len == 0 || (void *)(ip6 + 1) + pkt->l4_len > c->end)
		return LBX_R_PASS_BAD_IP_LEN;
	if (ip6->hop_limit == 0)
		return LBX_R_PASS_TTL_ZERO;
	pkt->l3_len = sizeof(*ip6) + pkt->l4_len;
	pkt->flow.family = LBX_FAMILY_V6;
	pkt->flow.proto = ip6->nexthdr;
	__builtin_memcpy(&pkt->flow.src, &ip6->saddr, sizeof(pkt->flow.src));
	__builtin_memcpy(&pkt->flow.dst, &ip6->daddr, sizeof(pkt->flow.dst));
	c->pos = ip6 + 1;
	return LBX_R_OK;
}

static __always_inline int parse_l4(struct cursor *c, struct pkt *pkt)
{
	struct tcphdr *tcp = c->pos;
	struct udphdr *udp = c->pos;

	if (pkt->flow.proto == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > c->end)
			return LBX_R_PASS_TRUNCATED;
		if (tcp->doff < 5)
			return LBX_R_PASS_BAD_HEADER;
		if (tcp->doff * 4 > pkt->l4_len)
			return LBX_R_PASS_BAD_TCP_LEN;
		pkt->flow.sport = tcp->source;
		pkt->flow.dport = tcp->dest;
		return LBX_R_OK;
	}
	if (pkt->flow.proto == IPPROTO_UDP) {
		if ((void *)(udp + 1) > c->end)
			return LBX_R_PASS_TRUNCATED;
		/* Stricter than the kernel (which trims a datagram shorter than its IP payload):
		 * whatever disagrees is left to the kernel's judgement. */
		if (bpf_ntohs(udp->len) != pkt->l4_len || pkt->l4_len < sizeof(*udp))
			return LBX_R_PASS_BAD_UDP_LEN;
		pkt->flow.sport = udp->source;
		pkt->flow.dport = udp->dest;
		return LBX_R_OK;
	}
	return LBX_R_PASS_NOT_L4;
}

/* The whole parse stage: Ethernet [VLAN] IPv4|IPv6 TCP|UDP, or the reason it is not. */
static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *pkt)
{
	struct cursor c = {
		.start = (void *)(long)ctx->data,
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};
	__be16 proto;
	int r;

	pkt->len = c.end - c.pos;
	r = parse_eth(&c, &proto);
	if (r != LBX_R_OK)
		return r;
	pkt->l3_off = c.pos - c.start;
	if (proto == bpf_htons(ETH_P_IP))
		r = parse_ipv4(&c, pkt);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = parse_ipv6(&c, pkt);
	else
		return LBX_R_PASS_NOT_IP;
	if (r != LBX_R_OK)
		return r;
	pkt->l4_off = c.pos - c.start;
	return parse_l4(&c, pkt);
}

#endif /* LBX_PARSE_H */
