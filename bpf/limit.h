/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Per-source limit of new flows (issue 11): a token bucket per (source, scope) in its GCRA form,
 * one u64 per source: the theoretical arrival time (TAT) of its next flow. A flow is admitted
 * when TAT - now <= burst_ns ((burst - 1) tokens' worth of time), and then TAT = max(TAT, now) +
 * interval_ns. So a fresh source gets `burst` flows at once, then `rate` per second; no
 * division and no refill loop on the hot path (the control plane turns rate and burst into
 * nanoseconds). An IPv6 source is keyed by its /64: one host can hold a whole /64.
 *
 * Buckets in per-CPU set-associative arrays (maps.h: lbx_src_limit4 for IPv4 sources, one
 * 64-byte set of LBX_SRC_LIMIT_WAYS per index; lbx_src_limit for IPv6 /64s): the source's set is
 * one inlined array read (src_set_index: a multiply), its ways are compared in registers. A
 * source without a way takes the way with the smallest TAT: a TAT at or before now is a full
 * bucket, so dropping it loses nothing; only when every way of the set is in debt is the least
 * indebted one forgotten (that source then starts again with a full bucket: an eviction can
 * only admit more, never refuse a source). The LRU per-CPU hashes this replaced cost a call
 * (jhash, the bucket walk, the LRU list) of ~20-40 ns per new flow (docs/benchmarks.md, issue 11).
 * A CPU reads and writes only its own TATs, so there is no atomic and no lock on the hot path.
 * The cost is that a source whose flows are spread over N CPUs (RSS hashes each 5-tuple, so one client's flows usually
 * are) has N buckets: its effective limit lies between rate (all its flows on one queue) and N x rate, and
 * its burst between burst and N x burst. The control plane does NOT divide by the CPU count:
 * a source whose flows all land on one queue would then get rate / N. The configured rate is
 * thus a per-CPU rate, documented as such (README: new_flow_limit); size it as
 * wanted-rate / receive-queues when every client spreads evenly.
 *
 * The clock is tick_ns() (clock.h), the tick-resolution monotonic clock from jiffies, inlined by
 * the verifier: bpf_ktime_get_ns() (a TSC read) cost ~80 ns per new flow in this VM and the call
 * bpf_ktime_get_coarse_ns() ~10-15 (docs/benchmarks.md, admission rows). A coarse `now`
 * advances a tick at a time (4 ms at HZ=250), so a bucket meets a tick's
 * worth of tokens at once; were the burst smaller than that, the excess would be lost and the
 * source would get less than its rate (rate 2000/s, burst 1: one flow per tick, 250/s). Hence
 * LBX_LIMIT_SLACK_NS, one tick at HZ >= 100, added to the burst: the long-run rate is exact,
 * the burst is `burst` plus up to rate x 10 ms (README: new_flow_limit).
 *
 * Charged: what opens a flow and is not established: a TCP SYN without ACK (parse.h's
 * LBX_PKT_F_SYN, so no second read of the frame), and every UDP datagram of a flow until it is
 * recorded (the handshake gate records a UDP flow at its second datagram: select.h). A TCP
 * connection pays once, for its SYN (a retransmitted SYN pays again); its handshake-completing
 * ACK (which may reach here while the flow is not recorded yet, issue 11's handshake gating) and
 * any other segment of an unknown flow (ACK, RST, FIN) are free: floods of those are the flood
 * threshold's job (select.h), and they never record a flow without it.
 */
#ifndef LBX_LIMIT_H
#define LBX_LIMIT_H

#include "maps.h"
#include "parse.h"
#include "clock.h"

#define LBX_LIMIT_SLACK_NS 10000000ULL   /* one tick of the coarse clock, HZ >= 100 */

/* Does this packet take a token: a TCP SYN without ACK, or anything else (UDP) not established. */
static __always_inline int charged(const struct pkt *pkt)
{
	return pkt->flow.proto != IPPROTO_TCP || (pkt->flags & LBX_PKT_F_SYN);
}

/* src_set_index(x): the set of a source's identity word x (abi.h; lbxdp.maps.src_limit_set). */
static __always_inline __u32 src_set_index(__u32 x)
{
	return ((__u64)(__u32)(x * LBX_VIP_FILTER_MUL) * LBX_SRC_LIMIT_SETS) >> 32;
}

/* The GCRA step on a source's bucket: 1 if it has no token left, else 0 (and a token is taken). */
static __always_inline int gcra(__u64 *tat, const struct lbx_admit *adm, __u64 now)
{
	__u64 t = *tat > now ? *tat : now;

	if (t - now > adm->burst_ns + LBX_LIMIT_SLACK_NS)
		return 1;
	*tat = t + adm->interval_ns;
	return 0;
}

/* The way of the set whose TAT is smallest (empty ways have 0): the one a new source takes. */
#define LBX_SRC_VICTIM(s, victim)                                                      \
	do {                                                                           \
		__u64 least = (s)->way[0].tat;                                         \
		victim = 0;                                                            \
		_Pragma("unroll") for (int i = 1; i < LBX_SRC_LIMIT_WAYS; i++) {       \
			if ((s)->way[i].tat < least) {                                 \
				least = (s)->way[i].tat;                               \
				victim = i;                                            \
			}                                                              \
		}                                                                      \
	} while (0)

static __always_inline int over_limit4(const struct lbx_admit *adm, __u32 scope, __be32 src, __u64 now)
{
	__u32 idx = src_set_index(src ^ scope * LBX_SRC_SCOPE_MUL), victim;
	__u64 who = (__u64)scope << 32 | src;
	struct src_set4 *s = lbx_src_limit4.lookup(&idx);

	if (!s)
		return 0;
#pragma unroll
	for (int i = 0; i < LBX_SRC_LIMIT_WAYS; i++)
		if (s->way[i].who == who && s->way[i].tat)
			return gcra(&s->way[i].tat, adm, now);
	LBX_SRC_VICTIM(s, victim);
	s->way[victim & (LBX_SRC_LIMIT_WAYS - 1)].who = who;
	s->way[victim & (LBX_SRC_LIMIT_WAYS - 1)].tat = now + adm->interval_ns;
	return 0;
}

static __always_inline int over_limit6(const struct lbx_admit *adm, __u32 scope, const struct lbx_addr *src,
				       __u64 now)
{
	__u32 idx = src_set_index(src->w[0] ^ src->w[1] ^ scope * LBX_SRC_SCOPE_MUL), victim;
	__u64 net = (__u64)src->w[1] << 32 | src->w[0];
	struct src_set6 *s = lbx_src_limit.lookup(&idx);

	if (!s)
		return 0;
#pragma unroll
	for (int i = 0; i < LBX_SRC_LIMIT_WAYS; i++)
		if (s->way[i].net == net && s->way[i].scope == scope && s->way[i].tat)
			return gcra(&s->way[i].tat, adm, now);
	LBX_SRC_VICTIM(s, victim);
	s->way[victim & (LBX_SRC_LIMIT_WAYS - 1)].net = net;
	s->way[victim & (LBX_SRC_LIMIT_WAYS - 1)].scope = scope;
	s->way[victim & (LBX_SRC_LIMIT_WAYS - 1)].tat = now + adm->interval_ns;
	return 0;
}

/* 1 if this source has no token left in this scope, else 0 (and a token is taken). */
static __always_inline int over_limit(const struct lbx_admit *adm, __u32 id, const struct pkt *pkt, __u64 now)
{
	if (pkt->flow.family == LBX_FAMILY_V4)
		return over_limit4(adm, LBX_ACL_SCOPE(LBX_FAMILY_V4, id), pkt->flow.src.w[0], now);
	return over_limit6(adm, LBX_ACL_SCOPE(pkt->flow.family, id), &pkt->flow.src, now);
}

#endif /* LBX_LIMIT_H */
