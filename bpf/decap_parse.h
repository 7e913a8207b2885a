/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Parsing for lbxdp_decap: is this frame a tunnel packet this host should open, and where is
 * its inner packet? No maps; nothing here writes the frame.
 *
 * Contract of every decap_* parser: bounds-check against the frame end (for the verifier) and
 * against the end the enclosing header declares (for the meaning), fill its part of struct
 * tunnel, return LBX_D_OK or the enum lbx_decap_reason that says why the frame is left alone.
 * Non-tunnel traffic leaves at the outer protocol test: Ethernet, IP version and protocol, no
 * more (docs/benchmarks.md: "decap").
 *
 * Tunnels understood, as Linux and Katran make them:
 *   IPv4|IPv6 outer, protocol 4 (IPv4 inside) or 41 (IPv6 inside): IPIP, 6in4, 4-in-6, IP6IP6;
 *   IPv4|IPv6 outer, UDP to the GUE port, then GUE (draft-ietf-intarea-gue):
 *     variant 1: the inner IP header directly after UDP (its first nibble 4 or 6 is the
 *       variant bits 01 and says the family; what Linux fou "gue" direct mode and Katran send);
 *     variant 0 with the 4-byte base header only (no optional fields, no flags, data message,
 *       proto 4 or 41); anything else is LBX_D_PASS_GUE_UNSUPPORTED.
 */
#ifndef LBX_DECAP_PARSE_H
#define LBX_DECAP_PARSE_H

#include "decap_abi.h"
/* parse.h: struct cursor, frame_cursor(), parse_eth(), struct vlan_hdr */
#include "parse.h"

#ifndef IPPROTO_IPIP
#define IPPROTO_IPIP 4
#endif
#define LBX_IPPROTO_IPV6 41
#define LBX_IPPROTO_FRAG 44

struct tunnel {
	__u64 len;             /* frame length, counted as bytes */
	void *outer_end;       /* end of the outer packet (its total length): padding after it is dropped */
	__u16 l2_len;          /* Ethernet (and VLAN tag) */
	__u16 strip;           /* outer IP + UDP + GUE header bytes to remove */
	__u16 inner_eth_proto; /* ETH_P_IP or ETH_P_IPV6, host order */
	__u8 gue;              /* UDP: look for a GUE header */
	__u8 outer_family;
	__u8 inner_family;
	struct lbx_addr outer_dst;
	struct lbx_addr inner_dst;
};

/* The inner family a tunnel protocol number announces (IPIP and 4-in-6: 4; 6in4, IP6IP6: 6). */
static __always_inline int tunnel_proto(struct tunnel *t, __u8 proto)
{
	if (proto == IPPROTO_IPIP)
		t->inner_family = LBX_FAMILY_V4;
	else if (proto == LBX_IPPROTO_IPV6)
		t->inner_family = LBX_FAMILY_V6;
	else if (proto == IPPROTO_UDP)
		t->gue = 1;
	else
		return LBX_D_PASS_NOT_TUNNEL;
	return LBX_D_OK;
}

/* A UDP header at udp to the GUE port? (Not a tunnel when there is none, or none to read.) */
static __always_inline int to_gue_port(struct cursor *c, struct udphdr *udp, __be16 gue_port)
{
	if ((void *)(udp + 1) > c->end || !gue_port || udp->dest != gue_port)
		return LBX_D_PASS_NOT_TUNNEL;
	return LBX_D_OK;
}

static __always_inline int decap_ipv4(struct cursor *c, struct tunnel *t, __be16 gue_port)
{
	struct iphdr *ip = c->pos;
	__u16 frag, tot;
	int r;

	if ((void *)(ip + 1) > c->end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if (ip->version != 4 || ip->ihl < 5)
		return LBX_D_PASS_NOT_TUNNEL;
	r = tunnel_proto(t, ip->protocol);
	if (r != LBX_D_OK)
		return r;
	frag = bpf_ntohs(ip->frag_off);
	/* A later fragment of UDP has no port to say whether it is GUE: not ours to judge. */
	if ((frag & LBX_IP_OFFSET) && t->gue)
		return LBX_D_PASS_NOT_TUNNEL;
	if (t->gue) {
		r = to_gue_port(c, (void *)ip + ip->ihl * 4, gue_port);
		if (r != LBX_D_OK)
			return r;
	}
	/* The stack reassembles; XDP sees one fragment and cannot strip the others' headers. */
	if (frag & (LBX_IP_MF | LBX_IP_OFFSET))
		return LBX_D_PASS_OUTER_FRAGMENT;
	if (ip->ihl != 5)
		return LBX_D_PASS_OUTER_OPTIONS;
	tot = bpf_ntohs(ip->tot_len);
	if (tot < sizeof(*ip) || (void *)ip + tot > c->end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	t->outer_end = (void *)ip + tot;
	t->outer_family = LBX_FAMILY_V4;
	t->outer_dst.w[0] = ip->daddr;
	t->strip = sizeof(*ip);
	c->pos = ip + 1;
	return LBX_D_OK;
}

/* A fragment header after an IPv6 outer header: is the fragment part of a tunnel packet? */
static __always_inline int decap_ipv6_frag(struct cursor *c, struct ipv6hdr *ip6, __be16 gue_port)
{
	struct frag_hdr {
		__u8 nexthdr;
		__u8 reserved;
		__be16 frag_off;
		__be32 id;
	} *fh = (void *)(ip6 + 1);

	if ((void *)(fh + 1) > c->end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if (fh->nexthdr == IPPROTO_IPIP || fh->nexthdr == LBX_IPPROTO_IPV6)
		return LBX_D_PASS_OUTER_FRAGMENT;
	if (fh->nexthdr != IPPROTO_UDP || (fh->frag_off & bpf_htons(0xfff8)))
		return LBX_D_PASS_NOT_TUNNEL;
	if (to_gue_port(c, (void *)(fh + 1), gue_port) != LBX_D_OK)
		return LBX_D_PASS_NOT_TUNNEL;
	return LBX_D_PASS_OUTER_FRAGMENT;
}

static __always_inline int decap_ipv6(struct cursor *c, struct tunnel *t, __be16 gue_port)
{
	struct ipv6hdr *ip6 = c->pos;
	__u16 plen;
	int r;

	if ((void *)(ip6 + 1) > c->end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if (ip6->version != 6)
		return LBX_D_PASS_NOT_TUNNEL;
	if (ip6->nexthdr == LBX_IPPROTO_FRAG)
		return decap_ipv6_frag(c, ip6, gue_port);
	/* Other extension headers (e.g. Linux ip6_tnl's encapsulation limit option) are not
	 * walked: such packets go to the stack as they are. */
	r = tunnel_proto(t, ip6->nexthdr);
	if (r != LBX_D_OK)
		return r;
	if (t->gue) {
		r = to_gue_port(c, (void *)(ip6 + 1), gue_port);
		if (r != LBX_D_OK)
			return r;
	}
	plen = bpf_ntohs(ip6->payload_len);
	if (plen == 0 || (void *)(ip6 + 1) + plen > c->end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	t->outer_end = (void *)(ip6 + 1) + plen;
	t->outer_family = LBX_FAMILY_V6;
	__builtin_memcpy(&t->outer_dst, &ip6->daddr, sizeof(t->outer_dst));
	t->strip = sizeof(*ip6);
	c->pos = ip6 + 1;
	return LBX_D_OK;
}

/* UDP (to the GUE port, checked above) and the GUE header: variant 1, or variant 0 bare. */
static __always_inline int decap_gue(struct cursor *c, struct tunnel *t)
{
	struct udphdr *udp = c->pos;
	__u8 *g = (void *)(udp + 1);

	if ((void *)(g + 4) > c->end || (void *)(udp + 1) >= t->outer_end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if ((void *)udp + bpf_ntohs(udp->len) != t->outer_end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	t->strip += sizeof(*udp);
	switch (g[0] >> 6) {
	case 1: /* variant 1: an IP header; 0x4_ and 0x6_ are the only versions in it */
		if ((g[0] >> 4) == 4)
			t->inner_family = LBX_FAMILY_V4;
		else if ((g[0] >> 4) == 6)
			t->inner_family = LBX_FAMILY_V6;
		else
			return LBX_D_PASS_GUE_UNSUPPORTED;
		c->pos = g;
		return LBX_D_OK;
	case 0: /* variant 0: C bit 0, hlen 0, flags 0, proto IPIP or IPv6 */
		if ((g[0] & 0x3f) || g[2] || g[3])
			return LBX_D_PASS_GUE_UNSUPPORTED;
		if (g[1] == IPPROTO_IPIP)
			t->inner_family = LBX_FAMILY_V4;
		else if (g[1] == LBX_IPPROTO_IPV6)
			t->inner_family = LBX_FAMILY_V6;
		else
			return LBX_D_PASS_GUE_UNSUPPORTED;
		t->strip += 4;
		c->pos = g + 4;
		return LBX_D_OK;
	}
	return LBX_D_PASS_GUE_UNSUPPORTED;
}

/* The inner IP header: the family the outer one announced, whole inside the outer packet. */
static __always_inline int decap_inner(struct cursor *c, struct tunnel *t)
{
	struct iphdr *ip = c->pos;
	struct ipv6hdr *ip6 = c->pos;

	if (t->inner_family == LBX_FAMILY_V4) {
		if ((void *)(ip + 1) > c->end || (void *)(ip + 1) > t->outer_end)
			return LBX_D_PASS_TRUNCATED_INNER;
		if (ip->version != 4 || ip->ihl < 5 || bpf_ntohs(ip->tot_len) < ip->ihl * 4)
			return LBX_D_PASS_BAD_INNER;
		if ((void *)ip + bpf_ntohs(ip->tot_len) > t->outer_end)
			return LBX_D_PASS_TRUNCATED_INNER;
		t->inner_dst.w[0] = ip->daddr;
		t->inner_eth_proto = ETH_P_IP;
		return LBX_D_OK;
	}
	if ((void *)(ip6 + 1) > c->end || (void *)(ip6 + 1) > t->outer_end)
		return LBX_D_PASS_TRUNCATED_INNER;
	if (ip6->version != 6)
		return LBX_D_PASS_BAD_INNER;
	if ((void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > t->outer_end)
		return LBX_D_PASS_TRUNCATED_INNER;
	__builtin_memcpy(&t->inner_dst, &ip6->daddr, sizeof(t->inner_dst));
	t->inner_eth_proto = ETH_P_IPV6;
	return LBX_D_OK;
}

/* The whole parse: Ethernet [VLAN], outer IP, [UDP GUE], inner IP header. */
static __always_inline int parse_tunnel(struct xdp_md *ctx, struct tunnel *t, const struct decap_ctl *ctl)
{
	struct cursor c = frame_cursor(ctx);
	__be16 proto;
	int r;

	t->len = c.end - c.pos;
	if (parse_eth(&c, &proto) != LBX_R_OK)
		return LBX_D_PASS_NOT_TUNNEL;
	t->l2_len = c.pos - c.start;
	if (proto == bpf_htons(ETH_P_IP))
		r = decap_ipv4(&c, t, ctl->gue_port);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = decap_ipv6(&c, t, ctl->gue_port);
	else
		return LBX_D_PASS_NOT_TUNNEL;
	if (r != LBX_D_OK)
		return r;
	if (t->gue) {
		r = decap_gue(&c, t);
		if (r != LBX_D_OK)
			return r;
	}
	return decap_inner(&c, t);
}

#endif /* LBX_DECAP_PARSE_H */
