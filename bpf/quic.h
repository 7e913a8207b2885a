/* SPDX-License-Identifier: GPL-2.0 */
/*
 * QUIC connection-ID routing (issue 13). On a VIP with LBX_VIP_F_QUIC, a UDP packet that the
 * connection table does not know (a new 5-tuple: a client that migrated, or whose NAT rebound
 * its port) is routed by the server id its destination connection ID carries, when it carries
 * one: lbxdp.c calls quic_by_id() before select_backend(), which does the rest as for any UDP.
 *   long header (first bit 1): the version decides the type's meaning (RFC 9000 v1: Initial 0,
 *     0-RTT 1, Handshake 2, Retry 3; RFC 9369 v2: Retry 0, Initial 1, 0-RTT 2, Handshake 3).
 *     Initial and 0-RTT carry a DCID the client chose: the VIP's table (LBX_QUIC_INITIAL).
 *     Handshake: the DCID (its length is in the header) is one the server issued: by id.
 *     Retry (only servers send it), version 0 (negotiation) and unknown versions: table.
 *   short header (first bit 0): the DCID follows the first byte; its length is the server's
 *     choice and not on the wire, so the id must sit in its first LBX_QUIC_SID_END bytes.
 * The id is 16 bits at DCID bytes LBX_QUIC_SID_OFF.. (network order): a server puts it there in
 * every connection ID it issues (Katran's scheme, with our own position and width). It is looked
 * up in lbx_quic_sid (an array by id: one VIP's entry per id) and, when that slot is another
 * VIP's or empty, in lbx_quic_ids (the hash by VIP and id, every entry). An id that
 * lbx_quic_ids does not know for this VIP, whose backend entry changed since (generation), or
 * whose backend is down falls back to the table; each case is counted in lbx_quic_stats.
 * A packet routed by id is NOT recorded in lbx_flows: the id is the connection's for its whole
 * life, so routing each packet by it again (the id's lookup and the backend entry, after the
 * connection table's miss and the VIP lookup) gives what a record would, without the LRU
 * insert that made a migrated tuple's first packet cost a new flow (~+300-400 ns, docs/benchmarks.md),
 * without filling the table with every address a client moves through, and without counting a
 * leastconn backend's connection again. A migrated connection's every packet takes this path
 * (counted by_id each); its tuple recorded earlier (an Initial by the table, a record made by an
 * older program) stays an established flow. A down or unknown id falls back to select_backend(),
 * which records as for any UDP datagram.
 * Counted twice: program-wide in lbx_quic_stats and per VIP in lbx_quic_vip (VIP id *
 * LBX_QUIC_MAX + reason); both per-CPU arrays, looked up on this path only.
 */
#ifndef LBX_QUIC_H
#define LBX_QUIC_H

#include "maps.h"
#include "parse.h"
#include "select.h"

static __always_inline int quic_count(const struct vip_meta *vip, __u32 r)
{
	__u64 *c = lbx_quic_stats.lookup(&r);
	__u32 k = vip->id * LBX_QUIC_MAX + r;

	if (c)
		(*c)++;
	c = lbx_quic_vip.lookup(&k);
	if (c)
		(*c)++;
	return 0;
}

/* 1 (sel set, nothing recorded) when the packet's server id names a live backend of the VIP. */
static __always_inline int quic_by_id(struct xdp_md *ctx, const struct vip_meta *vip, struct pkt *pkt,
				      struct selection *sel)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct quic_id_key k = { .vip_id = vip->id };
	struct quic_sid_val *s;
	struct quic_id_val *v;
	struct backend *be;
	__u8 *q, *d;
	__u32 off, version;
	__u8 type;

	if (pkt->flow.proto != IPPROTO_UDP || (pkt->flags & LBX_PKT_F_ICMP_ERR))
		return 0;
	off = pkt->l4_off;
	if (off > 256)          /* never: parse.h's headers end sooner; bounds the verifier's range */
		return quic_count(vip, LBX_QUIC_SHORT_CID);
	q = data + off + sizeof(struct udphdr);
	if ((void *)(q + 1) > end)
		return quic_count(vip, LBX_QUIC_SHORT_CID);
	if (q[0] & 0x80) {
		if ((void *)(q + 6 + LBX_QUIC_SID_END) > end)
			return quic_count(vip, LBX_QUIC_SHORT_CID);
		version = (__u32)q[1] << 24 | (__u32)q[2] << 16 | (__u32)q[3] << 8 | q[4];
		type = (q[0] >> 4) & 3;
		if (version == LBX_QUIC_V2)
			type = (type + 3) & 3;          /* v2's numbering to v1's */
		else if (version != LBX_QUIC_V1)
			return quic_count(vip, LBX_QUIC_OTHER);
		if (type <= 1)                          /* Initial, 0-RTT */
			return quic_count(vip, LBX_QUIC_INITIAL);
		if (type == 3)                          /* Retry */
			return quic_count(vip, LBX_QUIC_OTHER);
		if (q[5] < LBX_QUIC_SID_END)            /* Handshake: DCID length */
			return quic_count(vip, LBX_QUIC_SHORT_CID);
		d = q + 6;
	} else {
		d = q + 1;
		if ((void *)(d + LBX_QUIC_SID_END) > end)
			return quic_count(vip, LBX_QUIC_SHORT_CID);
	}
	k.server_id = (__u32)d[LBX_QUIC_SID_OFF] << 8 | d[LBX_QUIC_SID_OFF + 1];
	/* Direct by the id first (an inlined array lookup, ~20 ns less than the hash's helper call):
	 * the slot holds one VIP's entry for the id; another VIP's id, or none, reads the hash. */
	s = lbx_quic_sid.lookup(&k.server_id);
	if (s && s->val.backend_id && s->vip_id == vip->id)
		v = &s->val;
	else
		v = lbx_quic_ids.lookup(&k);
	if (!v)
		return quic_count(vip, LBX_QUIC_UNKNOWN_ID);
	if (v->flags & LBX_QUIC_F_DOWN)
		return quic_count(vip, LBX_QUIC_DOWN_ID);
	be = backend_by_id(v->backend_id);
	if (!be || be->gen != v->gen || be->vip_id != vip->id)
		return quic_count(vip, LBX_QUIC_UNKNOWN_ID);
	sel->be = be;
	sel->backend_id = v->backend_id;
	sel->vip_id = vip->id;
	quic_count(vip, LBX_QUIC_BY_ID);
	return 1;
}

#endif /* LBX_QUIC_H */
