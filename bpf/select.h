/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Selection: which backend gets this packet. established() finds a known flow's backend in the
 * connection table; select_backend() gives a new flow (or one whose backend entry is gone) a
 * slot of its VIP's table, by its scheduler (round robin or a hash of its 5-tuple), and records it
 * once its handshake completes (the gate above select_backend()).
 * An ICMP error about a flow (pkt.flags LBX_PKT_F_ICMP_ERR, icmp.h) is looked up the same way but
 * never recorded.
 */
#ifndef LBX_SELECT_H
#define LBX_SELECT_H

#include "maps.h"
#include "parse.h"
#include "clock.h"

struct selection {
	struct backend *be;
	__u32 backend_id;
	__u32 vip_id;
	__u8 new_flow;
	__u8 unlooked;    /* a flood SYN that skipped the connection table (established()) */
	__u8 hashed;      /* hash holds flow_hash() of the packet's flow (ho_bucket()) */
	__u32 hash;
};

/* Final mixer of MurmurHash3 (public domain): every input bit flips about half the output. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/*
 * The ports are mixed before the source address joins them: XORed in raw, the source port's two
 * bytes cancel against the address's last two, and a /24 of clients on 256 ports hashed to only
 * 256 values (tests/datapath/test_flows.py::test_hash_spreads_a_nat_pool_over_every_backend).
 */
static __always_inline __u32 flow_hash(const struct flow_key *f)
{
	__u32 h = mix32(((__u32)f->sport << 16 | f->dport) ^ ((__u32)f->proto << 8));

#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ f->src.w[i]) + f->dst.w[i];
	return mix32(h);
}

/* Per-CPU position: no atomics on the hot path; CPUs interleave, shares stay even. */
static __always_inline __u32 next_rr_slot(const struct vip_meta *vip)
{
	__u32 *pos = lbx_rr.lookup((__u32 *)&vip->id);
	__u32 slot;

	if (!pos)
		return 0;
	/* The table may have shrunk since this CPU's last turn: wrap without a division. */
	slot = *pos < vip->table_size ? *pos : 0;
	*pos = slot + 1;
	return slot;
}

/*
 * The backend id in a slot of a VIP's table (abi.h: four 16-bit ids per 8-byte value), 0 when
 * there is none. An inner map's lookup is a call, not inlined (BPF_F_INNER_MAP: every table
 * has its own size): only new flows pay it.
 */
static __always_inline __u32 table_slot(void *table, __u32 slot)
{
	__u32 word = slot / LBX_TABLE_SLOTS_PER_WORD;
	__u64 *w = bpf_map_lookup_elem(table, &word);

	return w ? (__u32)(*w >> (slot % LBX_TABLE_SLOTS_PER_WORD * 16)) & 0xffff : 0;
}

/*
 * The slot of the VIP's table a new flow takes, by its scheduler: LBX_R_OK with *slot set, or
 * LBX_R_DROP_UNKNOWN_SCHED for a scheduler this program does not know (never a guess).
 */
static __always_inline int pick_slot(const struct vip_meta *vip, const struct pkt *pkt, __u32 *slot)
{
	switch (vip->sched) {
	case LBX_SCHED_RR:
		*slot = next_rr_slot(vip);
		return LBX_R_OK;
	case LBX_SCHED_HASH:
	case LBX_SCHED_MAGLEV:
		*slot = flow_hash(&pkt->flow) % vip->table_size;
		return LBX_R_OK;
	}
	return LBX_R_DROP_UNKNOWN_SCHED;
}

static __always_inline struct backend *backend_by_id(__u32 id)
{
	struct backend *be = lbx_backends.lookup(&id);

	return be && (be->flags & LBX_BE_F_ACTIVE) ? be : NULL;
}

/* source, leastconn, connection caps (issue 13) */
#include "sched.h"

/*
 * Katran's "is under flood", per CPU (no atomics): this CPU's new flows counted in one-second
 * windows against lbx_ctl.flood_threshold, two counts: records (and refused ones), which gate
 * bare ACKs, and pure SYNs, which only decide whether a SYN skips the connection table. Kept
 * apart so that a SYN flood (or a legitimate burst of handshakes) does not stop the records of
 * completed handshakes. The clock: tick_ns() (clock.h), inlined.
 */
static __always_inline struct lbx_flood *new_flow_window(int syn)
{
	__u32 zero = 0;
	struct lbx_flood *f = lbx_flood.lookup(&zero);
	__u64 now;

	if (!f)
		return NULL;
	now = tick_ns();
	if (now - f->window > 1000000000ULL) {
		f->window = now;
		f->inserts = 0;
		f->syns = 0;
	}
	if (syn)
		f->syns++;
	else
		f->inserts++;
	return f;
}

static __always_inline int flooded(const struct lbx_flood *f, int syn)
{
	__u32 zero = 0;
	struct lbx_ctl *ctl = lbx_ctl.lookup(&zero);

	if (!f)
		return 0;
	return (syn ? f->syns : f->inserts) > (ctl && ctl->flood_threshold ? ctl->flood_threshold : LBX_FLOOD_THRESHOLD);
}

/*
 * A known flow whose backend entry is still the one it started on. A match proves the VIP still
 * has that backend: deleting a VIP or removing a backend deactivates the entry, and giving the id
 * to another backend (of any VIP, even one that reused the VIP id) bumps its generation. So an
 * established flow needs no VIP lookup; anything else goes on to classify().
 */
static __always_inline int established(struct pkt *pkt, struct selection *sel)
{
	struct flow_val *known;
	struct backend *be;

#ifndef LBX_NO_HANDSHAKE_GATE
	/*
	 * Under a new-flow flood a pure SYN skips the lookup (a miss in a large table is a cache
	 * miss: ~140 ns of the flood SYN's cost, docs/benchmarks.md). The gate never records a SYN,
	 * so a recorded tuple seeing one is a spoofed or stray SYN, which needs no recorded backend,
	 * or a client reusing the tuple (after TIME_WAIT): select_backend() then deletes the stale
	 * record where the SYN's choice goes into the half-open table, and on a settled VIP the
	 * table's choice is the recorded one unless the table changed since (the README's
	 * residual). Not under flood, the SYN follows the recorded flow as before, unless it is a
	 * counted flow its client closed (below). A retransmitted SYN cannot follow its own
	 * handshake's ACK; an ICMP error never skips.
	 */
	if ((pkt->flags & (LBX_PKT_F_SYN | LBX_PKT_F_ICMP_ERR)) == LBX_PKT_F_SYN &&
	    flooded(new_flow_window(1), 1)) {
		sel->unlooked = 1;
		return 0;
	}
#endif
	known = lbx_flows.lookup(&pkt->flow);
	if (!known)
		return 0;
	be = backend_by_id(known->backend_id);
	if (!be || be->gen != known->gen || be->mode == LBX_MODE_NAT)   /* NAT: forward.h */
		return 0;
	/*
	 * A SYN on a counted flow its client has closed (sched.h): the tuple reused after TIME_WAIT,
	 * a new connection. Following the old record would take it to the old backend past that
	 * backend's cap and uncounted; it gets the scheduler's choice, and its ACK must not meet
	 * the old record.
	 */
	if ((pkt->flags & LBX_PKT_F_SYN) && (known->pad & LBX_FLOW_F_CLOSED)) {
		lbx_flows.delete(&pkt->flow);
		return 0;
	}
	if (pkt->flags & LBX_PKT_F_FIN)        /* sched.h: the client closes a counted flow */
		sched_closed(known);
	sel->be = be;
	sel->backend_id = known->backend_id;
	sel->vip_id = be->vip_id;
	return 1;
}

/* The flow's backend by the VIP's table and scheduler alone; nothing is recorded. */
static __always_inline int table_choice(const struct vip_meta *vip, struct pkt *pkt,
					struct selection *sel)
{
	__u32 slot, id;
	void *table;
	int r;

	if (vip->table_size == 0)
		return vip->flags & LBX_VIP_F_PASS_NO_BACKEND ? LBX_R_PASS_NO_BACKEND : LBX_R_DROP_NO_BACKEND;
	table = lbx_tables.lookup((int *)&vip->id);
	if (!table)
		return LBX_R_DROP_NO_BACKEND;
	/* An ICMP error (icmp.h) must reach the flow's backend: round robin cannot say which. */
	if ((pkt->flags & LBX_PKT_F_ICMP_ERR) && vip->sched == LBX_SCHED_RR)
		return LBX_R_PASS_ICMP_NO_FLOW;
	if (vip->sched > LBX_SCHED_MAGLEV || (vip->flags & LBX_VIP_F_CAPS))
		return sched_choice(vip, pkt, table, sel);   /* sched.h */
	r = pick_slot(vip, pkt, &slot);
	if (r != LBX_R_OK)
		return r;
	id = table_slot(table, slot);
	sel->be = backend_by_id(id);   /* id 0 is never a backend's */
	if (!sel->be)
		return LBX_R_DROP_BACKEND_GONE;
	sel->backend_id = id;
	sel->vip_id = vip->id;
	return LBX_R_OK;
}

/*
 * The gate's clock, in LBX_TIME_SHIFT units (abi.h): the coarse clock is the same CLOCK_MONOTONIC
 * at tick resolution and costs ~5 ns where bpf_ktime_get_ns() costs ~80 in this VM (limit.h).
 */
static __always_inline __u32 now_units(void)
{
	return bpf_ktime_get_coarse_ns() >> LBX_TIME_SHIFT;
}

/*
 * How long after its table last changed a hash or Maglev VIP may still have half-open entries
 * waiting: they are written only within LBX_SETTLE_UNITS of a change, and a handshake's ACK comes
 * within the backend's SYN-ACK retries (~63 s on Linux's defaults, tcp_synack_retries = 5).
 * Past it the client's packets skip the half-open lookup (the recorded new flow's cost).
 */
#define LBX_HALF_OPEN_UNITS 64

/*
 * Whether the table gives this flow's next packet the backend it gives this one: a hash or Maglev
 * VIP whose table has not changed for LBX_SETTLE_UNITS (abi.h). changed_at 0 (a VIP's first
 * table, which no earlier packet of any flow can have used) skips the clock. *ho: whether the
 * VIP may have half-open entries (round robin always; else see LBX_HALF_OPEN_UNITS).
 */
static __always_inline int reproducible(const struct vip_meta *vip, int *ho)
{
	__u32 age;

	*ho = 1;
	if (!sched_repeats(vip))        /* sched.h: round robin, leastconn, caps */
		return 0;
	*ho = 0;
	if (!vip->changed_at)
		return 1;
	age = now_units() - vip->changed_at;
	*ho = age <= LBX_HALF_OPEN_UNITS;
	return age > LBX_SETTLE_UNITS;
}

/*
 * How long a half-open entry is followed, in now_units() from the SYN that wrote it (its pad
 * holds the low 16 bits of that time): a SYN follows it for LBX_HALF_OPEN_SYN_UNITS (a client's
 * retransmissions at 1, 3, 7, 15 and 31 s), any other packet for LBX_HALF_OPEN_UNITS (the ACK
 * after the backend's SYN-ACK retries). A tuple is reused after its old connection's TIME_WAIT
 * (60 s on Linux) at the earliest, so the old handshake's entry, which nothing deletes on a VIP
 * without passive health, is then older than both and the new SYN gets the scheduler's choice
 * again (a capped or leastconn VIP must not send it to the old one's backend, full or not).
 */
#define LBX_HALF_OPEN_SYN_UNITS 32

/*
 * The half-open table (maps.h) is a set-associative cache: the flow's hash picks a bucket of
 * LBX_HALF_OPEN_WAYS slots. Slots are written without locks by any CPU; a slot's check binds its
 * key to its value (abi.h struct half_open_slot), so a torn slot reads as a miss. A false accept
 * would need a torn read and two tuples of one bucket with the same 32-bit hash.
 */
static __always_inline struct half_open_bucket *ho_bucket(const struct flow_key *f, struct selection *sel,
						      __u32 *h)
{
	__u32 idx;

	if (!sel->hashed) {      /* a SYN's lookup and insert hash once */
		sel->hash = flow_hash(f);
		sel->hashed = 1;
	}
	*h = sel->hash;
	idx = *h & (LBX_HALF_OPEN_CAPACITY / LBX_HALF_OPEN_WAYS - 1);
	return lbx_half_open.lookup(&idx);
}

/* A slot's check: the flow's hash and its value mixed; never 0, which marks an empty slot. */
static __always_inline __u32 ho_check(__u32 h, const struct flow_val *v)
{
	return mix32(h ^ mix32(v->backend_id ^ ((__u32)v->gen << 16 | v->pad))) | 1;
}

static __always_inline int same_flow(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;
	__u64 d = 0;

#pragma unroll
	for (int i = 0; i < sizeof(*a) / 8; i++)
		d |= x[i] ^ y[i];
	return d == 0;
}

/*
 * The slot holding f (its value in *v), or NULL. The value and check are copied before the
 * barrier, so that the compiler cannot load them again after the check was verified.
 */
static __always_inline struct half_open_slot *ho_find(struct half_open_bucket *b, const struct flow_key *f,
						      __u32 h, struct flow_val *v)
{
#pragma unroll
	for (int i = 0; i < LBX_HALF_OPEN_WAYS; i++) {
		struct half_open_slot *s = &b->way[i];
		__u32 check = s->check;

		*v = s->val;
		asm volatile("" ::: "memory");
		if (check && same_flow(&s->key, f) && check == ho_check(h, v))
			return s;
	}
	return NULL;
}

/*
 * Where a new half-open entry goes: the slot already holding its flow (a retried SYN), else an
 * empty or expired one, else the oldest; ties go to the first from a hash-given start, so that
 * a burst's collisions push out a random entry, not always the newest.
 */
static __always_inline struct half_open_slot *ho_victim(struct half_open_bucket *b, const struct flow_key *f,
							__u32 h, __u16 now)
{
	__u32 start = h >> 30, best = 0, score;
	struct half_open_slot *s, *out = &b->way[0];

#pragma unroll
	for (int i = 0; i < LBX_HALF_OPEN_WAYS; i++) {
		s = &b->way[(start + i) & (LBX_HALF_OPEN_WAYS - 1)];
		score = (__u16)(now - s->val.pad);
		if (!s->check || score > LBX_HALF_OPEN_UNITS)
			score = 0x10000;
		if (same_flow(&s->key, f))
			score = 0x20000;
		if (score > best || i == 0) {
			best = score;
			out = s;
		}
	}
	return out;
}

/* A half-open entry, young enough, whose backend entry still is the one the opening packet got. */
static __always_inline int half_open(struct pkt *pkt, struct selection *sel)
{
	struct half_open_bucket *b;
	struct flow_val seen;
	struct backend *be;
	__u32 h;
	__u16 age;

	b = ho_bucket(&pkt->flow, sel, &h);
	if (!b || !ho_find(b, &pkt->flow, h, &seen))
		return 0;
	age = (__u16)now_units() - seen.pad;
	if (age > (pkt->flags & LBX_PKT_F_SYN ? LBX_HALF_OPEN_SYN_UNITS : LBX_HALF_OPEN_UNITS))
		return 0;
	be = backend_by_id(seen.backend_id);
	if (!be || be->gen != seen.gen)
		return 0;
	/* A SYN (a handshake the client retries, or a reused tuple) follows its entry only while
	 * the backend is still in its VIP's table: one that went down or out since gets the table's
	 * choice again. The handshake's ACK always follows it (that backend holds the SYN). */
	if ((pkt->flags & LBX_PKT_F_SYN) && !(be->flags & LBX_BE_F_IN_TABLE))
		return 0;
	sel->be = be;
	sel->backend_id = seen.backend_id;
	sel->vip_id = be->vip_id;
	return 1;
}

/*
 * Whether to record this flow: always unless optional (a packet that proves no handshake), then
 * only while this CPU is not under a new-flow flood; a refused record is counted.
 */
static __always_inline int may_record(int optional)
{
	struct lbx_flood *f = new_flow_window(0);

	if (!optional || !flooded(f, 0))
		return 1;
	if (f)
		f->skipped++;
	return 0;
}

static __always_inline void record(struct pkt *pkt, const struct selection *sel)
{
	struct flow_val v = { .backend_id = sel->backend_id, .gen = sel->be->gen };

	sched_opened(pkt, sel, &v);     /* sched.h: counted backends' open connections */
	lbx_flows.update(&pkt->flow, &v);
}

/* Written check last (x86 keeps stores in order; the barriers keep the compiler's). */
static __always_inline void record_half_open(struct pkt *pkt, struct selection *sel)
{
	struct flow_val v = { .backend_id = sel->backend_id, .gen = sel->be->gen,
			      .pad = (__u16)now_units() };     /* its age: half_open() */
	__u32 zero = 0, h;
	struct lbx_flood *f = lbx_flood.lookup(&zero);
	struct half_open_bucket *b;
	struct half_open_slot *s;

	if (f)
		f->half_open++;
	b = ho_bucket(&pkt->flow, sel, &h);
	if (!b)
		return;
	s = ho_victim(b, &pkt->flow, h, v.pad);
	s->check = 0;
	asm volatile("" ::: "memory");
	s->key = pkt->flow;
	s->val = v;
	asm volatile("" ::: "memory");
	s->check = ho_check(h, &v);
}

/* Forget pkt's half-open entry (its slot emptied). */
static __always_inline void ho_forget(struct pkt *pkt, struct selection *sel)
{
	struct half_open_bucket *b;
	struct half_open_slot *s;
	struct flow_val v;
	__u32 h;

	b = ho_bucket(&pkt->flow, sel, &h);
	if (b && (s = ho_find(b, &pkt->flow, h, &v)))
		s->check = 0;
}

/*
 * Passive health of a DSR/ipip/gue VIP (LBX_VIP_F_PASSIVE, issue 13): the balancer sees only the
 * client's side of a handshake. A SYN meeting its own half-open entry is the client retransmitting
 * (no SYN-ACK reached it within its RTO: the backend's failure, counted in syn_retx and in a row in
 * consecutive); the first other packet of a half-open flow is the handshake's final ACK (a success:
 * synack, consecutive back to 0), and its half-open entry goes, so that the tuple's reuse after
 * TIME_WAIT is a new SYN, not a retransmission. The counts are lbx_nat_be's (abi.h), read by the
 * daemon's PassiveHealthService like NAT's. Only VIPs with the flag pay anything.
 */
static __always_inline void passive_handshake(struct pkt *pkt, struct selection *sel)
{
	__u32 id = sel->backend_id;
	struct nat_backend *b = lbx_nat_be.lookup(&id);

	if (!b)
		return;
	if (pkt->flags & LBX_PKT_F_SYN) {
		__sync_fetch_and_add(&b->consecutive, 1);
		__sync_fetch_and_add(&b->syn_retx, 1);
		b->last_failure = tick_ns() >> LBX_NAT_TIME_SHIFT;
		return;
	}
	if (pkt->flags & LBX_PKT_F_FIN)       /* the client gave up (RST) or closed: no verdict */
		return;
	b->consecutive = 0;
	b->pending = 0;
	b->pending_since = 0;
	__sync_fetch_and_add(&b->synack, 1);
	ho_forget(pkt, sel);
}

/*
 * A passive-health VIP's new handshake (a first SYN, gone half-open): pending counts them since
 * the last handshake's ACK and pending_since is the first one's time, so that the daemon sees
 * handshakes still unfinished past the VIP's timeout long before the client's retransmission
 * (its 1 s RTO). The coarse clock is CLOCK_MONOTONIC at tick resolution, the control plane's.
 * Racy across CPUs by design (a SYN and an ACK at once may leave a stale time): it only brings
 * an active check forward, never an ejection.
 */
static __always_inline void passive_syn(const struct selection *sel)
{
	__u32 id = sel->backend_id;
	struct nat_backend *b = lbx_nat_be.lookup(&id);

	if (!b)
		return;
	if (!b->pending)
		b->pending_since = bpf_ktime_get_coarse_ns();
	__sync_fetch_and_add(&b->pending, 1);
	__sync_fetch_and_add(&b->syn_sent, 1);
}

/*
 * A flow the connection table does not know. The handshake gate: a SYN is never recorded; it
 * is forwarded by the table alone where the table will repeat the choice, else its choice goes
 * into the half-open table. The client's next packet records the flow: from its half-open
 * entry always, by the table only while this CPU is not flooded with new flows (a bare ACK
 * proves no handshake). UDP: a datagram with no half-open entry opens the flow like a SYN on a
 * VIP that cannot repeat the choice, and is a bare ACK on one that can. An ICMP error is never
 * recorded. Built with -DLBX_NO_HANDSHAKE_GATE every first packet is recorded (the flood test's
 * proof that it can fail).
 */
static __always_inline int select_backend(const struct vip_meta *vip, struct pkt *pkt,
					  struct selection *sel)
{
	int r, again, ho, passive;

	/* An error about a flow still in its handshake follows its half-open entry. */
	if (pkt->flags & LBX_PKT_F_ICMP_ERR)
		return half_open(pkt, sel) ? LBX_R_OK : table_choice(vip, pkt, sel);
#ifdef LBX_NO_HANDSHAKE_GATE
	r = table_choice(vip, pkt, sel);
	if (r == LBX_R_OK) {
		sel->new_flow = 1;
		record(pkt, sel);
	}
	return r;
#endif
	again = reproducible(vip, &ho);
	passive = (vip->flags & LBX_VIP_F_PASSIVE) && pkt->flow.proto == IPPROTO_TCP;
	if (passive) {          /* every SYN goes half-open, so its retransmission is seen */
		again = 0;
		ho = 1;
	}
	if ((pkt->flags & LBX_PKT_F_SYN) && again) {
		sel->new_flow = 1;
		return table_choice(vip, pkt, sel);
	}
	if (ho && half_open(pkt, sel)) {
		if (!(pkt->flags & LBX_PKT_F_SYN) && may_record(0))
			record(pkt, sel);
		if (passive)
			passive_handshake(pkt, sel);
		return LBX_R_OK;
	}
	r = table_choice(vip, pkt, sel);
	if (r != LBX_R_OK)
		return r;
	if ((pkt->flags & LBX_PKT_F_SYN) || (pkt->flow.proto == IPPROTO_UDP && !again)) {
		sel->new_flow = 1;
		if (sel->unlooked)     /* a reused tuple's ACK must not meet its old record */
			lbx_flows.delete(&pkt->flow);
		record_half_open(pkt, sel);
		if (passive && (pkt->flags & LBX_PKT_F_SYN))
			passive_syn(sel);
		return LBX_R_OK;
	}
	if (may_record(1)) {
		sel->new_flow = 1;
		record(pkt, sel);
	}
	return LBX_R_OK;
}

#endif /* LBX_SELECT_H */
