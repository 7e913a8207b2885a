/* SPDX-License-Identifier: GPL-2.0 */
/*
 * LBX_MODE_NAT (issue 12), the forward side: client -> VIP becomes client (or, with
 * LBX_NAT_F_SNAT, the SNAT address and a pool port) -> backend:port. return_path.h translates
 * the replies back with the same entries. One-armed: both directions arrive on and leave by
 * the attached interface (XDP_TX).
 *
 * Conntrack (abi.h, lbx_nat): a connection's first packet opens two entries, the forward one
 * under the client's tuple as received and the reply one under the tuple the backend's replies
 * carry; each says what to write into its direction's packets, so an established packet costs
 * one lookup per direction. Both keep the TCP state (SYN_SENT -> ESTABLISHED on the backend's
 * SYN-ACK -> CLOSING on a FIN or RST from either side) and its timeout; an entry past
 * seen + timeout counts as absent (the LRU or the control plane removes it later). A TCP
 * connection opened by a SYN keeps its entries in lbx_nat_new (maps.h) until the client's ACK
 * of the SYN-ACK, a UDP flow until its client's second datagram, which move them to lbx_nat
 * (nat_assure): a flood of spoofed first packets churns lbx_nat_new only.
 *
 * Checksums are updated incrementally (csum.h): the sum of every changed word's complement and
 * its new value is added to the complemented old checksum (RFC 1624 eqn. 3, 32-bit words at
 * even offsets, which sum like their two 16-bit halves). IPv4 UDP without a checksum (0) keeps
 * none; a computed 0 is sent as 0xffff (RFC 768).
 *
 * Every function returns LBX_R_OK or the reason the frame cannot be forwarded.
 */
#ifndef LBX_NAT_H
#define LBX_NAT_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "select.h"
#include "csum.h"
#include "clock.h"

#define LBX_TCP_FIN 0x01
#define LBX_TCP_SYN 0x02
#define LBX_TCP_RST 0x04
#define LBX_TCP_ACK 0x10
#define LBX_ICMP_QUOTE_HDR 8 /* the ICMP header before the quote (v4 and v6) */

/* Where the handshake table holds a key: its bucket (NULL: not looked up), its check (hs_bucket)
 * and its way (-1: not there). Kept by nat_lookup(), so that the packet that assures a
 * connection (nat_assure) empties its own slot without hashing its key and walking its bucket
 * again. Copied into struct nat_flow only with the entry it found (nat_established): carried on
 * every path, it split the verifier's states past its bound (E2BIG). */
struct hs_at {
	struct nat_new_bucket *b;
	__u32 h;
	int w;
};

/* What nat_established() found for the packet, for forward_nat(). */
struct nat_flow {
	struct nat_entry *e;  /* the connection's entry for this direction; NULL: open one */
	__u32 now;            /* nat_now() when it was looked up */
	__u8 fresh;           /* e is in lbx_nat_new: a new connection, not yet assured (nat_assure) */
	__u8 nat_dst;         /* the destination passed lbx_nat_filter (nat_established looked): it may
			       * be a NAT VIP's, whose packets skip the connection table (lbxdp.c) */
	__u8 held;            /* lbx_nat has an entry under the packet's key that e is not (closing,
			       * expired, or its backend entry gone): a connection opened now replaces it */
	struct hs_at at;      /* e's slot in the handshake table when fresh (set with e) */
};

/*
 * The conntrack clock (abi.h LBX_NAT_TIME_SHIFT), read for every NAT packet: jiffies (clock.h
 * tick_ns(), one inlined load; bpf_ktime_get_coarse_ns() is a call, ~10-15 ns). It lags
 * CLOCK_MONOTONIC by a constant (~60 ms here), so the control plane, which compares entries'
 * times with CLOCK_MONOTONIC (lbxdp.maps.nat_now()), sees them at most that much older than the
 * program does: its GC may take an entry that much before the program would call it absent,
 * never after, and never reads an age as negative.
 */
static __always_inline __u32 nat_now(void)
{
	return tick_ns() >> LBX_NAT_TIME_SHIFT;
}

/* One bit of lbx_nat_filter: whether addr may be a NAT VIP's or a NAT backend's (maps.h). */
static __always_inline int nat_filter_has(const struct lbx_addr *a)
{
	const __u32 *w = (const __u32 *)a->w;
	__u32 bit = ((w[0] ^ w[1] ^ w[2] ^ w[3]) * LBX_VIP_FILTER_MUL) >> (32 - LBX_VIP_FILTER_BITS);
	__u32 word = bit / 64;
	__u64 *bits = lbx_nat_filter.lookup(&word);

	return bits && ((*bits >> (bit % 64)) & 1);
}

static __always_inline int nat_expired(const struct nat_entry *e, __u32 now)
{
	return now - e->seen > e->timeout;
}

/*
 * The handshake table lbx_nat_new (maps.h; abi.h struct nat_new_bucket): a key's bucket of
 * LBX_NAT_NEW_WAYS slots is the hash of its client-side endpoint (hs_bucket_hash: a forward key's
 * source, a reply key's destination), and a slot's check (in the bucket's first line) is the hash
 * of the whole key (hs_hash, | 1: 0 marks an empty slot). A DNAT connection's reply key has the
 * client as its destination, so its two slots share one bucket: a SYN writes one page, and the
 * client's ACK finds the reply slot in the line its own lookup read (SNAT's reply key carries the
 * pool address and port instead: its two slots are in two buckets). Slots are written without
 * locks by any CPU, check last (x86 keeps
 * stores in order; the barriers keep the compiler's), so a slot being written reads as a miss. A reader racing the
 * eviction of its own handshake's slot may read the new entry's fields: that one packet is
 * translated as the new connection's (an LRU reader keeps the old element; here the slot is
 * reused). Two CPUs writing one slot at once (two new connections in one bucket within ~100 ns)
 * can leave one's key with the other's entry: the DSR half-open table's check also binds the
 * value; here the entry changes in place, so nothing can. Every function here is short on purpose: the verifier walks each once per path that
 * reaches it, and the open path is reached by many (see hs_opaque). reply, where a function
 * takes it: the key is a reply key (its client side is its destination).
 */
static __always_inline __u32 hs_mix(__u64 x)
{
	x *= 0x9e3779b97f4a7c15ULL;
	x ^= x >> 29;
	x *= 0xbf58476d1ce4e5b9ULL;
	return x >> 32;
}

static __always_inline __u32 hs_hash(const struct flow_key *k)
{
	const __u32 *w = (const __u32 *)k;   /* src 0-3, dst 4-7, ports 8, proto/family 9 */

	return hs_mix(((__u64)(w[0] ^ w[1] ^ w[2] ^ w[3]) << 32 | (w[4] ^ w[5] ^ w[6] ^ w[7])) ^
		      ((__u64)w[8] << 16) ^ w[9]);
}

/* The hash of k's client-side endpoint: address, port (its word's low half, as loaded, is the
 * source port), protocol and family. */
static __always_inline __u32 hs_bucket_hash(const struct flow_key *k, int reply)
{
	const __u32 *w = (const __u32 *)k;
	__u32 a = reply ? w[4] ^ w[5] ^ w[6] ^ w[7] : w[0] ^ w[1] ^ w[2] ^ w[3];
	__u32 port = reply ? w[8] >> 16 : w[8] & 0xffff;

	return hs_mix((__u64)a << 32 ^ (__u64)port << 16 ^ w[9]);
}

/* k's bucket; *h: the check of k's slot. */
static __always_inline struct nat_new_bucket *hs_bucket(const struct flow_key *k, int reply, __u32 *h)
{
	__u32 idx = hs_bucket_hash(k, reply) & (LBX_NAT_NEW_CAPACITY / LBX_NAT_NEW_WAYS - 1);

	*h = hs_hash(k) | 1;
	return lbx_nat_new.lookup(&idx);
}

static __always_inline struct nat_new_slot *hs_slot(struct nat_new_bucket *b, int way)
{
	return &b->way[way & (LBX_NAT_NEW_WAYS - 1)];
}

/*
 * The way i (unchanged), hidden from the verifier's value tracking. A bucket walk ends in one of
 * several constant ways, and the verifier follows each as a path of its own through the rest of
 * the program, which then passed its 1M-instruction bound (E2BIG); a way it cannot tell is one
 * path, in [0, LBX_NAT_NEW_WAYS). c: any value loaded from the map (unknown to the verifier; the
 * asm keeps the compiler from folding c + i - c back to i). Two instructions.
 */
static __always_inline int hs_opaque(int i, __u32 c)
{
	__u32 x = c + i;

	asm volatile("" : "+r"(x));
	return (x - c) & (LBX_NAT_NEW_WAYS - 1);
}

/*
 * The way of b holding k (check h: hs_bucket), or -1: the first way whose check is h, if its key
 * is k (two keys of one bucket with the same 31-bit check: the second reads as absent, as if
 * evicted). One key comparison, after the paths of the four checks were merged (hs_opaque).
 */
static __always_inline int hs_find(struct nat_new_bucket *b, const struct flow_key *k, __u32 h)
{
	int w;

	if (b->check[0] == h)
		w = 0;
	else if (b->check[1] == h)
		w = 1;
	else if (b->check[2] == h)
		w = 2;
	else if (b->check[3] == h)
		w = 3;
	else
		return -1;
	w = hs_opaque(w, h);
	return same_flow(&hs_slot(b, w)->key, k) ? w : -1;
}

/*
 * Where a new entry goes when its key has no slot (hs_find): the first empty slot from a
 * hash-given start, else the slot at that start (an LRU would take the one seen longest ago;
 * under a flood both keep a handshake for about LBX_NAT_NEW_WAYS writes to its bucket). Only the
 * checks' line is read: a slot past its timeout counts as taken until the control plane's GC
 * empties it (lbxdp.conntrack.Gc, as it removes lbx_nat's), or a new entry takes it at random.
 * No comparisons between ways: each adds paths the verifier walks (see hs_opaque).
 */
static __always_inline int hs_victim(struct nat_new_bucket *b, __u32 h)
{
	__u32 start = h >> 30;

#pragma unroll
	for (int i = 0; i < LBX_NAT_NEW_WAYS; i++) {
		if (!b->check[(start + i) & (LBX_NAT_NEW_WAYS - 1)])
			return hs_opaque(start + i, h);
	}
	return start;
}

/* Write k and e into way w of b (check h): check 0, the slot, check. */
static __always_inline void hs_write(struct nat_new_bucket *b, int w, const struct flow_key *k,
				     const struct nat_entry *e, __u32 h)
{
	struct nat_new_slot *s = hs_slot(b, w);
	__u32 *check = &b->check[w & (LBX_NAT_NEW_WAYS - 1)];

	*check = 0;
	asm volatile("" ::: "memory");
	s->key = *k;
	s->e = *e;
	asm volatile("" ::: "memory");
	*check = h;
}

/* Empty way w of b. */
static __always_inline void hs_empty(struct nat_new_bucket *b, int w)
{
	b->check[w & (LBX_NAT_NEW_WAYS - 1)] = 0;
}

/* Empty the slot nat_lookup() found (at) if it still holds that key: another CPU may have reused it. */
static __always_inline void hs_empty_at(const struct hs_at *at)
{
	struct nat_new_bucket *b = at->b;

	if (b && at->w >= 0 && b->check[at->w & (LBX_NAT_NEW_WAYS - 1)] == at->h)
		hs_empty(b, at->w);
}

/* The way of k's bucket (*b; NULL if the lookup failed, check *h) holding k, or -1. */
static __always_inline int hs_locate(const struct flow_key *k, int reply, struct nat_new_bucket **b, __u32 *h)
{
	*b = hs_bucket(k, reply, h);
	return *b ? hs_find(*b, k, *h) : -1;
}

/* The entry under k in the handshake table, live or not, or NULL. */
static __always_inline struct nat_entry *hs_get(const struct flow_key *k, int reply)
{
	struct nat_new_bucket *b;
	__u32 h;
	int w = hs_locate(k, reply, &b, &h);

	return w < 0 ? NULL : &hs_slot(b, w)->e;
}

/*
 * Write e, a forward entry, under k (over k's own slot, else hs_victim's), but never over the
 * slot of its own reply key rk, written just before (nat_open): a DNAT connection's two keys
 * share a bucket, and in a full one both victims may be the same way; the next way goes then
 * (rk is hashed only when a slot of another key is taken: a flood's case). A SYN hashed k in
 * nat_lookup() already; carrying that check (or the bucket, or the way) to here through the
 * selection stages split the verifier's states on every path between (720,694 instructions
 * walked -> 916,176 for the check alone, E2BIG with the bucket and way), so k is hashed again:
 * ~20 instructions.
 */
static __always_inline void hs_put(const struct flow_key *k, const struct nat_entry *e, const struct flow_key *rk)
{
	struct nat_new_bucket *b;
	__u32 h, c;
	int w = hs_locate(k, 0, &b, &h);

	if (!b)
		return;
	if (w < 0)
		w = hs_victim(b, h);
	c = b->check[w & (LBX_NAT_NEW_WAYS - 1)];
	if (c && c != h && c == (hs_hash(rk) | 1))
		w++;
	hs_write(b, w, k, e, h);
}

/* Empty k's slot, if it has one. */
static __always_inline void hs_delete(const struct flow_key *k, int reply)
{
	struct nat_new_bucket *b;
	__u32 h;
	int w = hs_locate(k, reply, &b, &h);

	if (w >= 0)
		hs_empty(b, w);
}

/* The live entry under key k: lbx_nat's, else lbx_nat_new's (*fresh = 1), else NULL (none, or
 * past its timeout: absent). *held: lbx_nat has an entry under k, live or not.
 * again: when neither table has k, look in lbx_nat once more. nat_assure() on another CPU moves a
 * connection's entries into lbx_nat before it empties their handshake slots, so a lookup that
 * missed lbx_nat just before the move and the handshake table just after it finds them there
 * (a CI run lost one connection of 500 to that window: a backend's reply passed untranslated).
 * Not for a SYN, whose miss is the common case and whose cost issue 12 bounds. reply: k is a
 * reply key (the return path's), not a forward one. */
static __always_inline struct nat_entry *nat_lookup(struct flow_key *k, int reply, __u32 now, __u8 *fresh,
						   __u8 *held, struct hs_at *at, int again)
{
	struct nat_entry *e = lbx_nat.lookup(k);

	*held = e != NULL;
	*fresh = 0;
	if (e && !nat_expired(e, now))
		return e;
	at->w = hs_locate(k, reply, &at->b, &at->h);
	*fresh = 1;
	e = at->w < 0 ? NULL : &hs_slot(at->b, at->w)->e;
	if (!e && again && !*held) {
		e = lbx_nat.lookup(k);
		*held = e != NULL;
		*fresh = 0;
	}
	return e && !nat_expired(e, now) ? e : NULL;
}

/* The entry under k (a reply key if reply) in lbx_nat_new (fresh) or lbx_nat. */
static __always_inline struct nat_entry *nat_get(struct flow_key *k, int fresh, int reply)
{
	return fresh ? hs_get(k, reply) : lbx_nat.lookup(k);
}

/* The key of e's other direction: e's rewritten tuple, reversed. */
static __always_inline void nat_peer_key(const struct nat_entry *e, struct flow_key *k)
{
	k->src = e->daddr;
	k->dst = e->saddr;
	k->sport = e->dport;
	k->dport = e->sport;
	k->proto = e->proto;
	k->family = e->family;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

/* The timeout of state for an entry of lbx_nat (fresh = 0) or lbx_nat_new: there, a handshake
 * the backend answered keeps tcp_syn until its client's ACK (nf_conntrack's SYN_RECV), so that a
 * flood's answered handshakes do not hold their entries (and SNAT ports) for tcp_established. */
static __always_inline __u32 nat_timeout(const struct nat_cfg *cfg, __u8 state, int fresh)
{
	if (!cfg)
		return 0;
	return cfg->timeout[fresh && state == LBX_NAT_ESTABLISHED ? LBX_NAT_SYN_SENT : state & 3];
}

/* Move both entries of e's connection to state (its timeout from lbx_nat_cfg). Only on a
 * state change: the second lookup is the peer's, in e's table (fresh: lbx_nat_new). reply: e is
 * the reply entry (a constant of the caller's path: a direction read from e split the verifier's
 * states, +47,000 instructions walked). */
static __always_inline void nat_set_state(struct nat_entry *e, __u8 state, int fresh, int reply)
{
	__u32 zero = 0;
	struct nat_cfg *cfg = lbx_nat_cfg.lookup(&zero);
	struct flow_key k = {};
	struct nat_entry *peer;
	__u32 t = nat_timeout(cfg, state, fresh);

	e->state = state;
	e->timeout = t;
	nat_peer_key(e, &k);
	peer = nat_get(&k, fresh, !reply);   /* the peer's direction is the other one */
	if (peer) {
		peer->state = state;
		peer->timeout = t;
	}
}

/* Passive health (issue 12): a handshake's outcome for its backend entry; atomics, as both
 * directions of different connections update one backend on different CPUs. */
static __always_inline void nat_handshake(__u32 backend_id, int ok, __u64 kind_syn_rst, __u32 now)
{
	struct nat_backend *b = lbx_nat_be.lookup(&backend_id);

	if (!b)
		return;
	if (ok) {
		b->consecutive = 0;
		__sync_fetch_and_add(&b->synack, 1);
		return;
	}
	__sync_fetch_and_add(&b->consecutive, 1);
	b->last_failure = now;
	if (kind_syn_rst)
		__sync_fetch_and_add(&b->syn_rst, 1);
	else
		__sync_fetch_and_add(&b->syn_retx, 1);
}

/* The TCP flags byte of the packet's TCP header (0 for UDP and ICMP errors). */
static __always_inline __u8 nat_tcp_flags(struct xdp_md *ctx, const struct pkt *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *flags = data + (pkt->l4_off & 0x3f) + 13;

	if (pkt->flow.proto != IPPROTO_TCP || (pkt->flags & LBX_PKT_F_ICMP_ERR) || (void *)(flags + 1) > end)
		return 0;
	return *flags;
}

/*
 * A packet of an open connection, its direction's entry e: refresh e (a write only when the
 * clock moved, so an established flow's entry is not written per packet) and follow the TCP
 * state. Forward: a SYN again while SYN_SENT is the client retransmitting (no SYN-ACK came: a
 * failed handshake). Reply: the SYN-ACK establishes, an RST while SYN_SENT refuses (failed).
 * A FIN or RST from either side closes. reply: the packet is a reply, e its reply entry (the
 * return path's call; the forward path's e is a forward entry: nat_established()).
 */
static __always_inline void nat_track(struct xdp_md *ctx, const struct pkt *pkt, struct nat_entry *e, __u32 now,
				      int fresh, int reply)
{
	__u8 f = nat_tcp_flags(ctx, pkt);

	if (e->seen != now)
		e->seen = now;
	if (!f)
		return;
	if (e->state == LBX_NAT_SYN_SENT) {
		if (!reply && (f & (LBX_TCP_SYN | LBX_TCP_ACK)) == LBX_TCP_SYN) {
			nat_handshake(e->backend_id, 0, 0, now);
		} else if (reply && (f & (LBX_TCP_SYN | LBX_TCP_ACK)) == (LBX_TCP_SYN | LBX_TCP_ACK)) {
			nat_handshake(e->backend_id, 1, 0, now);
			nat_set_state(e, LBX_NAT_ESTABLISHED, fresh, reply);
		} else if (reply && (f & LBX_TCP_RST)) {
			nat_handshake(e->backend_id, 0, 1, now);
		}
	}
	if ((f & (LBX_TCP_FIN | LBX_TCP_RST)) && e->state != LBX_NAT_CLOSING)
		nat_set_state(e, LBX_NAT_CLOSING, fresh, reply);
}

/*
 * The forward entry of the packet's connection, if live and its backend entry is still the one
 * it went to. Gated by one bit of lbx_nat_filter at the destination, so that DSR, encap and
 * other traffic never pays the lookup. A SYN on a closing connection's tuple (a client reusing
 * its port) opens a new connection instead.
 */
static __always_inline int nat_established(struct pkt *pkt, struct selection *sel, struct nat_flow *nf)
{
	struct hs_at at;   /* set by nat_lookup() when it looked in the handshake table (fresh) */
	struct nat_entry *e;
	struct backend *be;

	if (!nat_filter_has(&pkt->flow.dst))
		return 0;
	nf->nat_dst = 1;
	nf->now = nat_now();
	e = nat_lookup(&pkt->flow, 0, nf->now, &nf->fresh, &nf->held, &at, !(pkt->flags & LBX_PKT_F_SYN));
	if (!e || e->dir != LBX_NAT_DIR_FWD)
		return 0;
	if ((pkt->flags & LBX_PKT_F_SYN) && e->state == LBX_NAT_CLOSING)
		return 0;
	be = backend_by_id(e->backend_id);
	if (!be || be->gen != e->gen || be->mode != LBX_MODE_NAT)   /* lbxdp.c: forward_nat() only */
		return 0;
	nf->e = e;
	nf->held = 0;
	if (nf->fresh)
		nf->at = at;
	sel->be = be;
	sel->backend_id = e->backend_id;
	sel->vip_id = be->vip_id;
	return 1;
}

/*
 * A new connection to a NAT VIP: the VIP's table chooses (table_choice(), select.h); nothing is
 * recorded in the DSR connection table or the half-open table (NAT's own entries, made by
 * nat_open(), hold the choice). An ICMP error about a connection lbx_nat does not know has no
 * translation to apply.
 */
static __always_inline int nat_select(const struct vip_meta *vip, struct pkt *pkt, struct selection *sel)
{
	int r;

	if (pkt->flags & LBX_PKT_F_ICMP_ERR)
		return LBX_R_PASS_NAT_ICMP_NO_FLOW;
	r = table_choice(vip, pkt, sel);
	if (r == LBX_R_OK)
		sel->new_flow = 1;
	return r;
}

static __always_inline int nat_same(const struct lbx_addr *a, const struct lbx_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* Whether old, found under a reply key wanted for rep, may be replaced: it is rep's own client
 * tuple (the same client reopening), or it and its peer (in old's table) are past their timeouts.
 * old is a reply entry, so its peer's key is a forward one (were it a forward entry, which a
 * reply key can be only if a VIP is also a client's or the SNAT address, its peer would be looked
 * for in the wrong bucket of the handshake table: a miss, so its own timeout decides). */
static __always_inline int nat_replaceable(struct nat_entry *old, const struct nat_entry *rep, struct flow_key *k,
					   __u32 now, int fresh)
{
	struct nat_entry *peer;

	if (old->dport == rep->dport && old->sport == rep->sport && nat_same(&old->daddr, &rep->daddr) &&
	    nat_same(&old->saddr, &rep->saddr))
		return 1;
	if (!nat_expired(old, now))
		return 0;
	nat_peer_key(old, k);
	peer = nat_get(k, fresh, 0);   /* a forward key */
	return !peer || nat_expired(peer, now);
}

/* Whether the other table (fresh: lbx_nat; else lbx_nat_new) lets rep have the reply key k: no
 * entry there, or a replaceable one, which goes (it would shadow rep or be shadowed by it). */
static __always_inline int nat_claim_other(struct flow_key *k, struct nat_entry *rep, struct flow_key *tmp, __u32 now,
					   int fresh)
{
	struct nat_entry *old = nat_get(k, !fresh, 1);

	if (!old)
		return 1;
	if (!nat_replaceable(old, rep, tmp, now, !fresh))
		return 0;
	if (fresh)
		lbx_nat.delete(k);
	else
		hs_delete(k, 1);
	return 1;
}

/* Write rep under the reply key k in the handshake table unless a live connection holds it there
 * (the slot k has, else hs_victim's: one hash and one walk of the bucket for both). */
static __always_inline int hs_claim(struct flow_key *k, struct nat_entry *rep, struct flow_key *tmp, __u32 now)
{
	struct nat_new_bucket *b;
	__u32 h;
	int w;

	w = hs_locate(k, 1, &b, &h);
	if (!b)
		return 0;
	if (w >= 0) {
		if (!nat_replaceable(&hs_slot(b, w)->e, rep, tmp, now, 1))
			return 0;
	} else {
		w = hs_victim(b, h);
	}
	hs_write(b, w, k, rep, h);
	return 1;
}

/* Insert rep under the reply key k in its table (fresh: lbx_nat_new) unless a live connection
 * holds it in either table (never a silent collision). */
static __always_inline int nat_claim(struct flow_key *k, struct nat_entry *rep, struct flow_key *tmp, __u32 now,
				     int fresh)
{
	struct nat_entry *old;

	if (!nat_claim_other(k, rep, tmp, now, fresh))
		return 0;
	if (fresh)
		return hs_claim(k, rep, tmp, now);
	if (lbx_nat.insert(k, rep) == 0)
		return 1;
	old = lbx_nat.lookup(k);
	if (old && !nat_replaceable(old, rep, tmp, now, 0))
		return 0;
	lbx_nat.update(k, rep);
	return 1;
}

/*
 * SNAT: a port of the pool for this backend. The candidates follow the backend entry's cursor
 * (lbx_nat_be.port_cursor): sequential allocation fills a pool before it reuses a port, so a
 * pool of N ports holds N connections to one backend (random candidates would start failing
 * long before). A port is unique per (SNAT address, backend address and port, protocol): the
 * reply key. LBX_NAT_PORT_TRIES candidates, then LBX_R_DROP_NAT_NO_PORT. The verifier walks
 * the claim once per candidate: with 8, ~216,000 of the ~720,000 instructions it walks
 * (scripts/verifier_budget.py; testing candidates with reads only and claiming once after the
 * loop saved 8,000 of them: the reads are most of a claim, and it was not kept).
 */
static __always_inline int nat_alloc_port(const struct nat_cfg *cfg, __u32 backend_id, struct nat_scratch *s,
					  __u32 now, int fresh)
{
	struct nat_backend *nb = lbx_nat_be.lookup(&backend_id);
	__u32 size, idx;

	if (!cfg->port_min || cfg->port_max < cfg->port_min)
		return LBX_R_DROP_NAT_NO_PORT;
	size = (__u32)cfg->port_max - cfg->port_min + 1;
	idx = nb ? nb->port_cursor : 0;
	for (int i = 0; i < LBX_NAT_PORT_TRIES; i++) {
		__be16 port = bpf_htons(cfg->port_min + (idx + i) % size);

		s->rk.dport = port;
		s->fwd.sport = port;
		if (nat_claim(&s->rk, &s->rep, &s->k, now, fresh)) {
			if (nb)
				nb->port_cursor = idx + i + 1;
			return LBX_R_OK;
		}
	}
	if (nb)
		nb->port_cursor = idx + LBX_NAT_PORT_TRIES;
	return LBX_R_DROP_NAT_NO_PORT;
}

/* The SNAT source of the family (lbx_nat_cfg), or LBX_R_DROP_NO_OWN_ADDR. */
static __always_inline int nat_source(const struct nat_cfg *cfg, __u8 family, struct lbx_addr *src)
{
	if (family == LBX_FAMILY_V4) {
		*src = (struct lbx_addr){ .w = { cfg->snat_v4 } };
		return cfg->snat_v4 ? LBX_R_OK : LBX_R_DROP_NO_OWN_ADDR;
	}
	*src = cfg->snat_v6;
	return (src->w[0] | src->w[1] | src->w[2] | src->w[3]) ? LBX_R_OK : LBX_R_DROP_NO_OWN_ADDR;
}

/*
 * Open a connection's two entries from its first packet (fwd gets the forward entry): the
 * reply entry first (its key may be taken: SNAT then tries other ports), then the forward one.
 * The reply entry remembers the source MAC of this packet: the next hop back to the client.
 * A SYN's or a datagram's entries go to lbx_nat_new (fresh), replacing what lbx_nat held under
 * its key (nf); a TCP packet without SYN (a connection picked up mid-stream) opens in lbx_nat.
 */
static __always_inline int nat_open(struct xdp_md *ctx, const struct pkt *pkt, const struct selection *sel,
				    struct nat_scratch *s, const struct nat_flow *nf)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;
	struct nat_cfg *cfg = lbx_nat_cfg.lookup(&zero);
	const struct backend *be = sel->be;
	struct nat_entry *fwd = &s->fwd, *rep = &s->rep;
	__u32 now = nat_now();
	int r = LBX_R_OK, fresh;

	if (!cfg || (void *)(eth + 1) > end)
		return LBX_R_ABORT_REWRITE;
	__builtin_memset(fwd->mac, 0, ETH_ALEN);
	fwd->state = pkt->flow.proto == IPPROTO_UDP ? LBX_NAT_UDP :
		     (pkt->flags & LBX_PKT_F_SYN) ? LBX_NAT_SYN_SENT : LBX_NAT_ESTABLISHED;
#ifndef LBX_NAT_NO_HANDSHAKE_TABLE
	fresh = fwd->state != LBX_NAT_ESTABLISHED;   /* a SYN or a datagram: SYN_SENT or UDP */
	/* Opaque to the verifier: known per protocol, fresh splits every path below it, and the
	 * program passes the verifier's 1M-instruction bound no more (E2BIG). */
	asm volatile("" : "+r"(fresh));
#else
	fresh = 0;   /* every connection opens in lbx_nat: tests/netns/test_nat.py's unprotected build */
#endif
	fwd->timeout = cfg->timeout[fwd->state & 3];
	fwd->backend_id = sel->backend_id;
	fwd->gen = be->gen;
	fwd->family = pkt->flow.family;
	fwd->proto = pkt->flow.proto;
	fwd->seen = now;
	fwd->created = now;
	__builtin_memcpy(rep, fwd, sizeof(*rep));
	fwd->dir = LBX_NAT_DIR_FWD;
	fwd->saddr = pkt->flow.src;
	fwd->sport = pkt->flow.sport;
	fwd->daddr = be->addr;
	fwd->dport = be->port ? be->port : pkt->flow.dport;   /* an any-port VIP's backend keeps the port */
	rep->dir = LBX_NAT_DIR_REPLY;
	rep->saddr = pkt->flow.dst;
	rep->sport = pkt->flow.dport;
	rep->daddr = pkt->flow.src;
	rep->dport = pkt->flow.sport;
	__builtin_memcpy(rep->mac, eth->h_source, ETH_ALEN);
	if (be->nat_flags & LBX_NAT_F_SNAT) {
		r = nat_source(cfg, pkt->flow.family, &fwd->saddr);
		if (r != LBX_R_OK)
			return r;
	}
	nat_peer_key(fwd, &s->rk);
	if (be->nat_flags & LBX_NAT_F_SNAT)
		r = nat_alloc_port(cfg, sel->backend_id, s, now, fresh);
	else if (!nat_claim(&s->rk, rep, &s->k, now, fresh))
		r = LBX_R_DROP_NAT_TUPLE_TAKEN;
	if (r != LBX_R_OK)
		return r;
	if (!fresh) {
		lbx_nat.update((struct flow_key *)&pkt->flow, fwd);
		return LBX_R_OK;
	}
	if (nf->held)
		lbx_nat.delete((struct flow_key *)&pkt->flow);
	hs_put(&pkt->flow, fwd, &s->rk);
	return LBX_R_OK;
}

/*
 * The client's first packet after the SYN-ACK of a handshake in lbx_nat_new (ESTABLISHED there,
 * a packet without SYN), or a UDP flow's second datagram from its client: the connection is
 * assured, and its two entries move to lbx_nat with their state's timeout there (TCP:
 * tcp_established), the reply entry first (a reply in between finds one copy or the other).
 * Called after the packet was translated by e, which the move frees. If lbx_nat refuses an
 * entry (memory; an LRU makes room), both stay where they are, with that timeout. A reply
 * translated on another CPU during the move may refresh the old copy (its `seen`): the new
 * copies were taken just before, so at most that refresh is lost.
 */
static __always_inline void nat_assure(const struct pkt *pkt, struct nat_entry *e, struct flow_key *k,
				       const struct hs_at *at)
{
	__u32 zero = 0;
	struct nat_cfg *cfg = lbx_nat_cfg.lookup(&zero);
	struct nat_entry *peer;

	struct nat_new_bucket *b;
	__u32 h;
	int w;

	nat_peer_key(e, k);
	w = hs_locate(k, 1, &b, &h);
	if (w < 0)
		return;
	peer = &hs_slot(b, w)->e;
	e->timeout = peer->timeout = nat_timeout(cfg, e->state, 0);   /* copied with them */
	if (lbx_nat.update(k, peer) != 0)
		return;
	if (lbx_nat.update((struct flow_key *)&pkt->flow, e) != 0) {
		lbx_nat.delete(k);
		return;
	}
	hs_empty(b, w);
	hs_empty_at(at);   /* e's own slot, where nat_lookup() found it */
}

/* Write *p = v and return what the change adds to a sum that covers p (csum.h's convention). */
static __always_inline __u64 nat_put32(__be32 *p, __be32 v)
{
	__u64 d = (__u32)~*p + (__u64)v;

	*p = v;
	return d;
}

static __always_inline __u64 nat_put16(__be16 *p, __be16 v)
{
	__u64 d = (__u16)~*p + (__u64)v;

	*p = v;
	return d;
}

static __always_inline __u64 nat_put_addr(__be32 *p, const struct lbx_addr *a, int v6)
{
	__u64 d = nat_put32(&p[0], a->w[0]);

	if (v6) {
		d += nat_put32(&p[1], a->w[1]);
		d += nat_put32(&p[2], a->w[2]);
		d += nat_put32(&p[3], a->w[3]);
	}
	return d;
}

/* A TCP or UDP checksum after its pseudo-header and ports changed by d. */
static __always_inline void nat_l4_csum(__be16 *check, __u8 proto, int v6, __u64 d)
{
	__u16 c;

	if (proto == IPPROTO_UDP && !v6 && !*check)
		return;
	c = lbx_csum_fold((__u16)~*check + d);
	*check = (proto == IPPROTO_UDP && !c) ? 0xffff : c;
}

/* The ports and the L4 checksum after the addresses changed by d (the pseudo-header's share).
 * The checksum: TCP's at byte 16, UDP's at byte 6 (parse.h checked the whole header). */
static __always_inline int nat_rewrite_l4(__be16 *ports, void *end, const struct pkt *pkt, const struct nat_entry *e,
					  int v6, __u64 d)
{
	__be16 *check = pkt->flow.proto == IPPROTO_TCP ? ports + 8 : ports + 3;

	if ((void *)(ports + 2) > end || (void *)(check + 1) > end)
		return LBX_R_ABORT_REWRITE;
	d += nat_put16(&ports[0], e->sport) + nat_put16(&ports[1], e->dport);
	nat_l4_csum(check, pkt->flow.proto, v6, d);
	return LBX_R_OK;
}

/* A TCP/UDP packet: addresses and ports from e, IPv4 header and L4 checksums. One function per
 * family: the verifier must see each header's own bounds check before its writes. */
static __always_inline int nat_rewrite4(void *data, void *end, __u16 off, const struct pkt *pkt,
					const struct nat_entry *e)
{
	struct iphdr *ip = data + off;
	__u64 d;

	if ((void *)(ip + 1) > end)
		return LBX_R_ABORT_REWRITE;
	d = nat_put32(&ip->saddr, e->saddr.w[0]) + nat_put32(&ip->daddr, e->daddr.w[0]);
	ip->check = lbx_csum_fold((__u16)~ip->check + d);
	return nat_rewrite_l4((void *)(ip + 1), end, pkt, e, 0, d);
}

static __always_inline int nat_rewrite6(void *data, void *end, __u16 off, const struct pkt *pkt,
					const struct nat_entry *e)
{
	struct ipv6hdr *ip6 = data + off;
	__u64 d;

	if ((void *)(ip6 + 1) > end)
		return LBX_R_ABORT_REWRITE;
	d = nat_put_addr(ip6->saddr.in6_u.u6_addr32, &e->saddr, 1) +
	    nat_put_addr(ip6->daddr.in6_u.u6_addr32, &e->daddr, 1);
	return nat_rewrite_l4((void *)(ip6 + 1), end, pkt, e, 1, d);
}

static __always_inline int nat_rewrite(struct xdp_md *ctx, const struct pkt *pkt, const struct nat_entry *e)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u16 off = pkt->l3_off;

	/* l3_off is 14 or 18 (parse_eth): bound it so the verifier sees a constant range. */
	if (off > 18)
		return LBX_R_ABORT_REWRITE;
	if (pkt->flow.family == LBX_FAMILY_V6)
		return nat_rewrite6(data, end, off, pkt, e);
	return nat_rewrite4(data, end, off, pkt, e);
}

/*
 * An ICMP error about a NAT connection, its flow key the quoted tuple reversed (parse.h), e the
 * entry of that key's direction: the outer destination becomes e's destination, and the quote
 * (the packet as the other side sent or got it) becomes the packet as this side knows it:
 * quoted source e's destination, quoted destination e's source. Checksums: the outer IPv4
 * header, the quoted IPv4 header, the quoted UDP checksum and a quoted TCP checksum that the
 * quote holds, and the ICMP checksum over all of them (ICMPv6's covers the outer addresses too).
 */
static __always_inline int nat_icmp_quote_l4(__be16 *qports, void *end, const struct pkt *pkt,
					     const struct nat_entry *e, int v6, __u64 dq, __u64 di, __be16 *icheck)
{
	__be16 *qcheck = pkt->flow.proto == IPPROTO_UDP ? qports + 3 : qports + 8;
	__u64 dp;

	if ((void *)(qports + 4) > end || (void *)(icheck + 1) > end)
		return LBX_R_ABORT_REWRITE;
	dp = nat_put16(&qports[0], e->dport) + nat_put16(&qports[1], e->sport);
	di += dp;
	/* The quoted L4 checksum: UDP's is in the 8 bytes every quote has; TCP's only in a longer
	 * quote (the ICMP payload must hold it, not just the frame). */
	if ((void *)(qcheck + 1) <= end &&
	    pkt->l4_len >= LBX_ICMP_QUOTE_HDR + (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
			   (pkt->flow.proto == IPPROTO_UDP ? 8 : 18)) {
		__be16 old = *qcheck;

		nat_l4_csum(qcheck, pkt->flow.proto, v6, dq + dp);
		di += (__u16)~old + (__u64)*qcheck;
	}
	*icheck = lbx_csum_fold((__u16)~*icheck + di);
	return LBX_R_OK;
}

static __always_inline int nat_rewrite_icmp4(void *data, void *end, __u16 off, const struct pkt *pkt,
					     const struct nat_entry *e)
{
	struct iphdr *ip = data + off;
	struct icmphdr *icmp = (void *)(ip + 1);
	struct iphdr *q = (void *)(icmp + 1);
	__u64 dq, di;

	if ((void *)(q + 1) > end)
		return LBX_R_ABORT_REWRITE;
	ip->check = lbx_csum_fold((__u16)~ip->check + nat_put32(&ip->daddr, e->daddr.w[0]));
	dq = nat_put32(&q->saddr, e->daddr.w[0]) + nat_put32(&q->daddr, e->saddr.w[0]);
	di = dq + nat_put16(&q->check, lbx_csum_fold((__u16)~q->check + dq));
	return nat_icmp_quote_l4((void *)(q + 1), end, pkt, e, 0, dq, di, &icmp->checksum);
}

static __always_inline int nat_rewrite_icmp6(void *data, void *end, __u16 off, const struct pkt *pkt,
					     const struct nat_entry *e)
{
	struct ipv6hdr *ip6 = data + off;
	struct icmp6hdr *icmp = (void *)(ip6 + 1);
	struct ipv6hdr *q = (void *)(icmp + 1);
	__u64 dq, di;

	if ((void *)(q + 1) > end)
		return LBX_R_ABORT_REWRITE;
	di = nat_put_addr(ip6->daddr.in6_u.u6_addr32, &e->daddr, 1);  /* ICMPv6's pseudo-header */
	dq = nat_put_addr(q->saddr.in6_u.u6_addr32, &e->daddr, 1) +
	     nat_put_addr(q->daddr.in6_u.u6_addr32, &e->saddr, 1);
	return nat_icmp_quote_l4((void *)(q + 1), end, pkt, e, 1, dq, di + dq, &icmp->icmp6_cksum);
}

static __always_inline int nat_rewrite_icmp(struct xdp_md *ctx, const struct pkt *pkt, const struct nat_entry *e)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u16 off = pkt->l3_off;

	if (off > 18)
		return LBX_R_ABORT_REWRITE;
	if (pkt->flow.family == LBX_FAMILY_V6)
		return nat_rewrite_icmp6(data, end, off, pkt, e);
	return nat_rewrite_icmp4(data, end, off, pkt, e);
}

/* Ethernet: from us (the frame came to our MAC: the guards made sure) to the next hop. */
static __always_inline int nat_l2(struct xdp_md *ctx, const __u8 *next_hop)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return LBX_R_ABORT_REWRITE;
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, next_hop, ETH_ALEN);
	return LBX_R_OK;
}

/* Translate a frame by its direction's entry e (TCP/UDP or an ICMP error) and send it to next_hop. */
static __always_inline int nat_translate(struct xdp_md *ctx, const struct pkt *pkt, const struct nat_entry *e,
					 const __u8 *next_hop)
{
	int r = (pkt->flags & LBX_PKT_F_ICMP_ERR) ? nat_rewrite_icmp(ctx, pkt, e) : nat_rewrite(ctx, pkt, e);

	return r == LBX_R_OK ? nat_l2(ctx, next_hop) : r;
}

/*
 * forward() for LBX_MODE_NAT: a new connection's entries are opened here (after the VIP's table
 * chose sel->be), a known one's state is followed; then the frame is translated and sent to the
 * backend's next hop (the backend entry's MAC: the backend, or its route's gateway).
 */
static __always_inline int forward_nat(struct xdp_md *ctx, const struct pkt *pkt, const struct selection *sel,
				       struct nat_flow *nf)
{
	__u32 zero = 0;
	struct nat_scratch *s;
	int r;

	if (!nf->e) {
		s = lbx_nat_scratch.lookup(&zero);
		if (!s)
			return LBX_R_ABORT_REWRITE;
		r = nat_open(ctx, pkt, sel, s, nf);
		if (r != LBX_R_OK)
			return r;
		return nat_translate(ctx, pkt, &s->fwd, sel->be->mac);
	}
	if (!(pkt->flags & LBX_PKT_F_ICMP_ERR))
		nat_track(ctx, pkt, nf->e, nf->now, nf->fresh, 0);
	r = nat_translate(ctx, pkt, nf->e, sel->be->mac);
	if (r == LBX_R_OK && nf->fresh && !(pkt->flags & (LBX_PKT_F_ICMP_ERR | LBX_PKT_F_SYN)) &&
	    (nf->e->state == LBX_NAT_ESTABLISHED || nf->e->state == LBX_NAT_UDP)) {
		s = lbx_nat_scratch.lookup(&zero);
		if (s)
			nat_assure(pkt, nf->e, &s->k, &nf->at);
	}
	return r;
}

#endif /* LBX_NAT_H */
