/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Per-source limit of new flows (issue 11): a token bucket per (source, scope) in its GCRA form,
 * one u64 per source: the theoretical arrival time (TAT) of its next flow. A flow is admitted
 * when TAT - now <= burst_ns ((burst - 1) tokens' worth of time), and then TAT = max(TAT, now) +
 * interval_ns. So a fresh source gets `burst` flows at once, then `rate` per second; no
 * division and no refill loop on the hot path (the control plane turns rate and burst into
 * nanoseconds). An IPv6 source is keyed by its /64: one host can hold a whole /64.
 *
 * Per-CPU buckets (LRU per-CPU hashes: lbx_src_limit4 for IPv4 sources, whose 8-byte key hashes
 * and compares faster than 20 bytes, and lbx_src_limit for IPv6 /64s): a CPU reads and writes
 * only its own TAT, so there is no atomic and no lock on the hot path. The cost is that a source
 * whose flows are spread over N CPUs (RSS hashes each 5-tuple, so one client's flows usually
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

/* 1 if this source has no token left in this scope, else 0 (and a token is taken). */
static __always_inline int over_limit(const struct lbx_admit *adm, __u32 id, const struct pkt *pkt, __u64 now)
{
	__u64 *tat, t = now + adm->interval_ns;

	if (pkt->flow.family == LBX_FAMILY_V4) {
		struct src_limit_key4 key = { .src = pkt->flow.src.w[0], .scope = LBX_ACL_SCOPE(LBX_FAMILY_V4, id) };

		tat = lbx_src_limit4.lookup(&key);
		if (!tat) {
			lbx_src_limit4.update(&key, &t);
			return 0;
		}
	} else {
		struct src_limit_key key = { .src = pkt->flow.src, .scope = LBX_ACL_SCOPE(pkt->flow.family, id) };

		key.src.w[2] = 0;
		key.src.w[3] = 0;
		tat = lbx_src_limit.lookup(&key);
		if (!tat) {
			lbx_src_limit.update(&key, &t);
			return 0;
		}
	}
	t = *tat > now ? *tat : now;
	if (t - now > adm->burst_ns + LBX_LIMIT_SLACK_NS)
		return 1;
	*tat = t + adm->interval_ns;
	return 0;
}

#endif /* LBX_LIMIT_H */
