/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Admission: may this packet start a flow on this VIP? Runs after established() and classify(),
 * so established flows never pay it and traffic for no VIP never reaches it. Order: the global
 * ACL, the VIP's ACL (a denied source takes no token), then the global limit, the VIP's limit.
 * Returns LBX_R_OK or the drop reason. ICMP errors about a flow are no new flow: never charged.
 * Built with -DLBX_NO_ADMISSION everything is admitted (tests/datapath/test_admission.py shows
 * that its rows then fail).
 */
#ifndef LBX_ADMIT_H
#define LBX_ADMIT_H

#include "maps.h"
#include "parse.h"
#include "acl.h"
#include "limit.h"

static __always_inline int admit(const struct vip_meta *vip, const struct pkt *pkt)
{
	__u32 gid = LBX_ADMIT_GLOBAL, vid = vip->id;
	struct lbx_admit *g, *v;
	__u64 now;
	int r;

#ifdef LBX_NO_ADMISSION
	return LBX_R_OK;
#endif
	/*
	 * LBX_VIP_F_ADMIT (the control plane's: lbxdp/balancer.py) says whether either scope has
	 * anything; without it the two lbx_admit lookups (~10 ns, docs/benchmarks.md) are skipped.
	 */
	if (!(vip->flags & LBX_VIP_F_ADMIT) || (pkt->flags & LBX_PKT_F_ICMP_ERR))
		return LBX_R_OK;
	g = lbx_admit.lookup(&gid);
	v = lbx_admit.lookup(&vid);
	if (!g || !v)
		return LBX_R_OK;
	if (g->flags && (r = acl_verdict(g, LBX_ADMIT_GLOBAL, pkt)) != LBX_R_OK)
		return r;
	if (v->flags && (r = acl_verdict(v, vid, pkt)) != LBX_R_OK)
		return r;
	if (!(g->interval_ns | v->interval_ns) || !charged(pkt))
		return LBX_R_OK;
	now = tick_ns();                      /* clock.h, limit.h: why coarse */
	if (g->interval_ns && over_limit(g, LBX_ADMIT_GLOBAL, pkt, now))
		return LBX_R_DROP_SRC_RATE;
	if (v->interval_ns && over_limit(v, vid, pkt, now))
		return LBX_R_DROP_SRC_RATE;
	return LBX_R_OK;
}

#endif /* LBX_ADMIT_H */
