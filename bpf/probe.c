/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp_probe: tc egress (clsact) on the balancer's interface, for health checks of ipip/gue
 * backends that test what the data path tests. The checker's probe socket connects to VIP:port
 * with SO_MARK = LBX_PROBE_MARK | the backend entry's id; this program encapsulates exactly
 * those packets towards that backend, as encap.h does for a client's (same outer header
 * writers, encap_hdr.h; own address from lbx_ctl, next-hop MAC from the entry). The backend's
 * decap delivers the probe to its VIP service, which answers the balancer's own address
 * directly (DSR); lbxdp_ingress passes that reply to the kernel (not addressed to a VIP).
 * Unmarked packets leave untouched (TC_ACT_OK, no map lookup). A marked packet whose entry is
 * not an active ipip/gue one is dropped: a probe must fail rather than reach something else.
 *
 * Why a tc writer around the shared one: the room for the outer header is made by
 * bpf_skb_adjust_room (which also keeps the skb's offload state, skb->encapsulation and inner
 * header offsets right, so a CHECKSUM_PARTIAL probe is completed by the stack or the NIC),
 * not by bpf_xdp_adjust_head, and the inner packet's fields come from the skb's own IP header
 * (no struct pkt here). The GUE checksum uses the same identity as encap.h's inner_sum(): it
 * holds once the inner L4 checksum is complete, whenever that happens.
 *
 * Maps: lbx_backends and lbx_ctl of the instance, opened from its pins (LBX_PIN_DIR).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>

#include "abi.h"
#include "csum.h"
#include "encap_hdr.h"

#ifndef LBX_PIN_DIR
#error "LBX_PIN_DIR must be defined by the loader"
#endif

/* backend id -> backend: the balancer's (maps.h), read only here. */
BPF_TABLE_PINNED("array", __u32, struct backend, lbx_backends, LBX_MAX_BACKENDS, LBX_PIN_DIR "/lbx_backends");
/* 0 -> lbx_ctl: the balancer's (maps.h); own MAC and addresses, read only here. */
BPF_TABLE_PINNED("array", __u32, struct lbx_ctl, lbx_ctl, 1, LBX_PIN_DIR "/lbx_ctl");

/* The inner packet's fields for the outer header (ETH_HLEN in front of it: the probe's own
 * frame, never VLAN-tagged by the socket). LBX_R_OK or LBX_R_ABORT_REWRITE. */
static __always_inline int probe_inner(struct __sk_buff *skb, const struct backend *be, const struct lbx_ctl *ctl,
				       struct encap_info *e)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	struct lbx_addr a = {}, b = {};
	__u16 l4_len;
	__u8 proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if ((void *)(ip + 1) > end || ip->ihl != 5)
			return LBX_R_ABORT_REWRITE;
		e->tos = ip->tos;
		e->id = ip->id;
		e->df = ip->frag_off & bpf_htons(0x4000);
		e->inner_proto = IPPROTO_IPIP;
		e->inner_len = bpf_ntohs(ip->tot_len);
		l4_len = e->inner_len - sizeof(*ip);
		proto = ip->protocol;
		a.w[0] = ip->saddr;
		b.w[0] = ip->daddr;
		e->inner_sum = lbx_csum_words(ip, 5);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6) && be->family == LBX_FAMILY_V6) {
		if ((void *)(ip6 + 1) > end)
			return LBX_R_ABORT_REWRITE;
		e->tos = ip6->priority << 4 | ip6->flow_lbl[0] >> 4;
		e->inner_proto = IPPROTO_IPV6;
		l4_len = bpf_ntohs(ip6->payload_len);
		e->inner_len = l4_len + sizeof(*ip6);
		proto = ip6->nexthdr;
		__builtin_memcpy(&a, &ip6->saddr, sizeof(a));
		__builtin_memcpy(&b, &ip6->daddr, sizeof(b));
		e->inner_sum = lbx_csum_words(ip6, 10);
	} else {
		return LBX_R_ABORT_REWRITE; /* IPv6 in IPv4: refused by the model */
	}
	/* header + L4 = header - pseudo-header (encap.h, inner_sum()) */
	e->inner_sum += lbx_csum_neg(lbx_csum_addr(&a) + lbx_csum_addr(&b) + bpf_htons(proto) + bpf_htons(l4_len));
	if (be->family == LBX_FAMILY_V4) {
		e->src.w[0] = ctl->own_v4;
		return ctl->own_v4 ? LBX_R_OK : LBX_R_ABORT_REWRITE;
	}
	e->src = ctl->own_v6;
	return (e->src.w[0] | e->src.w[1] | e->src.w[2] | e->src.w[3]) ? LBX_R_OK : LBX_R_ABORT_REWRITE;
}

int lbxdp_probe(struct __sk_buff *skb)
{
	__u32 id = skb->mark & ~LBX_PROBE_MARK_MASK, zero = 0, overhead;
	struct encap_info e = {};
	struct lbx_ctl *ctl;
	struct backend *be;
	struct ethhdr *eth;
	void *data, *end;
	__u64 flags;

	if ((skb->mark & LBX_PROBE_MARK_MASK) != LBX_PROBE_MARK)
		return TC_ACT_OK;
	be = lbx_backends.lookup(&id);
	ctl = lbx_ctl.lookup(&zero);
	if (!be || !ctl || !(be->flags & LBX_BE_F_ACTIVE) || (be->mode != LBX_MODE_IPIP && be->mode != LBX_MODE_GUE))
		return TC_ACT_SHOT;
	if (probe_inner(skb, be, ctl, &e) != LBX_R_OK)
		return TC_ACT_SHOT;
	e.hash = bpf_get_hash_recalc(skb);
	overhead = (be->family == LBX_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) +
		   (be->mode == LBX_MODE_GUE ? sizeof(struct udphdr) : 0);
	flags = (be->family == LBX_FAMILY_V4 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV6) |
		(be->mode == LBX_MODE_GUE ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0);
	if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, flags))
		return TC_ACT_SHOT;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ctl->mac, ETH_ALEN);
	eth->h_proto = bpf_htons(be->family == LBX_FAMILY_V4 ? ETH_P_IP : ETH_P_IPV6);
	if ((be->family == LBX_FAMILY_V4 ? write_outer4(data + ETH_HLEN, end, be, &e)
					 : write_outer6(data + ETH_HLEN, end, be, &e)) != LBX_R_OK)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
