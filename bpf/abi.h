/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lbxdp ABI: every type, constant and enum that the kernel program and the Python control plane
 * both see. Python never re-declares these layouts: it reads the compiled types from bcc, and
 * lbxdp/abi.py mirrors the enums and constants below; tests/unit/test_abi_drift.py fails when the
 * two drift. Byte order is in the type (__be*) and every struct has a size pin.
 */
#ifndef LBX_ABI_H
#define LBX_ABI_H

/* Map capacities. The defaults here can be overridden by the loader's BuildConfig (-D...). */
#ifndef LBX_MAX_VIPS
#define LBX_MAX_VIPS 1024
#endif
#ifndef LBX_MAX_BACKENDS
#define LBX_MAX_BACKENDS 16384
#endif
#ifndef LBX_FLOW_CAPACITY
#define LBX_FLOW_CAPACITY 65536
#endif
#ifndef LBX_SRC_LIMIT_CAPACITY
#define LBX_SRC_LIMIT_CAPACITY 65536 /* buckets of the new-flow limiter per family and CPU (limit.h) */
#endif
#define LBX_SRC_LIMIT_WAYS 4 /* buckets per set of the limiter's tables (limit.h) */
/* The half-open table (select.h): SYNs (and first UDP datagrams) whose choice the VIP's table
 * cannot reproduce later, until the client's next packet records the flow. */
#ifndef LBX_HALF_OPEN_CAPACITY
#define LBX_HALF_OPEN_CAPACITY 65536 /* slots: a power of two, a multiple of LBX_HALF_OPEN_WAYS (README: how long
				      * a handshake survives a flood: ~capacity / flooding SYNs per second) */
#endif
#ifndef LBX_HALF_OPEN_WAYS
#define LBX_HALF_OPEN_WAYS 4         /* slots per bucket of the half-open table (maps.h): 1, 2 or 4 */
#endif
/*
 * Handshake gate (select.h). Time in the program is bpf_ktime_get_coarse_ns() >> LBX_TIME_SHIFT
 * (~1.07 s units, CLOCK_MONOTONIC; lbxdp/maps.py writes the same). A VIP's table is settled
 * LBX_SETTLE_UNITS after it last changed (vip_meta.changed_at): until then its choice for a SYN
 * may not be the one its ACK gets, so SYNs go into the half-open table. Connection-table inserts
 * of packets that prove no handshake (a bare ACK, a settled VIP's UDP) stop on a CPU past
 * lbx_ctl.flood_threshold records per second, and pure SYNs skip the connection table on a CPU
 * past that many pure SYNs per second (0: LBX_FLOOD_THRESHOLD).
 */
#define LBX_TIME_SHIFT 30
#define LBX_SETTLE_UNITS 2
#define LBX_FLOOD_THRESHOLD 10000
/* Most slots one VIP's selection table may have (the Maglev default is 65537). */
#define LBX_TABLE_MAX 1048576 /* 2^20 */
/*
 * A VIP's table (an inner map of lbx_tables) packs LBX_TABLE_SLOTS_PER_WORD 16-bit backend ids
 * into each 8-byte value: slot s is bits (s % 4) * 16 .. + 15 of value s / 4 (0: no backend).
 * An array stores every value at an 8-byte stride, so u32 slots took 8 bytes each (512 KiB for
 * a 65537-slot Maglev table); packed it is 128 KiB, and a new flow's one random slot misses the
 * cache less often (docs/benchmarks.md, issue 11: flood SYN 228 -> 178 ns). select.h table_slot();
 * lbxdp/bpfsys.py table_fill()/table_read().
 */
#define LBX_TABLE_SLOTS_PER_WORD 4
_Static_assert(LBX_MAX_BACKENDS <= 65536, "a table slot holds a 16-bit backend id");
/* Most backends one VIP may have. */
#define LBX_VIP_BACKENDS_MAX 1024

/*
 * The VIP address filter: a bitmap with one bit per hash of a destination address, so that
 * traffic for no VIP passes without a hash-map lookup (with Spectre/SRSO mitigations every
 * lookup costs a call and a return; see docs/benchmarks.md). A clear bit means "no VIP has this
 * address"; a set bit means "maybe" and the lookup follows. The control plane sets a VIP's bit
 * before it inserts the VIP and clears it only when no VIP address maps to it.
 *   bit = ((w[0] ^ w[1] ^ w[2] ^ w[3]) * LBX_VIP_FILTER_MUL) >> (32 - LBX_VIP_FILTER_BITS)
 * where w[] are struct lbx_addr's words as the CPU loads them (lbxdp/maps.py: filter_bit()).
 * The port is left out so that a port-0 (any port) VIP needs no special case.
 */
#define LBX_VIP_FILTER_BITS 16
#define LBX_VIP_FILTER_WORDS 1024 /* __u64 words: 1 << (LBX_VIP_FILTER_BITS - 6) */
#define LBX_VIP_FILTER_MUL 0x9E3779B1u

/* The ACL blob (bpf/maps.h struct lbx_acl_blob): LBX_ACL_MBT_WORDS words (a power of two: indexes
 * are masked) and LBX_ACL_MBT_PAD after them, so that a leaf read at a masked offset stays inside. */
#define LBX_ACL_MBT_WORDS 524288   /* 1 << 19 */
#define LBX_ACL_MBT_PAD 64
_Static_assert(LBX_VIP_FILTER_WORDS * 64 == 1 << LBX_VIP_FILTER_BITS, "filter words and bits disagree");

#define LBX_FAMILY_V4 4
#define LBX_FAMILY_V6 6

/* VIP flags. */
#define LBX_VIP_F_PASS_NO_BACKEND 0x01 /* no usable backend: pass to the kernel instead of drop */
#define LBX_VIP_F_CAPS 0x02 /* some backend has max_conns: choices check caps (sched.h), SYNs go half-open */
#define LBX_VIP_F_QUIC 0x04 /* a UDP VIP whose QUIC packets go by the server id in their DCID (quic.h) */
#define LBX_VIP_F_ADMIT 0x08 /* this VIP or the global scope has an ACL or a limit: admit() reads lbx_admit */
#define LBX_VIP_F_PASSIVE 0x10 /* a non-NAT VIP with [vip.passive_health]: its TCP SYNs go half-open, retransmitted SYNs and handshake ACKs counted in lbx_nat_be (select.h) */

/* Backend flags. */
#define LBX_BE_F_ACTIVE 0x01 /* slot holds a backend; cleared when the backend is deleted */
#define LBX_BE_F_IN_TABLE 0x02 /* its VIP's live table names it (readers; a half-open SYN, select.h) */
#define LBX_BE_F_COUNTED 0x04 /* its open connections are counted in lbx_conns (leastconn, max_conns; sched.h) */

/* Per-VIP scheduler: how a new flow picks a slot of the VIP's table. */
enum lbx_sched {
	LBX_SCHED_RR = 0,     /* per-CPU round robin over the table (a weighted sequence) */
	LBX_SCHED_HASH = 1,   /* 5-tuple hash modulo the table size (the same weighted sequence) */
	LBX_SCHED_MAGLEV = 2, /* 5-tuple hash modulo the table size (a Maglev table: consistent) */
	LBX_SCHED_SOURCE = 3, /* hash of the client address (vip_meta.src_prefix bits) over a Maglev table */
	LBX_SCHED_LEASTCONN = 4, /* two slots of a Maglev table by flow hash, the lower open/weight (sched.h) */
};

/*
 * Forwarding mode of a VIP, copied into each of its backend entries (struct backend.mode), so
 * that an established flow knows how to forward without a VIP lookup. forward() (forward.h)
 * switches on it; a value it does not know is LBX_R_DROP_UNKNOWN_MODE, never a fallback.
 * LBX_MODE_NAT (issue 12) translates addresses and ports both ways and keeps state in lbx_nat.
 */
enum lbx_fwd_mode {
	LBX_MODE_DSR = 0,  /* L2 direct server return: rewrite the destination MAC, XDP_TX (dsr.h) */
	LBX_MODE_IPIP = 1, /* L3 DSR: IPIP, IP6IP6 or 4-in-6 by the backend's family (encap.h) */
	LBX_MODE_GUE = 2,  /* L3 DSR: GUE variant 1 (the inner IP header right after UDP) (encap.h) */
	LBX_MODE_NAT = 3,  /* NAT: destination (and with LBX_NAT_F_SNAT source) rewritten, replies
			    * translated back (nat.h, return_path.h) */
};

/* Backend encap flags (struct backend.encap_flags). */
#define LBX_ENC_F_FLOW_SOURCE 0x01 /* outer source from lbx_ctl's flow prefix and the flow hash */

/* Outer header defaults of the encap modes (encap.h). */
#define LBX_ENCAP_TTL 64
/* The GUE source port: flow entropy in the ephemeral range 49152-65535. */
#define LBX_GUE_SPORT_BASE 0xc000
#define LBX_GUE_SPORT_MASK 0x3fff
/* Bytes of the offending packet an ICMP "too big" error quotes: as many as fit the smallest
 * MTU of the family (576 for IPv4, RFC 1812 4.3.2.3; 1280 for IPv6, RFC 4443 2.4), which every
 * oversize packet has, since the control plane refuses an mtu below 1280 (lbxdp/model.py). */
#define LBX_ICMP4_QUOTE 548 /* 576 - 20 (IP) - 8 (ICMP) */
#define LBX_ICMP6_QUOTE 1232 /* 1280 - 40 (IPv6) - 8 (ICMPv6) */

/*
 * Why the program returned what it returned. Every exit of lbxdp_ingress() names one; the
 * prefix is the verdict (TX, PASS, DROP, ABORT), which is how Python derives it.
 * LBX_R_OK is not an exit: parse stages return it to say "go on".
 */
enum lbx_reason {
	LBX_R_OK = 0,
	LBX_R_TX_FORWARD,         /* sent to a backend */
	LBX_R_PASS_NOT_IP,        /* not IPv4/IPv6 (ARP, LLDP, ...) */
	LBX_R_PASS_NOT_VIP,       /* IP traffic for no VIP */
	LBX_R_PASS_NOT_L4,        /* neither TCP nor UDP (ICMP, ...) */
	LBX_R_PASS_TRUNCATED,     /* a header runs past the end of the frame */
	LBX_R_PASS_BAD_HEADER,    /* IPv4 ihl < 5, TCP doff < 5, wrong IP version */
	LBX_R_PASS_FRAGMENT,      /* IPv4 fragment: later fragments carry no ports */
	LBX_R_PASS_IP_OPTIONS,    /* IPv4 header with options */
	LBX_R_PASS_IPV6_EXT,      /* IPv6 extension header before L4 */
	LBX_R_PASS_NO_BACKEND,    /* the VIP has no usable backend and says pass (on_all_down) */
	LBX_R_DROP_NO_BACKEND,    /* the VIP has no backend */
	LBX_R_DROP_BACKEND_GONE,  /* a table slot names a deleted backend (control-plane race) */
	LBX_R_ABORT_REWRITE,      /* the frame could not be rewritten */
	/*
	 * Frames for a VIP that lbxdp must not forward. Structurally malformed ones are passed: the
	 * kernel validates them again and counts them in its own statistics. Impossible sources
	 * are dropped: no reply could reach them, so they are spoofed.
	 */
	LBX_R_PASS_NOT_FOR_US,    /* destination MAC is not the interface's (broadcast, multicast, another host) */
	LBX_R_PASS_NO_OWN_MAC,    /* lbx_ctl holds no MAC yet: fail closed, forward nothing */
	LBX_R_PASS_BAD_IP_LEN,    /* IPv4 total length or IPv6 payload length disagrees with the frame (or is 0) */
	LBX_R_PASS_BAD_TCP_LEN,   /* the TCP header (data offset) runs past the IP payload */
	LBX_R_PASS_BAD_UDP_LEN,   /* UDP length < 8 or not the IP payload length */
	LBX_R_PASS_TTL_ZERO,      /* IPv4 TTL or IPv6 hop limit 0 */
	LBX_R_DROP_BAD_SOURCE,    /* source cannot be a client: 0/8, 127/8, 224/3, ::, ::1, ff00::/8,
				   * ::ffff:0:0/96, or the destination itself */
	/* Values the program does not know (a control plane newer or broken): counted, never guessed. */
	LBX_R_DROP_UNKNOWN_MODE,  /* the backend entry's mode is no enum lbx_fwd_mode */
	LBX_R_DROP_UNKNOWN_SCHED, /* the VIP's scheduler is no enum lbx_sched */
	/*
	 * ICMP (bpf/icmp.h, issue 10). Errors steered: v4 destination unreachable (every code),
	 * time exceeded, parameter problem; v6 destination unreachable, packet too big, time
	 * exceeded, parameter problem. Every other ICMP type stays PASS_NOT_L4.
	 */
	LBX_R_TX_ICMP_STEERED,    /* an ICMP error about a VIP flow, sent to the flow's backend */
	LBX_R_PASS_ICMP_ECHO,     /* an echo request: the balancer's kernel answers for its own addresses */
	LBX_R_PASS_ICMP_BAD_QUOTE, /* quote truncated (< IP header + 8 bytes), not the outer family,
				   * not TCP/UDP, a later fragment, or its source is not the outer destination */
	LBX_R_PASS_ICMP_QUOTE_EXT, /* quoted IPv4 with options or IPv6 with extension headers */
	LBX_R_PASS_ICMP_MTU_TOO_SMALL, /* frag-needed MTU < 68 (v4), packet-too-big MTU < 1280 (v6) */
	LBX_R_PASS_ICMP_FROM_CLIENT, /* the error's source is the quoted flow's client, not a router */
	LBX_R_PASS_ICMP_NO_FLOW,  /* no connection-table entry and a round-robin VIP: no owner known */
	LBX_R_PASS_ICMP_STEER_OFF, /* steering switched off (lbx_ctl LBX_CTL_F_NO_ICMP_STEER, tests) */
	/* Encapsulation (encap.h). */
	LBX_R_TX_ICMP_TOO_BIG,    /* too big to encapsulate: ICMP frag-needed / packet-too-big sent to the client */
	LBX_R_DROP_TOO_BIG,       /* too big to encapsulate and IPv4 without DF: no ICMP is due, cannot fragment */
	LBX_R_DROP_NO_OWN_ADDR,   /* encap needs the balancer's address of the backend's family; lbx_ctl has none */
	/* Admission of new flows (bpf/admit.h, issue 11): never applied to established flows. */
	LBX_R_DROP_SRC_RATE,      /* the source (an IPv6 source's /64) is over its new-flow limit (limit.h) */
	LBX_R_DROP_ACL_DENY,      /* the source matches a deny rule (acl.h) */
	LBX_R_DROP_ACL_NOT_ALLOWED, /* the scope has an allow list and the source is on none of it (acl.h) */
	/* NAT (bpf/nat.h, bpf/return_path.h, issue 12). */
	LBX_R_TX_NAT_REPLY,       /* a backend's reply, translated back to come from the VIP, sent to the client */
	LBX_R_TX_NAT_ICMP_REPLY,  /* an ICMP error about a NAT flow from the backend's side, translated (outer
				   * and quoted headers), sent to the client */
	LBX_R_PASS_NAT_NO_FLOW,   /* from a NAT backend's address (lbx_nat_filter) but no live lbx_nat entry:
				   * the backend's own traffic, or a reply of an expired connection */
	LBX_R_DROP_NAT_NO_PORT,   /* SNAT: no free port in the pool after LBX_NAT_PORT_TRIES candidates */
	LBX_R_DROP_NAT_TUPLE_TAKEN, /* DNAT: the reply tuple (backend -> client) belongs to another live
				   * connection (the same client port to two NAT VIPs with one backend) */
	LBX_R_PASS_NAT_ICMP_NO_FLOW, /* an ICMP error about a NAT VIP flow that lbx_nat does not know */
	/* Connection caps (bpf/sched.h, issue 13): every backend tried is at its max_conns. */
	LBX_R_DROP_BACKENDS_FULL, /* ... and the VIP's on_all_down is drop */
	LBX_R_PASS_BACKENDS_FULL, /* ... and the VIP's on_all_down is pass */
	LBX_R_MAX,
};

/* An IPv4 or IPv6 address, network order; IPv4 uses w[0] and leaves the rest zero. */
struct lbx_addr {
	__be32 w[4];
};
_Static_assert(sizeof(struct lbx_addr) == 16, "also update lbxdp/abi.py");

struct vip_key {
	struct lbx_addr addr;
	__be16 port;  /* network order */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;  /* LBX_FAMILY_V4 or LBX_FAMILY_V6 */
};
_Static_assert(sizeof(struct vip_key) == 20, "also update lbxdp/abi.py");

struct vip_meta {
	__u32 id;          /* index into lbx_tables, lbx_vip_stats and lbx_rr */
	__u32 table_size;  /* slots of the VIP's table in lbx_tables; 0 = no usable backend */
	__u8 sched;        /* enum lbx_sched */
	__u8 mode;         /* enum lbx_fwd_mode; the program reads struct backend.mode, this is for readers */
	__u8 flags;        /* LBX_VIP_F_* */
	__u8 src_prefix;   /* source scheduler: leading bits of the client address hashed (v4 1-32, v6 1-128) */
	__u32 table_tag;   /* control plane only: fingerprint of what the table was built from */
	__u32 changed_at;  /* when the table last changed (LBX_TIME_SHIFT units); 0 = settled */
};
_Static_assert(sizeof(struct vip_meta) == 20, "also update lbxdp/abi.py");

/* Peers per backend entry: leastconn's second candidates (struct backend.lc_peer, sched.h). */
#define LBX_LC_PEERS 3

/*
 * One backend of one VIP: what an established flow needs to forward, without a VIP lookup.
 * The encap fields (issue 10) came out of a reserved tail; the rest of it holds the per-backend
 * fields the planned modes need, so that adding them changes no map layout (see
 * lbxdp/migrate.py for what a layout change costs):
 *   nat (issue 12): __u8 nat_flags (LBX_NAT_F_SNAT; the pool is lbx_nat_cfg's, one per instance);
 *   scheduling (issue 13): __u16 weight and __u32 max_conns (sched.h, taken), __u32 server_id (QUIC,
 *   quic.h, taken: offset 48, the first word of the old reserved[]), __u32 lc_peer[3] (leastconn's
 *   second candidates, the rest of it).
 * 64 bytes, one cache line: no entry straddles two, and the verifier's inlined array lookup
 * scales the index by a shift (a 48-byte entry took a multiply; docs/benchmarks.md).
 * mac is the next hop: the backend's own MAC on the segment (dsr, an on-link encap backend) or
 * the gateway's (a routed encap backend).
 */
struct backend {
	struct lbx_addr addr;
	__be16 port;      /* network order */
	__u8 family;      /* LBX_FAMILY_V4 or LBX_FAMILY_V6 */
	__u8 flags;       /* LBX_BE_F_* */
	__u8 mac[6];      /* next hop (dsr: the backend itself on the shared segment) */
	__u16 gen;        /* bumped each time the id is given to a new (VIP, backend); kept while inactive */
	__u32 vip_id;     /* the VIP this backend entry serves: one entry per (VIP, backend) */
	__u8 mode;        /* enum lbx_fwd_mode: its VIP's, written by the control plane with the entry */
	__u8 encap_flags; /* LBX_ENC_F_* (ipip, gue) */
	__be16 encap_port; /* gue: the UDP destination port, network order */
	__u16 mtu;        /* ipip, gue: largest outer IP packet towards the backend; 0 = no check */
	__u16 mss;        /* ipip, gue: clamp a SYN's MSS option to this; 0 = off */
	__u8 nat_flags;   /* nat: LBX_NAT_F_* */
	__u8 pad1;        /* zero */
	__u16 weight;     /* leastconn: the configured weight (scaled to fit 16 bits); 0 counts as 1 */
	__u32 max_conns;  /* open connections past which it gets no new flow (sched.h); 0 = no cap */
	__u32 server_id;  /* quic: its server id (1-65535, quic.h); 0 = none. Offset 48 */
	__u32 lc_peer[LBX_LC_PEERS]; /* leastconn: other entries of its VIP, drawn by weight (sched.h: the
				  * second candidate when a flow's slot names this one); 0 = none */
};
_Static_assert(sizeof(struct backend) == 64, "also update lbxdp/abi.py");

/* The 5-tuple as seen on the wire; also the key of the connection table. */
struct flow_key {
	struct lbx_addr src;
	struct lbx_addr dst;
	__be16 sport;  /* network order */
	__be16 dport;  /* network order */
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};
_Static_assert(sizeof(struct flow_key) == 40, "also update lbxdp/abi.py");

/*
 * A flow remembers its backend entry and that entry's generation: if the entry has since been
 * deactivated and given to another backend (maybe of another VIP that reused the VIP id), the
 * generations differ and the flow starts over instead of following the id to its new owner.
 */
struct flow_val {
	__u32 backend_id;
	__u16 gen;     /* struct backend.gen when the flow started */
	__u16 pad;     /* lbx_flows: LBX_FLOW_F_* flags; lbx_half_open: the low 16 bits of the SYN's
			* now_units() (select.h half_open()). Named pad still: upgrades keep pinned tables */
};

/*
 * One slot of the half-open table (maps.h, select.h): a flow and its choice, and check, which
 * binds the two (select.h ho_check()) and is written last, so a reader that races a writer on
 * another CPU (or two writers that raced) sees a mismatch, a miss, never one flow's key with
 * another's choice. check 0: empty. 64 bytes: a slot is one cache line.
 */
struct half_open_slot {
	struct flow_key key;
	struct flow_val val;     /* pad: the low 16 bits of the SYN's now_units() */
	__u32 check;
	__u32 pad[3];
};
_Static_assert(sizeof(struct half_open_slot) == 64, "one cache line");

struct half_open_bucket {
	struct half_open_slot way[LBX_HALF_OPEN_WAYS];
};
_Static_assert(sizeof(struct half_open_bucket) == 64 * LBX_HALF_OPEN_WAYS, "lbxdp/maps.py reads slots of 64 bytes");
#define LBX_FLOW_F_COUNTED 0x01 /* its opening was counted in lbx_conns (sched.h) */
#define LBX_FLOW_F_CLOSED 0x02  /* a FIN or RST from the client was seen: no longer counted */
_Static_assert(sizeof(struct flow_val) == 8, "also update lbxdp/abi.py");

/* Per-CPU traffic counters of one VIP or one backend. */
struct lbx_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};
_Static_assert(sizeof(struct lbx_stats) == 24, "also update lbxdp/abi.py");

/* lbx_ctl flags. */
#define LBX_CTL_F_MAC_SET 0x0001 /* mac holds the interface's MAC; without it nothing is forwarded */
#define LBX_CTL_F_NO_ICMP_STEER 0x0002 /* test switch: pass ICMP errors instead of steering them */

/* Health probes through the tunnel (probe.c): a probe socket's SO_MARK is LBX_PROBE_MARK | the
 * backend entry's id (ids stay below 2^16: LBX_MAX_BACKENDS), so tc egress knows whom it is for. */
#define LBX_PROBE_MARK 0x6c620000
#define LBX_PROBE_MARK_MASK 0xffff0000

/*
 * Per-instance data the program reads (Katran's ctl_array): one entry, written by the control
 * plane at attach and whenever the interface's MAC changes. The routed modes' fields are laid
 * out now, zero and unread, so that the layout is final and the pinned map is kept across the
 * upgrades that start using them: the balancer's own addresses (the outer source of IPIP/GUE,
 * issue 10; the SNAT source and the address NAT replies come back to, issue 12) and the
 * gateway's MAC per family (the next hop of NAT replies towards clients, issue 12).
 */
struct lbx_ctl {
	__u8 mac[6];          /* the interface's MAC: only frames sent to it are forwarded */
	__u16 flags;          /* LBX_CTL_F_* */
	__be32 own_v4;        /* the balancer's IPv4 address on this interface: outer source (ipip, gue); 0 = none */
	struct lbx_addr own_v6; /* its IPv6 address: the IPv6 outer source; :: = none */
	__u8 gw_mac_v4[6];    /* unused yet: the IPv4 default gateway's MAC */
	__u8 gw_mac_v6[6];    /* unused yet: the IPv6 default gateway's MAC */
	/* ipip_source = "flow" (LBX_ENC_F_FLOW_SOURCE): the outer source is a prefix's address with
	 * its host bits from the flow hash, so receivers' RSS/ECMP spread flows (Katran's trick). */
	__be32 flow_src_v4;      /* the IPv4 prefix's network address */
	__be32 flow_src_v4_mask; /* its netmask; the other bits come from the flow hash */
	__be32 flow_src_v6[2];   /* the top 64 bits of the IPv6 prefix (a /64 or shorter); the low 64 from the hash */
	__u32 flood_threshold; /* records (and, separately, pure SYNs) per second per CPU past which
			       * bare ACKs are not recorded (and SYNs skip the connection table,
			       * select.h); 0 = LBX_FLOOD_THRESHOLD */
	__u8 reserved[4];     /* zero */
};
_Static_assert(sizeof(struct lbx_ctl) == 64, "also update lbxdp/abi.py");

/* Per-CPU new-flow flood state (select.h, lbx_flood). Written by the program only. */
struct lbx_flood {
	__u64 window;   /* bpf_ktime_get_ns() when this CPU's one-second window began */
	__u64 inserts;  /* connection-table records (and skipped ones) in that window */
	__u64 skipped;  /* inserts skipped because the window was over the threshold, ever */
	__u64 half_open; /* half-open entries written, ever */
	__u64 syns;     /* pure SYNs in that window */
};
_Static_assert(sizeof(struct lbx_flood) == 40, "also update lbxdp/abi.py");

/*
 * lbx_conns[backend id]: open connections of a LBX_BE_F_COUNTED backend entry (sched.h, issue 13),
 * shared by all CPUs and changed with atomic adds (a choice compares two backends' global counts;
 * per-CPU counts would need every CPU's value read per candidate). +1 when a flow is recorded,
 * -1 at the client's first FIN or RST; timeouts and evictions are corrected by the control plane's
 * recount from lbx_flows (lbxdp.maps.Maps.recount_conns). Signed: a close after a recount may dip.
 */
struct lbx_conns {
	__s64 open;       /* open connections */
	__u64 cap_hits;   /* new flows this backend refused at its max_conns, ever */
};
_Static_assert(sizeof(struct lbx_conns) == 16, "also update lbxdp/abi.py");

/*
 * lbx_backups[VIP id]: the VIP's backup backend entries (issue 13), written by the control plane
 * for a VIP with caps while its table holds primaries (else n = 0). sched.h reads it only when
 * every primary candidate is at its max_conns: a new flow then goes to the first backup (from a
 * flow-hash start) that is active, of this VIP and under its own cap, counted per VIP in
 * lbx_overflows; none: on_all_down (LBX_R_{DROP,PASS}_BACKENDS_FULL).
 */
#define LBX_BACKUP_MAX 7
struct lbx_backups {
	__u32 n;                    /* ids used, <= LBX_BACKUP_MAX */
	__u32 id[LBX_BACKUP_MAX];   /* backend entry ids */
};
_Static_assert(sizeof(struct lbx_backups) == 32, "also update lbxdp/abi.py");

/* Per-CPU counters of one reason. */
struct lbx_count {
	__u64 packets;
	__u64 bytes;
};
_Static_assert(sizeof(struct lbx_count) == 16, "also update lbxdp/abi.py");

/*
 * Admission of new flows (bpf/admit.h: acl.h, limit.h; issue 11). A scope is one VIP (its id) or
 * the whole balancer (LBX_ADMIT_GLOBAL, the [balancer] rules), tagged with the family:
 * LBX_ACL_SCOPE(family, id). Written by lbxdp.maps.Maps.write_admission only.
 */
#define LBX_ADMIT_GLOBAL LBX_MAX_VIPS /* lbx_admit index of the [balancer] rules */
#define LBX_RETIRED_ALL LBX_MAX_VIPS  /* lbx_vip_retired index of every retired entry */
#define LBX_ACL_MAX 16384             /* rules (plus each scope's implicit "not allowed" /0) in one trie */
#define LBX_ACL_SCOPE(family, id) ((__u32)(family) << 24 | (id))
#define LBX_ADMIT_F_ACL_V4 0x01       /* the trie has entries of this scope for IPv4 sources */
#define LBX_ADMIT_F_ACL_V6 0x02       /* ... for IPv6 sources */

/* What an ACL trie entry says about the sources it covers (its value). */
enum lbx_acl_action {
	LBX_ACL_ALLOW = 0,
	LBX_ACL_DENY = 1,        /* a deny rule: LBX_R_DROP_ACL_DENY */
	LBX_ACL_NOT_ALLOWED = 2, /* the /0 written beside an allow list: LBX_R_DROP_ACL_NOT_ALLOWED */
};

/* lbx_admit: a scope's new-flow limit (a GCRA token bucket, limit.h) and which ACL entries it has. */
struct lbx_admit {
	__u64 interval_ns; /* 1e9 / rate: a token's worth of time; 0 = no limit */
	__u64 burst_ns;    /* (burst - 1) * interval_ns: how far a source may run ahead of now */
	__u8 flags;        /* LBX_ADMIT_F_* */
	__u8 reserved[7];  /* zero */
};
_Static_assert(sizeof(struct lbx_admit) == 24, "also update lbxdp/abi.py");

/* ACL trie key: the LPM match runs over scope (all 32 bits) then the source's first bits. */
struct acl_key {
	__u32 prefixlen;       /* 32 + the rule's prefix length */
	__u32 scope;           /* LBX_ACL_SCOPE(family, vip id or LBX_ADMIT_GLOBAL) */
	struct lbx_addr addr;  /* the rule's network, network order */
};
_Static_assert(sizeof(struct acl_key) == 24, "also update lbxdp/abi.py");

/*
 * The per-source limiter's buckets (limit.h), in sets of LBX_SRC_LIMIT_WAYS: a source's set is
 * src_set_index() of its identity (abi.h below, mirrored by lbxdp.maps.src_limit_set). tat 0 =
 * an empty way. IPv4: who = scope << 32 | the source (network order, as loaded from the packet:
 * the low 32 bits on a little-endian CPU), one cache line per set.
 */
struct src_way4 {
	__u64 who;             /* (__u64)LBX_ACL_SCOPE(LBX_FAMILY_V4, id) << 32 | source */
	__u64 tat;             /* the GCRA theoretical arrival time (tick_ns() ns); 0 = empty */
};
_Static_assert(sizeof(struct src_way4) == 16, "also update lbxdp/maps.py src_limit_tat");
struct src_set4 {
	struct src_way4 way[LBX_SRC_LIMIT_WAYS];
};
_Static_assert(sizeof(struct src_set4) == 64, "also update lbxdp/abi.py");

/* IPv6: the source's /64 (its first 8 bytes as loaded) and the scope. */
struct src_way6 {
	__u64 net;             /* the /64 */
	__u64 scope;           /* LBX_ACL_SCOPE(LBX_FAMILY_V6, id) */
	__u64 tat;
};
_Static_assert(sizeof(struct src_way6) == 24, "also update lbxdp/maps.py src_limit_tat");
struct src_set6 {
	struct src_way6 way[LBX_SRC_LIMIT_WAYS];
};
_Static_assert(sizeof(struct src_set6) == 96, "also update lbxdp/abi.py");

/* A source's set (limit.h src_set_index): x = v4: source ^ scope * LBX_SRC_SCOPE_MUL; v6: the
 * /64's two words ^ scope * LBX_SRC_SCOPE_MUL; then (x * LBX_VIP_FILTER_MUL mod 2^32) *
 * LBX_SRC_LIMIT_SETS >> 32: the product's high bits scaled to the set count. */
#define LBX_SRC_SCOPE_MUL 0x85EBCA77u
#define LBX_SRC_LIMIT_SETS (LBX_SRC_LIMIT_CAPACITY / LBX_SRC_LIMIT_WAYS)

/*
 * NAT (issue 12): bpf/nat.h (client -> backend), bpf/return_path.h (backend -> client).
 * Conntrack is lbx_nat: every connection has two entries, one per direction, keyed by the tuple
 * that direction's packets carry on arrival (the forward key: client -> VIP as received; the
 * reply key: backend -> client (DNAT) or backend -> SNAT address:port (SNAT)). Each entry says
 * how to rewrite its direction (the addresses and ports to write), so a packet costs one lookup.
 * The peer entry's key is the entry's rewritten tuple reversed (nat.h: nat_peer_key()).
 * Time is bpf_ktime_get_coarse_ns() >> LBX_NAT_TIME_SHIFT (~1.05 ms units, CLOCK_MONOTONIC; u32
 * arithmetic, so it wraps after ~52 days and only differences are compared).
 */
#define LBX_NAT_F_SNAT 0x01       /* struct backend.nat_flags: also rewrite the source (SNAT) */
#define LBX_NAT_TIME_SHIFT 20
#define LBX_NAT_PORT_TRIES 8      /* SNAT port candidates tried before LBX_R_DROP_NAT_NO_PORT */
#ifndef LBX_NAT_CAPACITY
#define LBX_NAT_CAPACITY 131072   /* lbx_nat entries: two per connection */
#endif
#ifndef LBX_NAT_NEW_CAPACITY
#define LBX_NAT_NEW_CAPACITY 65536 /* lbx_nat_new slots: two per new connection (a TCP handshake its
				    * client has not acknowledged, a UDP flow before its client's second
				    * datagram); a flood churns only these (README: how long one survives
				    * a flood: ~capacity / 2 / flooding packets per second). A power of two */
#endif
#define LBX_NAT_NEW_WAYS 4          /* slots per bucket of lbx_nat_new (struct nat_new_bucket) */

/* Connection state of a lbx_nat entry; the entry's timeout is lbx_nat_cfg's for its state. */
enum lbx_nat_state {
	LBX_NAT_SYN_SENT = 0,     /* TCP: the client's SYN seen, no SYN-ACK yet (timeout tcp_syn) */
	LBX_NAT_ESTABLISHED = 1,  /* TCP: the backend's SYN-ACK seen (tcp_established) */
	LBX_NAT_CLOSING = 2,      /* TCP: a FIN or RST seen from either side (tcp_close) */
	LBX_NAT_UDP = 3,          /* UDP (udp) */
	LBX_NAT_STATES = 4,
};

/* Which direction a lbx_nat entry's key is. */
enum lbx_nat_dir {
	LBX_NAT_DIR_FWD = 0,      /* client -> VIP: rewritten to go to the backend */
	LBX_NAT_DIR_REPLY = 1,    /* backend -> client / SNAT address: rewritten to come from the VIP */
};

/* lbx_nat value: how to rewrite a packet of this entry's direction, and the connection's state. */
struct nat_entry {
	struct lbx_addr saddr;    /* the source to write (fwd: SNAT address or the client; reply: the VIP) */
	struct lbx_addr daddr;    /* the destination to write (fwd: the backend; reply: the client) */
	__be16 sport;             /* the source port to write, network order */
	__be16 dport;             /* the destination port to write, network order */
	__u8 mac[6];              /* reply: the next hop towards the client (the source MAC of the
				   * connection's first packet); fwd: unused (the backend entry's mac) */
	__u8 dir;                 /* enum lbx_nat_dir */
	__u8 state;               /* enum lbx_nat_state (both entries of a connection keep it alike) */
	__u32 backend_id;         /* the backend entry the connection went to */
	__u16 gen;                /* that entry's struct backend.gen */
	__u8 family;              /* LBX_FAMILY_* */
	__u8 proto;               /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 seen;               /* last packet of this direction (LBX_NAT_TIME_SHIFT units) */
	__u32 timeout;            /* the state's timeout (same units); past seen + timeout = absent */
	__u32 created;            /* when the connection's first packet came (same units) */
};
_Static_assert(sizeof(struct nat_entry) == 64, "also update lbxdp/abi.py");

/*
 * lbx_nat_new, the handshake table (maps.h, nat.h hs_*): a set-associative array like the
 * half-open table, not a hash. A bucket's first cache line holds its ways' checks: way i's is its
 * key's hs_hash() | 1 (0: empty), written last, so a slot being written reads as a miss; the
 * bucket is the hash of the key's client side (hs_bucket_hash(): a forward key's source, a reply
 * key's destination), so a DNAT connection's two slots share one. A lookup that misses reads that one line, not one per way. The entry
 * changes in place, as in lbx_nat. A slot is 128 bytes: its key and entry span two lines.
 */
struct nat_new_slot {
	struct flow_key key;
	struct nat_entry e;
	__u8 reserved[24];
};
_Static_assert(sizeof(struct nat_new_slot) == 128, "lbxdp/maps.py reads slots of 128 bytes");

struct nat_new_bucket {
	__u32 check[LBX_NAT_NEW_WAYS];
	__u8 reserved[64 - 4 * LBX_NAT_NEW_WAYS];
	struct nat_new_slot way[LBX_NAT_NEW_WAYS];
};
_Static_assert(sizeof(struct nat_new_bucket) == 64 + 128 * LBX_NAT_NEW_WAYS, "lbxdp/maps.py reads this layout");

/* lbx_nat_cfg[0]: the instance's NAT settings ([balancer] snat_*, nat_timeouts). Written by
 * lbxdp.maps.Maps.set_nat_cfg only. */
struct nat_cfg {
	struct lbx_addr snat_v6;  /* SNAT source (IPv6); :: = none */
	__be32 snat_v4;           /* SNAT source (IPv4), network order; 0 = none */
	__u16 port_min;           /* the SNAT port pool, host order, inclusive; per address and protocol */
	__u16 port_max;
	__u32 timeout[LBX_NAT_STATES]; /* by enum lbx_nat_state, LBX_NAT_TIME_SHIFT units */
	__u32 reserved[2];        /* zero */
};
_Static_assert(sizeof(struct nat_cfg) == 48, "also update lbxdp/abi.py");

/*
 * lbx_nat_be[backend id]: per backend entry state written by the program: passive-health
 * signals (issue 12; only a handshake's events, with atomic adds, never an established packet)
 * and the SNAT port allocator's cursor. The control plane reads the signals and zeroes an entry
 * when its id gets a new owner. Despite its name it serves every mode: a DSR/ipip/gue VIP with
 * LBX_VIP_F_PASSIVE counts there too (select.h: a SYN retransmitted while half-open is a failure in
 * syn_retx, the handshake's ACK a success in synack; syn_rst stays 0: no replies are seen).
 */
struct nat_backend {
	__u32 consecutive;        /* failed handshakes since the last SYN-ACK (a SYN-ACK resets it to 0) */
	__u32 last_failure;       /* when the last one was seen (LBX_NAT_TIME_SHIFT units) */
	__u64 syn_rst;            /* RSTs answering a SYN (the connection was SYN_SENT), ever */
	__u64 syn_retx;           /* clients' SYNs retransmitted while SYN_SENT, ever */
	__u64 synack;             /* SYN-ACKs (successful handshakes), ever */
	__u32 port_cursor;        /* SNAT: index into the pool of the next port to try (program only) */
	__u32 reserved;           /* zero */
	/* dsr/ipip/gue with LBX_VIP_F_PASSIVE only (select.h passive_syn()): handshakes started and
	 * not yet seen to finish, so that the control plane sees a silent backend before any client's
	 * retransmission (its 1 s RTO). NAT leaves them 0. */
	__u64 pending_since;      /* bpf_ktime_get_coarse_ns() of the first SYN since the last handshake's ACK; 0: none */
	__u64 syn_sent;           /* first SYNs (new handshakes) sent to this backend, ever */
	__u32 pending;            /* first SYNs since the last handshake's ACK (the ACK sets 0) */
	__u32 reserved2;          /* zero */
};
_Static_assert(sizeof(struct nat_backend) == 64, "also update lbxdp/abi.py");

/* lbx_nat_scratch[0]: a CPU's room to build a new connection's entries and keys (nat.h), which
 * do not fit the program's 512-byte stack beside the rest of the pipeline. Program only. */
struct nat_scratch {
	struct nat_entry fwd;
	struct nat_entry rep;
	struct flow_key rk;       /* the reply key */
	struct flow_key k;        /* a peer's key */
};
_Static_assert(sizeof(struct nat_scratch) == 208, "also update lbxdp/abi.py");

/*
 * QUIC connection-ID routing (bpf/quic.h, issue 13). A backend's server id is 16 bits carried in
 * bytes 1-2 (network order) of the connection IDs the server issues; byte 0 and the rest are the
 * server's. lbx_quic_ids maps (VIP id, server id) to the backend entry; written by
 * lbxdp.maps.Maps.write_quic_ids only. A backend down (health) keeps its entry, flagged, so that
 * its packets fall back to the table counted as LBX_QUIC_DOWN_ID rather than as unknown.
 */
#define LBX_QUIC_SID_OFF 1       /* first DCID byte of the server id */
#define LBX_QUIC_SID_END 3       /* DCID bytes a routable connection ID needs */
#define LBX_QUIC_F_DOWN 0x01     /* struct quic_id_val.flags: the backend is down */
#define LBX_QUIC_V1 0x00000001   /* RFC 9000 */
#define LBX_QUIC_V2 0x6b3343cf   /* RFC 9369: long-header types renumbered */

struct quic_id_key {
	__u32 vip_id;
	__u32 server_id;          /* 1-65535 */
};
_Static_assert(sizeof(struct quic_id_key) == 8, "also update lbxdp/abi.py");

struct quic_id_val {
	__u32 backend_id;         /* the backend entry */
	__u16 gen;                /* its struct backend.gen when written */
	__u8 flags;               /* LBX_QUIC_F_* */
	__u8 pad;                 /* zero */
};
_Static_assert(sizeof(struct quic_id_val) == 8, "also update lbxdp/abi.py");

/*
 * lbx_quic_sid[server id]: the same entry, direct by the 16-bit id, for ONE of the VIPs that use
 * the id (the lowest VIP id: lbxdp.maps.Maps.write_quic_ids); quic.h reads it first (an inlined
 * array lookup) and the hash only when the slot is another VIP's or empty (val.backend_id 0: ids
 * are never 0). Written after lbx_quic_ids, cleared before an entry leaves it.
 */
struct quic_sid_val {
	__u32 vip_id;
	struct quic_id_val val;
};
_Static_assert(sizeof(struct quic_sid_val) == 12, "also update lbxdp/abi.py");

/* What a QUIC VIP's UDP packet that the connection table did not know went by (lbx_quic_stats). */
enum lbx_quic_reason {
	LBX_QUIC_BY_ID = 0,       /* Handshake or short header: the backend its server id names */
	LBX_QUIC_INITIAL,         /* Initial or 0-RTT (v1 or v2): the VIP's table */
	LBX_QUIC_UNKNOWN_ID,      /* Handshake or short header whose server id no live backend of the VIP has: table */
	LBX_QUIC_DOWN_ID,         /* ... whose server id names a backend that is down: table */
	LBX_QUIC_SHORT_CID,       /* a connection ID shorter than LBX_QUIC_SID_END, or a truncated header: table */
	LBX_QUIC_OTHER,           /* Retry (a server's), version negotiation, an unknown version, not QUIC: table */
	LBX_QUIC_MAX,
};

#endif /* LBX_ABI_H */
