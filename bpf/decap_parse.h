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
 * Written for the fewest instructions on the opened path (docs/benchmarks.md "decap": the
 * program's cost is its instruction count, not its helper): header fields are loaded once and
 * whole (the EtherType as one u16, not through parse.h's packed struct ethhdr, which is two byte
 * loads), the common shapes (IPv4 header without options, not a fragment) are the branches
 * laid out to fall through (LBX_D_LIKELY), and addresses stay in the frame (struct tunnel points
 * at them) instead of being copied to the stack.
 *
 * The two common tunnels, IPIP over IPv4 and GUE over IPv6, are also recognised in one test each
 * (parse_ipip4, parse_gue6) before this full parse, which sees every frame they do not take.
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
/* parse.h: struct vlan_hdr, ETH_P_8021AD, LBX_IP_MF/LBX_IP_OFFSET */
#include "parse.h"

#ifndef IPPROTO_IPIP
#define IPPROTO_IPIP 4
#endif
#define LBX_IPPROTO_IPV6 41
#define LBX_IPPROTO_FRAG 44
#define LBX_D_LIKELY(x) __builtin_expect(!!(x), 1)
#define LBX_D_UNLIKELY(x) __builtin_expect(!!(x), 0)

struct tunnel {
	void *outer_end;          /* end of the outer packet (its total length): padding after it is dropped */
	const __be32 *outer_dst;  /* in the frame: 1 word (v4) or 4 (v6) */
	const __be32 *inner_dst;
	__u16 l2_len;             /* Ethernet (and VLAN tag) */
	__u16 strip;              /* outer IP + UDP + GUE header bytes to remove */
	__u8 outer_family;
	__u8 inner_family;        /* LBX_FAMILY_*; 0 after the outer header: UDP, look for GUE */
};

/* The inner family a tunnel protocol number announces (IPIP and 4-in-6: 4; 6in4, IP6IP6: 6);
 * 0 for UDP (GUE, if to the port), -1 for anything else. */
static __always_inline int tunnel_proto(__u8 proto)
{
	if (LBX_D_LIKELY(proto == IPPROTO_IPIP))
		return LBX_FAMILY_V4;
	if (proto == LBX_IPPROTO_IPV6)
		return LBX_FAMILY_V6;
	if (proto == IPPROTO_UDP)
		return 0;
	return -1;
}

/* A UDP header at udp to the GUE port? (Not a tunnel when there is none, or none to read.) */
static __always_inline int to_gue_port(struct udphdr *udp, void *end, __be16 gue_port)
{
	if ((void *)(udp + 1) > end || !gue_port || udp->dest != gue_port)
		return LBX_D_PASS_NOT_TUNNEL;
	return LBX_D_OK;
}

static __always_inline int decap_ipv4(struct iphdr *ip, void *end, struct tunnel *t, __be16 gue_port)
{
	__u8 vihl, proto;
	__be16 frag;
	__u16 tot;
	int fam;

	if ((void *)(ip + 1) > end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	vihl = *(__u8 *)ip;
	if (LBX_D_UNLIKELY(vihl != 0x45) && ((vihl >> 4) != 4 || (vihl & 0xf) < 5))
		return LBX_D_PASS_NOT_TUNNEL;
	proto = ip->protocol;
	frag = ip->frag_off;
	fam = tunnel_proto(proto);
	if (fam < 0)
		return LBX_D_PASS_NOT_TUNNEL;
	if (!fam) {
		/* A later fragment of UDP has no port to say whether it is GUE: not ours to judge. */
		if (frag & bpf_htons(LBX_IP_OFFSET))
			return LBX_D_PASS_NOT_TUNNEL;
		if (to_gue_port((void *)ip + (vihl & 0xf) * 4, end, gue_port) != LBX_D_OK)
			return LBX_D_PASS_NOT_TUNNEL;
	}
	/* The stack reassembles; XDP sees one fragment and cannot strip the others' headers. */
	if (LBX_D_UNLIKELY(frag & bpf_htons(LBX_IP_MF | LBX_IP_OFFSET)))
		return LBX_D_PASS_OUTER_FRAGMENT;
	if (LBX_D_UNLIKELY(vihl != 0x45))
		return LBX_D_PASS_OUTER_OPTIONS;
	tot = bpf_ntohs(ip->tot_len);
	if (tot < sizeof(*ip) || (void *)ip + tot > end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	t->outer_end = (void *)ip + tot;
	t->outer_family = LBX_FAMILY_V4;
	t->outer_dst = &ip->daddr;
	t->inner_family = fam;
	t->strip = sizeof(*ip);
	return LBX_D_OK;
}

/* A fragment header after an IPv6 outer header: is the fragment part of a tunnel packet? */
static __always_inline int decap_ipv6_frag(struct ipv6hdr *ip6, void *end, __be16 gue_port)
{
	struct frag_hdr {
		__u8 nexthdr;
		__u8 reserved;
		__be16 frag_off;
		__be32 id;
	} *fh = (void *)(ip6 + 1);

	if ((void *)(fh + 1) > end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if (fh->nexthdr == IPPROTO_IPIP || fh->nexthdr == LBX_IPPROTO_IPV6)
		return LBX_D_PASS_OUTER_FRAGMENT;
	if (fh->nexthdr != IPPROTO_UDP || (fh->frag_off & bpf_htons(0xfff8)))
		return LBX_D_PASS_NOT_TUNNEL;
	if (to_gue_port((void *)(fh + 1), end, gue_port) != LBX_D_OK)
		return LBX_D_PASS_NOT_TUNNEL;
	return LBX_D_PASS_OUTER_FRAGMENT;
}

static __always_inline int decap_ipv6(struct ipv6hdr *ip6, void *end, struct tunnel *t, __be16 gue_port)
{
	__u16 plen;
	int fam;

	if ((void *)(ip6 + 1) > end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if ((*(__u8 *)ip6 & 0xf0) != 0x60)
		return LBX_D_PASS_NOT_TUNNEL;
	if (LBX_D_UNLIKELY(ip6->nexthdr == LBX_IPPROTO_FRAG))
		return decap_ipv6_frag(ip6, end, gue_port);
	/* Other extension headers (e.g. Linux ip6_tnl's encapsulation limit option) are not
	 * walked: such packets go to the stack as they are. */
	fam = tunnel_proto(ip6->nexthdr);
	if (fam < 0)
		return LBX_D_PASS_NOT_TUNNEL;
	if (!fam && to_gue_port((void *)(ip6 + 1), end, gue_port) != LBX_D_OK)
		return LBX_D_PASS_NOT_TUNNEL;
	plen = bpf_ntohs(ip6->payload_len);
	if (plen == 0 || (void *)(ip6 + 1) + plen > end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	t->outer_end = (void *)(ip6 + 1) + plen;
	t->outer_family = LBX_FAMILY_V6;
	t->outer_dst = ip6->daddr.s6_addr32;
	t->inner_family = fam;
	t->strip = sizeof(*ip6);
	return LBX_D_OK;
}

/* UDP (to the GUE port, checked above) and the GUE header: variant 1, or variant 0 bare.
 * *inner moves from the UDP header to the inner IP header. */
static __always_inline int decap_gue(void **inner, void *end, struct tunnel *t)
{
	struct udphdr *udp = *inner;
	__u8 *g = (void *)(udp + 1);
	__u8 g0;

	if ((void *)(g + 4) > end || (void *)(udp + 1) >= t->outer_end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	if ((void *)udp + bpf_ntohs(udp->len) != t->outer_end)
		return LBX_D_PASS_TRUNCATED_OUTER;
	t->strip += sizeof(*udp);
	g0 = g[0];
	switch (g0 >> 6) {
	case 1: /* variant 1: an IP header; 0x4_ and 0x6_ are the only versions in it */
		if ((g0 >> 4) == 4)
			t->inner_family = LBX_FAMILY_V4;
		else if ((g0 >> 4) == 6)
			t->inner_family = LBX_FAMILY_V6;
		else
			return LBX_D_PASS_GUE_UNSUPPORTED;
		*inner = g;
		return LBX_D_OK;
	case 0: /* variant 0: C bit 0, hlen 0, flags 0, proto IPIP or IPv6 */
		if ((g0 & 0x3f) || g[2] || g[3])
			return LBX_D_PASS_GUE_UNSUPPORTED;
		if (g[1] == IPPROTO_IPIP)
			t->inner_family = LBX_FAMILY_V4;
		else if (g[1] == LBX_IPPROTO_IPV6)
			t->inner_family = LBX_FAMILY_V6;
		else
			return LBX_D_PASS_GUE_UNSUPPORTED;
		t->strip += 4;
		*inner = g + 4;
		return LBX_D_OK;
	}
	return LBX_D_PASS_GUE_UNSUPPORTED;
}

/* The inner IP header at p: the family the outer one announced, whole inside the outer packet. */
static __always_inline int decap_inner(void *p, void *end, struct tunnel *t)
{
	struct iphdr *ip = p;
	struct ipv6hdr *ip6 = p;
	__u16 len;
	__u8 vihl;

	if (LBX_D_LIKELY(t->inner_family == LBX_FAMILY_V4)) {
		if ((void *)(ip + 1) > end || (void *)(ip + 1) > t->outer_end)
			return LBX_D_PASS_TRUNCATED_INNER;
		vihl = *(__u8 *)ip;
		len = bpf_ntohs(ip->tot_len);
		if (LBX_D_UNLIKELY(vihl != 0x45) && ((vihl >> 4) != 4 || (vihl & 0xf) < 5))
			return LBX_D_PASS_BAD_INNER;
		if (len < (vihl & 0xf) * 4)
			return LBX_D_PASS_BAD_INNER;
		if (p + len > t->outer_end)
			return LBX_D_PASS_TRUNCATED_INNER;
		t->inner_dst = &ip->daddr;
		return LBX_D_OK;
	}
	if ((void *)(ip6 + 1) > end || (void *)(ip6 + 1) > t->outer_end)
		return LBX_D_PASS_TRUNCATED_INNER;
	if ((*(__u8 *)ip6 & 0xf0) != 0x60)
		return LBX_D_PASS_BAD_INNER;
	if ((void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > t->outer_end)
		return LBX_D_PASS_TRUNCATED_INNER;
	t->inner_dst = ip6->daddr.s6_addr32;
	return LBX_D_OK;
}

/*
 * The common tunnel in one test: IPIP, untagged Ethernet, both IPv4 headers without options,
 * the outer one no fragment, every length consistent. True exactly when parse_tunnel() would
 * return LBX_D_OK with outer and inner family 4, l2_len 14, strip 20 (anything else, including
 * every frame it would refuse, is left to parse_tunnel()); filled as parse_tunnel() fills t, with
 * far fewer instructions, all in a row (docs/benchmarks.md "decap": the program's cost follows
 * the code it runs through).
 */
static __always_inline int parse_ipip4(void *data, void *end, struct tunnel *t)
{
	struct iphdr *ip = data + sizeof(struct ethhdr), *in = (void *)(ip + 1);
	__u16 tot, in_tot;

	if ((void *)(in + 1) > end || *(__be16 *)(data + 12) != bpf_htons(ETH_P_IP) ||
	    *(__u8 *)ip != 0x45 || ip->protocol != IPPROTO_IPIP ||
	    (ip->frag_off & bpf_htons(LBX_IP_MF | LBX_IP_OFFSET)) || *(__u8 *)in != 0x45)
		return 0;
	tot = bpf_ntohs(ip->tot_len);
	in_tot = bpf_ntohs(in->tot_len);
	if ((void *)ip + tot > end || in_tot < sizeof(*in) || in_tot + sizeof(*ip) > tot)
		return 0;
	t->outer_end = (void *)ip + tot;
	t->outer_dst = &ip->daddr;
	t->inner_dst = &in->daddr;
	t->l2_len = sizeof(struct ethhdr);
	t->strip = sizeof(*ip);
	t->outer_family = LBX_FAMILY_V4;
	t->inner_family = LBX_FAMILY_V4;
	return 1;
}

/*
 * The common GUE tunnel in one test, as parse_ipip4: untagged Ethernet, IPv6 without extension
 * headers, UDP to the GUE port whose length is the outer payload's, GUE variant 1 carrying
 * IPv6, the inner packet inside the outer one. True exactly when parse_tunnel() would return
 * LBX_D_OK with outer and inner family 6, l2_len 14, strip 48; anything else is left to
 * parse_tunnel(). One bounds check for all four headers (102 bytes), whole-field loads.
 */
static __always_inline int parse_gue6(void *data, void *end, struct tunnel *t, __be16 gue_port)
{
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr), *in = (void *)(ip6 + 1) + sizeof(struct udphdr);
	struct udphdr *udp = (void *)(ip6 + 1);
	__u16 plen;

	if ((void *)(in + 1) > end || *(__be16 *)(data + 12) != bpf_htons(ETH_P_IPV6) ||
	    (*(__u8 *)ip6 & 0xf0) != 0x60 || ip6->nexthdr != IPPROTO_UDP || udp->dest != gue_port ||
	    (*(__u8 *)in & 0xf0) != 0x60)
		return 0;
	plen = bpf_ntohs(ip6->payload_len);
	if ((void *)(ip6 + 1) + plen > end || udp->len != ip6->payload_len ||
	    bpf_ntohs(in->payload_len) + sizeof(*udp) + sizeof(*in) > plen)
		return 0;
	t->outer_end = (void *)(ip6 + 1) + plen;
	t->outer_dst = ip6->daddr.s6_addr32;
	t->inner_dst = in->daddr.s6_addr32;
	t->l2_len = sizeof(struct ethhdr);
	t->strip = sizeof(*ip6) + sizeof(*udp);
	t->outer_family = LBX_FAMILY_V6;
	t->inner_family = LBX_FAMILY_V6;
	return 1;
}

/* The whole parse of the frame [data, end): Ethernet [VLAN], outer IP, [UDP GUE], inner IP header. */
static __always_inline int parse_tunnel(void *data, void *end, struct tunnel *t, __be16 gue_port)
{
	void *l3 = data + sizeof(struct ethhdr);
	__be16 proto;
	int r;

	if (l3 > end)
		return LBX_D_PASS_NOT_TUNNEL;
	proto = *(__be16 *)(data + 12);
	if (LBX_D_UNLIKELY(proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))) {
		if (l3 + sizeof(struct vlan_hdr) > end)
			return LBX_D_PASS_NOT_TUNNEL;
		proto = *(__be16 *)(l3 + 2);
		l3 += sizeof(struct vlan_hdr);
	}
	t->l2_len = l3 - data;
	if (LBX_D_LIKELY(proto == bpf_htons(ETH_P_IP)))
		r = decap_ipv4(l3, end, t, gue_port);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = decap_ipv6(l3, end, t, gue_port);
	else
		return LBX_D_PASS_NOT_TUNNEL;
	if (r != LBX_D_OK)
		return r;
	l3 += t->strip;
	if (LBX_D_UNLIKELY(!t->inner_family)) {
		r = decap_gue(&l3, end, t);
		if (r != LBX_D_OK)
			return r;
	}
	return decap_inner(l3, end, t);
}

#endif /* LBX_DECAP_PARSE_H */
