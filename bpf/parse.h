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
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "abi.h"

#define LBX_IP_MF 0x2000
#define LBX_IP_OFFSET 0x1fff

/* struct pkt flags: how the flow key was obtained. */
#define LBX_PKT_F_ICMP_ERR 0x01 /* flow key taken from an ICMP error's quoted header, reversed:
				 * the frame is an error about that flow, not a packet of it
				 * (parse_icmp4/6 below; icmp.h guards it, select.h never records it) */
#define LBX_PKT_F_SYN 0x02      /* a TCP SYN without ACK: opens a flow, never recorded (select.h) */
#define LBX_PKT_F_FIN 0x04      /* a TCP FIN or RST: the client closes (sched.h: connection counts) */

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
	__u16 l4_off;  /* TCP/UDP header (an ICMP error: its ICMP header), from the frame start */
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

/* A cursor at the start of ctx's frame (lbxdp_ingress's and lbxdp_decap's parsers start here). */
static __always_inline struct cursor frame_cursor(struct xdp_md *ctx)
{
	struct cursor c = {
		.start = (void *)(long)ctx->data,
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};

	return c;
}

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

/*
 * ICMP errors about a VIP flow (issue 10). The error quotes the packet that caused it: the
 * backend's reply, VIP:port -> client:port (DSR: backends answer from the VIP), or at least its
 * IP header and the first 8 bytes of its L4 header (RFC 792: the ports, and no more is needed,
 * so a TCP quote is never required to be a whole TCP header). The flow key becomes that quoted
 * tuple reversed, client -> VIP, the key its flow has in the connection table and the tuple its
 * VIP's hash table hashed, so the stages after parsing find the owning backend unchanged.
 * pkt->l4_off stays at the ICMP header and the lengths are the outer packet's: the whole frame
 * is forwarded. Nothing of the quote is trusted beyond this: the outer destination must be the
 * quoted source (errors go to the sender of the quoted packet), the outer source must not be
 * the client (that is checked here) and must be a plausible router (icmp.h, with guard.h).
 */
#define LBX_ICMP_QUOTE_L4 8 /* quoted L4 bytes needed: the two ports */

/* The error's quoted IPv4 header and ports; c->pos is just past the 8-byte ICMP header. */
static __always_inline int parse_icmp_quote4(struct cursor *c, struct pkt *pkt)
{
	struct iphdr *q = c->pos;
	__be16 *ports = (void *)(q + 1);

	if (pkt->l4_len < sizeof(struct icmphdr) + sizeof(*q) + LBX_ICMP_QUOTE_L4 ||
	    (void *)(ports + 2) > c->end)
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (q->version != 4 || q->ihl < 5)
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (q->ihl != 5)
		return LBX_R_PASS_ICMP_QUOTE_EXT;
	/* A later fragment quotes no ports; a first one (MF, offset 0) does. */
	if (q->frag_off & bpf_htons(LBX_IP_OFFSET))
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP)
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (q->saddr != pkt->flow.dst.w[0])
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (q->daddr == pkt->flow.src.w[0])
		return LBX_R_PASS_ICMP_FROM_CLIENT;
	pkt->flow.proto = q->protocol;
	pkt->flow.src.w[0] = q->daddr;   /* the client */
	pkt->flow.dst.w[0] = q->saddr;   /* the VIP */
	pkt->flow.sport = ports[1];
	pkt->flow.dport = ports[0];
	pkt->flags |= LBX_PKT_F_ICMP_ERR;
	return LBX_R_OK;
}

static __always_inline int parse_icmp4(struct cursor *c, struct pkt *pkt)
{
	struct icmphdr *icmp = c->pos;

	if ((void *)(icmp + 1) > c->end || pkt->l4_len < sizeof(*icmp))
		return LBX_R_PASS_TRUNCATED;
	switch (icmp->type) {
	case ICMP_ECHO:
		return LBX_R_PASS_ICMP_ECHO;
	case ICMP_DEST_UNREACH:
		/* RFC 1191's floor; a smaller MTU is the classic PMTU attack (or a pre-1191 router's 0). */
		if (icmp->code == ICMP_FRAG_NEEDED && bpf_ntohs(icmp->un.frag.mtu) < 68)
			return LBX_R_PASS_ICMP_MTU_TOO_SMALL;
		break;
	case ICMP_TIME_EXCEEDED:
	case ICMP_PARAMETERPROB:
		break;
	default:
		return LBX_R_PASS_NOT_L4;
	}
	c->pos = icmp + 1;
	return parse_icmp_quote4(c, pkt);
}

static __always_inline int same_addr(const struct lbx_addr *a, const struct in6_addr *b)
{
	const __be32 *w = (const __be32 *)b;

	return a->w[0] == w[0] && a->w[1] == w[1] && a->w[2] == w[2] && a->w[3] == w[3];
}

static __always_inline int parse_icmp_quote6(struct cursor *c, struct pkt *pkt)
{
	struct ipv6hdr *q = c->pos;
	__be16 *ports = (void *)(q + 1);

	if (pkt->l4_len < sizeof(struct icmp6hdr) + sizeof(*q) + LBX_ICMP_QUOTE_L4 ||
	    (void *)(ports + 2) > c->end)
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (q->version != 6)
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (is_ipv6_ext(q->nexthdr))
		return LBX_R_PASS_ICMP_QUOTE_EXT;
	if (q->nexthdr != IPPROTO_TCP && q->nexthdr != IPPROTO_UDP)
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (!same_addr(&pkt->flow.dst, &q->saddr))
		return LBX_R_PASS_ICMP_BAD_QUOTE;
	if (same_addr(&pkt->flow.src, &q->daddr))
		return LBX_R_PASS_ICMP_FROM_CLIENT;
	pkt->flow.proto = q->nexthdr;
	__builtin_memcpy(&pkt->flow.src, &q->daddr, sizeof(pkt->flow.src));
	__builtin_memcpy(&pkt->flow.dst, &q->saddr, sizeof(pkt->flow.dst));
	pkt->flow.sport = ports[1];
	pkt->flow.dport = ports[0];
	pkt->flags |= LBX_PKT_F_ICMP_ERR;
	return LBX_R_OK;
}

static __always_inline int parse_icmp6(struct cursor *c, struct pkt *pkt)
{
	struct icmp6hdr *icmp = c->pos;

	if ((void *)(icmp + 1) > c->end || pkt->l4_len < sizeof(*icmp))
		return LBX_R_PASS_TRUNCATED;
	switch (icmp->icmp6_type) {
	case ICMPV6_ECHO_REQUEST:
		return LBX_R_PASS_ICMP_ECHO;
	case ICMPV6_PKT_TOOBIG:
		/* RFC 8200: every IPv6 link carries 1280 bytes; less is forged. */
		if (bpf_ntohl(icmp->icmp6_mtu) < 1280)
			return LBX_R_PASS_ICMP_MTU_TOO_SMALL;
		break;
	case ICMPV6_DEST_UNREACH:
	case ICMPV6_TIME_EXCEED:
	case ICMPV6_PARAMPROB:
		break;
	default:   /* neighbour discovery, echo replies, MLD, ...: the kernel's */
		return LBX_R_PASS_NOT_L4;
	}
	c->pos = icmp + 1;
	return parse_icmp_quote6(c, pkt);
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
		if (tcp->syn && !tcp->ack)
			pkt->flags |= LBX_PKT_F_SYN;
		if (tcp->fin | tcp->rst)
			pkt->flags |= LBX_PKT_F_FIN;
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
	if (pkt->flow.proto == IPPROTO_ICMP && pkt->flow.family == LBX_FAMILY_V4)
		return parse_icmp4(c, pkt);
	if (pkt->flow.proto == IPPROTO_ICMPV6 && pkt->flow.family == LBX_FAMILY_V6)
		return parse_icmp6(c, pkt);
	return LBX_R_PASS_NOT_L4;
}

/* The whole parse stage: Ethernet [VLAN] IPv4|IPv6 TCP|UDP|ICMP error, or the reason it is not. */
static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *pkt)
{
	struct cursor c = frame_cursor(ctx);
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
