/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ABI of lbxdp_decap, the backend's decapsulation program (bpf/decap.c): what it and
 * lbxdp/decap.py both see. Same conventions as abi.h (whose struct lbx_addr and lbx_count it
 * reuses): byte order in the type, a size pin per struct, enums mirrored in lbxdp/abi.py and
 * checked by tests/unit/test_abi_drift.py.
 */
#ifndef LBX_DECAP_ABI_H
#define LBX_DECAP_ABI_H

#include "abi.h"

/*
 * The address table: host addresses (a tunnel's outer destination must be one) and VIPs (its
 * inner destination must be one, unless loose) in one open-addressing table held in an array
 * map, because array lookups are inlined by the verifier while a hash-map lookup is a call
 * (~28 ns each with SRSO mitigations: two of them would blow the 1.3x-floor budget).
 *   slot = ((w[0] ^ w[1] ^ w[2] ^ w[3]) * LBX_VIP_FILTER_MUL) >> (32 - LBX_DECAP_SLOT_BITS),
 * then the next slots, at most LBX_DECAP_PROBES of them; an empty slot (family 0) ends the
 * search. The map holds two tables of LBX_DECAP_SLOTS slots: the control plane writes the one
 * the program does not read, compiles a program that reads it (LBXD_HALF below), replaces the
 * attached program with it and then records the half in lbxd_ctl.active (for readers), so a
 * packet never sees a table half written (lbxdp/decap.py: build_table(), attach()).
 */
#define LBX_DECAP_SLOT_BITS 12
#define LBX_DECAP_SLOTS 4096 /* 1 << LBX_DECAP_SLOT_BITS */
#define LBX_DECAP_PROBES 8
#define LBX_DECAP_MAX_ENTRIES 1024 /* addresses + VIPs: the table stays at most 1/4 full */
#define LBX_DECAP_MAX_VIPS 1024
_Static_assert(LBX_DECAP_SLOTS == 1 << LBX_DECAP_SLOT_BITS, "decap slots and bits disagree");

/*
 * The program is compiled for its instance (lbxdp/decap.py: program_defines() writes these -D
 * switches; every attach compiles anyway, and the kernel swaps the attached program atomically):
 *   LBXD_HALF      which half of lbxd_addrs the program reads (0 or 1);
 *   LBXD_GUE_PORT  GUE's UDP port as the program loads it (network order); 0: GUE off;
 *   LBXD_LOOSE     1: any inner destination is opened (--loose), 0: VIPs only;
 *   LBXD_HOSTS4(X), LBXD_HOSTS6(X)  the host addresses, X(w0) / X(w0, w1, w2, w3) each (words as
 *                  the CPU loads them), when there are at most lbxdp.decap.CONST_ADDRS of that
 *                  family; left undefined when there are more: the table is searched instead;
 *   LBXD_VIPS4(X), LBXD_VIPS6(X)    the same for VIPs, X(w0, id) / X(w0, w1, w2, w3, id).
 * The table is written in full either way (status reads it). No default: a program compiled
 * without them would open nothing it should.
 */
#if !defined(LBXD_HALF) || !defined(LBXD_GUE_PORT) || !defined(LBXD_LOOSE)
#error "lbxdp_decap is compiled by lbxdp/decap.py (program_defines): LBXD_HALF, LBXD_GUE_PORT, LBXD_LOOSE"
#endif

/* struct decap_slot flags: what the address is to this host (both for a VIP on lo). */
#define LBX_DECAP_F_HOST 0x01 /* one of the host's addresses: tunnels to it are decapsulated */
#define LBX_DECAP_F_VIP 0x02  /* a configured VIP: inner packets to it are accepted */

/* lbxd_ctl flags. */
#define LBX_DECAP_CTL_F_LOOSE 0x01 /* accept any inner destination, not only a VIP */

/*
 * Why lbxdp_decap returned what it returned (it always returns XDP_PASS: the prefix says
 * whether the frame was decapsulated (PASS_DECAP) or left untouched).
 */
enum lbx_decap_reason {
	LBX_D_OK = 0,
	LBX_D_PASS_DECAP,           /* outer header stripped, inner packet passed to the stack */
	LBX_D_PASS_NOT_TUNNEL,      /* not IPIP/IPv6-in-IP nor UDP to the GUE port (or not IP at all) */
	LBX_D_PASS_NOT_LOCAL,       /* a tunnel whose outer destination is no host address */
	LBX_D_PASS_OUTER_FRAGMENT,  /* a fragment of a tunnel packet: XDP sees one fragment, not the whole */
	LBX_D_PASS_OUTER_OPTIONS,   /* outer IPv4 header with options */
	LBX_D_PASS_TRUNCATED_OUTER, /* the outer header (or its total length) runs past the frame */
	LBX_D_PASS_TRUNCATED_INNER, /* the inner IP header (or its total length) runs past the outer payload */
	LBX_D_PASS_BAD_INNER,       /* the inner header is not the IP version the outer one announced */
	LBX_D_PASS_NOT_VIP,         /* inner destination is no configured VIP (strict mode) */
	LBX_D_PASS_GUE_UNSUPPORTED, /* GUE variant 0 with options, flags or a control message; variant 2/3 */
	LBX_D_PASS_ADJUST_FAILED,   /* bpf_xdp_adjust_head refused (cannot happen, see decap_strip.h) */
	LBX_D_MAX,
};

/* One slot of the address table (see above); family 0 = empty. */
struct decap_slot {
	struct lbx_addr addr;
	__u8 family;   /* LBX_FAMILY_V4 or LBX_FAMILY_V6; 0: empty */
	__u8 flags;    /* LBX_DECAP_F_* */
	__u16 vip_id;  /* VIP: index into lbxd_vip_stats */
};
_Static_assert(sizeof(struct decap_slot) == 20, "also update lbxdp/abi.py");

/* Per-instance settings, one entry; written by lbxdp.decap only. The program does not read it
 * (the same values are its compile-time constants, above): it is the record status reads. */
struct decap_ctl {
	__be16 gue_port; /* UDP destination port of GUE, network order; 0: GUE off */
	__u8 flags;      /* LBX_DECAP_CTL_F_* */
	__u8 active;     /* which of the two address tables the program reads (0 or 1): its LBXD_HALF */
	__u8 reserved[12];
};
_Static_assert(sizeof(struct decap_ctl) == 16, "also update lbxdp/abi.py");

#endif /* LBX_DECAP_ABI_H */
