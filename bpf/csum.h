/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Internet checksum helpers (RFC 1071), shared by the modes that write checksummed bytes
 * (encap.h; nat.h later) and the ICMP errors the program builds.
 *
 * Contract: partial sums are __u64 accumulators of words loaded in the CPU's order straight
 * from network-order memory. The ones'-complement sum does not depend on byte order (RFC 1071
 * 2.(B)), so a sum of native loads, folded and complemented, is stored back natively and is
 * right on the wire; a value known as a number (a length, a protocol) is added as
 * bpf_htons(value). lbx_csum_fold() ends every sum.
 */
#ifndef LBX_CSUM_H
#define LBX_CSUM_H

/* Fold a 64-bit partial sum to 16 bits and complement it: the checksum field's value. */
static __always_inline __u16 lbx_csum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The sum of n 32-bit words at p (n a compile-time constant; the caller checked the bounds). */
static __always_inline __u64 lbx_csum_words(const void *p, const int n)
{
	const __u32 *w = p;
	__u64 s = 0;

	/* The caller has just written these bytes through other types: make the compiler store
	 * them before it loads them as words (C's aliasing rules would let it reorder). */
	asm volatile("" ::: "memory");

#pragma unroll
	for (int i = 0; i < n; i++)
		s += w[i];
	return s;
}

/* The sum of an address as struct lbx_addr holds it (IPv4: w[0] only, the rest is zero). */
static __always_inline __u64 lbx_csum_addr(const struct lbx_addr *a)
{
	return (__u64)a->w[0] + a->w[1] + a->w[2] + a->w[3];
}

/* -x in ones'-complement arithmetic (for a sum x): what removes x from a sum it is part of.
 * The negation of a folded sum is its complement, which is what lbx_csum_fold() returns. */
static __always_inline __u64 lbx_csum_neg(__u64 x)
{
	return lbx_csum_fold(x);
}

/*
 * RFC 1624 eqn. 3: the checksum after one 16-bit word of the summed data changed from old to
 * new, without summing the data again (MSS clamping rewrites one word of a TCP header).
 */
static __always_inline __u16 lbx_csum_replace2(__u16 check, __be16 old, __be16 new)
{
	return lbx_csum_fold((__u64)(__u16)~check + (__u16)~old + new);
}

#endif /* LBX_CSUM_H */
