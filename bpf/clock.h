/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The new-flow paths' clock (the flood window, select.h; the per-source limiter, limit.h):
 * CLOCK_MONOTONIC at tick resolution, from jiffies. The verifier inlines bpf_jiffies64() into
 * one load of jiffies_64 (kernel/bpf/verifier.c, x86-64 JIT), where bpf_ktime_get_coarse_ns()
 * is a real call (~10-15 ns per new flow here, docs/benchmarks.md issue 11) and
 * bpf_ktime_get_ns() a TSC read (~80). Both coarse clocks tick together; this one lags
 * ktime_get_coarse_ns() by a constant (~60 ms on this VM: the ticks before timekeeping
 * started), which neither user minds: the limiter compares its own timestamps only, and the
 * control plane's "under flood" test (lbxdp/maps.py: Maps.flood) allows a window up to one
 * second old. Not for the table-change clock (now_units(), select.h): that one is compared with
 * the control plane's CLOCK_MONOTONIC, where a lag could read as a negative age.
 * bcc compiles against the running kernel's headers, so CONFIG_HZ and INITIAL_JIFFIES are its own.
 */
#ifndef LBX_CLOCK_H
#define LBX_CLOCK_H

#include <linux/jiffies.h>

static __always_inline __u64 tick_ns(void)
{
	return (bpf_jiffies64() - INITIAL_JIFFIES) * (1000000000ULL / CONFIG_HZ);
}

#endif /* LBX_CLOCK_H */
