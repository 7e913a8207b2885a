/* SPDX-License-Identifier: GPL-2.0 */
/*
 * CIDR allow/deny of new flows' sources (issue 11). acl_verdict() answers for one scope (a VIP,
 * or the whole balancer) with LBX_R_OK or the drop reason; it reads one LPM trie that holds every
 * scope's rules, keyed (scope, source prefix), so one lookup finds the scope's longest matching
 * rule:
 *   - the longest matching prefix decides (deny 10.0.0.0/8 with allow 10.1.0.0/16 admits
 *     10.1.2.3); the same prefix cannot be both (lbxdp/model.py refuses it);
 *   - a scope with an allow list also has an implicit "not allowed" 0.0.0.0/0 and ::/0, so a
 *     source no allow rule covers is refused (LBX_R_DROP_ACL_NOT_ALLOWED), in both families;
 *   - no entry matches: admitted.
 * A scope without entries for the packet's family is not looked up (lbx_admit flags), so VIPs
 * without rules pay one inlined array read. Established flows never come here: the control
 * plane purges the flows a new rule set refuses (lbxdp/maps.py: Maps.write_admission).
 */
#ifndef LBX_ACL_H
#define LBX_ACL_H

#include "maps.h"
#include "parse.h"

static __always_inline int acl_verdict(const struct lbx_admit *adm, __u32 id, const struct pkt *pkt)
{
	__u8 want = pkt->flow.family == LBX_FAMILY_V4 ? LBX_ADMIT_F_ACL_V4 : LBX_ADMIT_F_ACL_V6;
	struct acl_key key = {
		.prefixlen = 32 + (pkt->flow.family == LBX_FAMILY_V4 ? 32 : 128),
		.scope = LBX_ACL_SCOPE(pkt->flow.family, id),
		.addr = pkt->flow.src,
	};
	int zero = 0;
	void *trie;
	__u8 *action;

	if (!(adm->flags & want))
		return LBX_R_OK;
	trie = lbx_acl.lookup(&zero);
	if (!trie)
		return LBX_R_OK;
	/* The trie lookup is a call (not inlined): only new flows of scopes with rules pay it. */
	action = bpf_map_lookup_elem(trie, &key);
	if (!action || *action == LBX_ACL_ALLOW)
		return LBX_R_OK;
	return *action == LBX_ACL_DENY ? LBX_R_DROP_ACL_DENY : LBX_R_DROP_ACL_NOT_ALLOWED;
}

#endif /* LBX_ACL_H */
