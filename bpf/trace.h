/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Per-packet trace events for `lbxdp trace` (lbxdp/trace.py). Compiled in only with -DLBX_TRACE,
 * the build `lbxdp trace` attaches in place of the normal one while it runs: without it every
 * hook below is an empty macro, so the normal build's instructions are those of a program without
 * hooks (same program tag; the untraced fast path pays nothing, docs/benchmarks.md).
 * Three hooks: LBX_TRACE_BEGIN (lbxdp.c, first thing) keeps the frame's first LBX_TRACE_SNAP
 * bytes as they arrived, before any rewrite, in this CPU's event; LBX_TRACE_SEL (account(),
 * stats.h) notes the VIP and backend entry the packet went to; LBX_TRACE_END (count(), every
 * exit) adds verdict, reason and flow key and sends the event. A full ring loses the event and
 * counts it in lbx_trace_lost. Filters are applied by the reader.
 */
#ifndef LBX_TRACE_H
#define LBX_TRACE_H

#include "abi.h"

#ifdef LBX_TRACE

#define LBX_TRACE_SNAP 128
#define LBX_TRACE_NONE 0xffffffff   /* vip_id / backend_id: no selection */
#ifndef LBX_TRACE_PAGES
#define LBX_TRACE_PAGES 256         /* 1 MiB of ring: ~4000 events */
#endif

struct lbx_trace_ev {
	__u64 ts;                  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	struct flow_key flow;      /* as parse.h left it (zero where it did not get that far) */
	__u32 reason;              /* enum lbx_reason */
	__u32 verdict;             /* XDP_* */
	__u32 vip_id;              /* LBX_TRACE_NONE unless account() ran */
	__u32 backend_id;
	__u32 frame_len;           /* the frame's length on arrival */
	__u32 cap_len;             /* bytes of head[] kept (0: frame shorter than an Ethernet header) */
	__u8 head[LBX_TRACE_SNAP];
};
_Static_assert(sizeof(struct lbx_trace_ev) == 200, "also update lbxdp/trace.py");

/* 0 -> this CPU's event under construction. Trace build only, never pinned. */
BPF_PERCPU_ARRAY(lbx_trace_buf, struct lbx_trace_ev, 1);
/* 0 -> events this CPU could not put in the ring (full). */
BPF_PERCPU_ARRAY(lbx_trace_lost, __u64, 1);
BPF_RINGBUF_OUTPUT(lbx_trace_ring, LBX_TRACE_PAGES);

static __always_inline void trace_begin(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct lbx_trace_ev *ev = lbx_trace_buf.lookup(&zero);
	__u64 n;

	if (!ev)
		return;
	n = (__u64)ctx->data_end - (__u64)ctx->data;
	ev->frame_len = n;
	ev->cap_len = 0;
	ev->vip_id = LBX_TRACE_NONE;
	ev->backend_id = LBX_TRACE_NONE;
	if (n > LBX_TRACE_SNAP)
		n = LBX_TRACE_SNAP;
	/* The helper's length must be bounded in the register it is passed in: 64-bit, so clang
	 * does not test a zero-extended copy, and the barrier keeps it from passing the unclamped one. */
	asm volatile("" : "+r"(n));
	if (n >= 14 && n <= LBX_TRACE_SNAP && bpf_xdp_load_bytes(ctx, 0, ev->head, n) == 0)
		ev->cap_len = n;
}

static __always_inline void trace_sel(__u32 vip_id, __u32 backend_id)
{
	__u32 zero = 0;
	struct lbx_trace_ev *ev = lbx_trace_buf.lookup(&zero);

	if (ev) {
		ev->vip_id = vip_id;
		ev->backend_id = backend_id;
	}
}

static __always_inline void trace_end(int verdict, __u32 reason, const struct flow_key *flow)
{
	__u32 zero = 0;
	struct lbx_trace_ev *ev = lbx_trace_buf.lookup(&zero);
	__u64 *lost;

	if (!ev)
		return;
	ev->ts = bpf_ktime_get_ns();
	ev->flow = *flow;
	ev->reason = reason;
	ev->verdict = verdict;
	if (lbx_trace_ring.ringbuf_output(ev, sizeof(*ev), 0) != 0) {
		lost = lbx_trace_lost.lookup(&zero);
		if (lost)
			(*lost)++;
	}
}

#define LBX_TRACE_BEGIN(ctx) trace_begin(ctx)
#define LBX_TRACE_SEL(vip_id, backend_id) trace_sel(vip_id, backend_id)
#define LBX_TRACE_END(verdict, reason, flow) trace_end(verdict, reason, flow)

#else

#define LBX_TRACE_BEGIN(ctx) do { } while (0)
#define LBX_TRACE_SEL(vip_id, backend_id) do { } while (0)
#define LBX_TRACE_END(verdict, reason, flow) do { } while (0)

#endif /* LBX_TRACE */

#endif /* LBX_TRACE_H */
