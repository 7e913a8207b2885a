/* SPDX-License-Identifier: GPL-2.0 */
/*
 * CIDR allow/deny of new flows' sources (issue 11). acl_verdict() answers for one scope (a VIP,
 * or the whole balancer) with LBX_R_OK or the drop reason:
 *   - the longest matching prefix decides (deny 10.0.0.0/8 with allow 10.1.0.0/16 admits
 *     10.1.2.3); the same prefix cannot be both (lbxdp/model.py refuses it);
 *   - a scope with an allow list also has an implicit "not allowed" 0.0.0.0/0 and ::/0, so a
 *     source no allow rule covers is refused (LBX_R_DROP_ACL_NOT_ALLOWED), in both families;
 *   - no entry matches: admitted.
 * Two structures hold the same rules, each swapped in whole (a packet sees the old rule set or
 * the new one, never a half-written one):
 *   - lbx_acl_mbt: a multibit trie in one array value (the blob; lbxdp/acl_mbt.py builds it and
 *     says its layout), walked one address byte per level with one load each, plus one leaf
 *     compare: the fast path;
 *   - lbx_acl: the kernel's LPM trie keyed (scope, source prefix), every scope's rules: the
 *     fallback for a (scope, family) the blob's budget had no room for (its header word says
 *     LBX_ACL_MBT_H_FALLBACK) and for a program whose blob slot is empty (pins of an older
 *     control plane).
 * A scope without entries for the packet's family is not looked up (lbx_admit flags), so VIPs
 * without rules pay one inlined array read. Established flows never come here: the control
 * plane purges the flows a new rule set refuses (lbxdp/maps.py: Maps.write_admission).
 */
#ifndef LBX_ACL_H
#define LBX_ACL_H

#include "maps.h"
#include "parse.h"

/* Layout of the blob (lbxdp/acl_mbt.py mirrors these; tests/unit/test_acl_mbt.py checks). */
#define LBX_ACL_MBT_H_BIG 0x4       /* header: the root indexes the first two address bytes */
#define LBX_ACL_MBT_H_FALLBACK 0x8  /* header: this (scope, family) is in the kernel trie only */
#define LBX_ACL_MBT_LEAF 0x4        /* entry: the offset is a leaf (up to LEAF_MAX prefixes), not a node */
#define LBX_ACL_MBT_LEAF_MAX 4      /* prefixes in one leaf */
#define LBX_ACL_MBT_MASK (LBX_ACL_MBT_WORDS - 1)
_Static_assert((LBX_ACL_MBT_WORDS & LBX_ACL_MBT_MASK) == 0, "LBX_ACL_MBT_WORDS: a power of two");

/* One level: keep the entry's verdict, stop at nothing below or a leaf, else read the next node's
 * entry for this address byte. Every index is masked into the blob (the verifier's bound). */
#define LBX_MBT_NEXT(byte)                                    \
	do {                                                  \
		if (e & 3)                                    \
			best = e & 3;                         \
		off = e >> 3;                                 \
		if (!off)                                     \
			return best;                          \
		if (e & LBX_ACL_MBT_LEAF)                     \
			goto leaf;                            \
		e = w[(off + (byte)) & LBX_ACL_MBT_MASK];     \
	} while (0)

/* The best verdict (0: none, else enum lbx_acl_action + 1) of src in the (scope, family) whose
 * header word is head. Unrolled: 3 levels for IPv4 (2 with a big root), up to 15 for IPv6. */
static __always_inline __u32 mbt_walk(const __u32 *w, __u32 head, const struct lbx_addr *src, int v6)
{
	const __u8 *a = (const __u8 *)src->w;
	__u32 best = head & 3, off = head >> 4, e, n;
	const __u32 *l;

	if (head & LBX_ACL_MBT_H_BIG) {
		e = w[(off + ((__u32)a[0] << 8 | a[1])) & LBX_ACL_MBT_MASK];
	} else {
		e = w[(off + a[0]) & LBX_ACL_MBT_MASK];
		LBX_MBT_NEXT(a[1]);
	}
	LBX_MBT_NEXT(a[2]);
	LBX_MBT_NEXT(a[3]);
	if (v6) {
#pragma unroll
		for (int i = 4; i < 16; i++)
			LBX_MBT_NEXT(a[i]);
	}
	if (e & 3)
		best = e & 3;
	off = e >> 3;
	if (!off || !(e & LBX_ACL_MBT_LEAF))
		return best;
leaf:
	/* the count, then per prefix, longest first: verdict word, its words, its mask's (1 + 1 + 1
	 * or 1 + 4 + 4); the first that contains src is the longest match below the entry */
	off &= LBX_ACL_MBT_MASK;
	n = w[off];
	l = &w[off + 1];
	if (!v6) {
#pragma unroll
		for (int k = 0; k < LBX_ACL_MBT_LEAF_MAX; k++, l += 3) {
			if (k >= n)
				break;
			if (!((src->w[0] ^ l[1]) & l[2]))
				return l[0];
		}
		return best;
	}
#pragma unroll
	for (int k = 0; k < LBX_ACL_MBT_LEAF_MAX; k++, l += 9) {
		if (k >= n)
			break;
		if (!(((src->w[0] ^ l[1]) & l[5]) | ((src->w[1] ^ l[2]) & l[6]) |
		      ((src->w[2] ^ l[3]) & l[7]) | ((src->w[3] ^ l[4]) & l[8])))
			return l[0];
	}
	return best;
}

static __always_inline int acl_verdict(const struct lbx_admit *adm, __u32 id, const struct pkt *pkt)
{
	int v6 = pkt->flow.family != LBX_FAMILY_V4;
	__u8 want = v6 ? LBX_ADMIT_F_ACL_V6 : LBX_ADMIT_F_ACL_V4;
	struct acl_key key;
	int zero = 0;
	void *inner;
	struct lbx_acl_blob *blob;
	__u8 *action;
	__u32 head, best;

	if (!(adm->flags & want))
		return LBX_R_OK;
	inner = lbx_acl_mbt.lookup(&zero);
	blob = inner ? bpf_map_lookup_elem(inner, &zero) : NULL;   /* both inlined: array lookups */
	if (blob) {
		head = blob->w[(id * 2 + v6) & LBX_ACL_MBT_MASK];
		if (!(head & LBX_ACL_MBT_H_FALLBACK)) {
			best = head ? mbt_walk(blob->w, head, &pkt->flow.src, v6) : 0;
			if (best <= LBX_ACL_ALLOW + 1)
				return LBX_R_OK;
			return best == LBX_ACL_DENY + 1 ? LBX_R_DROP_ACL_DENY : LBX_R_DROP_ACL_NOT_ALLOWED;
		}
	}
	inner = lbx_acl.lookup(&zero);
	if (!inner)
		return LBX_R_OK;
	key.prefixlen = 32 + (v6 ? 128 : 32);
	key.scope = LBX_ACL_SCOPE(pkt->flow.family, id);
	key.addr = pkt->flow.src;
	/* The trie lookup is a call (not inlined). */
	action = bpf_map_lookup_elem(inner, &key);
	if (!action || *action == LBX_ACL_ALLOW)
		return LBX_R_OK;
	return *action == LBX_ACL_DENY ? LBX_R_DROP_ACL_DENY : LBX_R_DROP_ACL_NOT_ALLOWED;
}

#endif /* LBX_ACL_H */
