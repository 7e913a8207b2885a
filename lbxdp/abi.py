"""The Python face of bpf/abi.h: its enums and constants, nothing else.

Struct layouts are never re-declared here: bcc compiles them and lbxdp.loader turns its type
descriptions into ctypes. tests/unit/test_abi_drift.py parses the header and fails when a name
or a value below differs from it.
"""

from __future__ import annotations

import enum

MAX_VIPS = 1024          # LBX_MAX_VIPS (default; BuildConfig may override)
MAX_BACKENDS = 16384     # LBX_MAX_BACKENDS
FLOW_CAPACITY = 65536    # LBX_FLOW_CAPACITY
HALF_OPEN_CAPACITY = 65536  # LBX_HALF_OPEN_CAPACITY (slots)
HALF_OPEN_WAYS = 4       # LBX_HALF_OPEN_WAYS (slots per bucket)
TIME_SHIFT = 30          # LBX_TIME_SHIFT: the program's clock is CLOCK_MONOTONIC ns >> this
SETTLE_UNITS = 2         # LBX_SETTLE_UNITS
FLOOD_THRESHOLD = 10000  # LBX_FLOOD_THRESHOLD: default inserts per second per CPU
TABLE_MAX = 1048576     # LBX_TABLE_MAX
TABLE_SLOTS_PER_WORD = 4  # LBX_TABLE_SLOTS_PER_WORD: 16-bit backend ids per 8-byte table value
VIP_BACKENDS_MAX = 1024  # LBX_VIP_BACKENDS_MAX
VIP_FILTER_BITS = 16     # LBX_VIP_FILTER_BITS
VIP_FILTER_WORDS = 1024  # LBX_VIP_FILTER_WORDS
VIP_FILTER_MUL = 0x9E3779B1  # LBX_VIP_FILTER_MUL
ACL_MBT_WORDS = 1 << 19  # LBX_ACL_MBT_WORDS: words of the ACL blob (bpf/acl.h, lbxdp/acl_mbt.py)
ACL_MBT_PAD = 64         # LBX_ACL_MBT_PAD: words after them (a leaf read at a masked offset stays inside)

FAMILY_V4 = 4            # LBX_FAMILY_V4
FAMILY_V6 = 6            # LBX_FAMILY_V6

BE_F_ACTIVE = 0x01       # LBX_BE_F_ACTIVE
BE_F_IN_TABLE = 0x02     # LBX_BE_F_IN_TABLE
BE_F_COUNTED = 0x04      # LBX_BE_F_COUNTED (issue 13: open connections counted in lbx_conns)
VIP_F_CAPS = 0x02        # LBX_VIP_F_CAPS (some backend has max_conns)
VIP_F_QUIC = 0x04        # LBX_VIP_F_QUIC (QUIC connection-ID routing, bpf/quic.h)
VIP_F_ADMIT = 0x08       # LBX_VIP_F_ADMIT (the VIP or the global scope has an ACL or a limit)
VIP_F_PASSIVE = 0x10     # LBX_VIP_F_PASSIVE (issue 13: passive health of a non-NAT VIP, bpf/select.h)
FLOW_F_COUNTED = 0x01    # LBX_FLOW_F_COUNTED
FLOW_F_CLOSED = 0x02     # LBX_FLOW_F_CLOSED
CONNS_SIZE = 16          # sizeof(struct lbx_conns)
LC_PEERS = 3             # LBX_LC_PEERS: struct backend.lc_peer (leastconn's second candidates)
BACKUP_MAX = 7           # LBX_BACKUP_MAX (issue 13: backups a capped VIP overflows to)
BACKUPS_SIZE = 32        # sizeof(struct lbx_backups)
VIP_F_PASS_NO_BACKEND = 0x01  # LBX_VIP_F_PASS_NO_BACKEND
CTL_F_MAC_SET = 0x0001   # LBX_CTL_F_MAC_SET
CTL_F_NO_ICMP_STEER = 0x0002  # LBX_CTL_F_NO_ICMP_STEER
PROBE_MARK = 0x6C620000      # LBX_PROBE_MARK
PROBE_MARK_MASK = 0xFFFF0000  # LBX_PROBE_MARK_MASK
ENC_F_FLOW_SOURCE = 0x01  # LBX_ENC_F_FLOW_SOURCE
ENCAP_TTL = 64           # LBX_ENCAP_TTL
GUE_SPORT_BASE = 0xC000  # LBX_GUE_SPORT_BASE
GUE_SPORT_MASK = 0x3FFF  # LBX_GUE_SPORT_MASK
ICMP4_QUOTE = 548        # LBX_ICMP4_QUOTE
ICMP6_QUOTE = 1232       # LBX_ICMP6_QUOTE
# Admission of new flows (bpf/admit.h, acl.h, limit.h)
SRC_LIMIT_CAPACITY = 65536  # LBX_SRC_LIMIT_CAPACITY: buckets per family and CPU
SRC_LIMIT_WAYS = 4       # LBX_SRC_LIMIT_WAYS: buckets per set
SRC_SCOPE_MUL = 0x85EBCA77  # LBX_SRC_SCOPE_MUL
SRC_SET4_SIZE = 64       # sizeof(struct src_set4)
SRC_SET6_SIZE = 96       # sizeof(struct src_set6)
ACL_MAX = 16384          # LBX_ACL_MAX
ADMIT_F_ACL_V4 = 0x01    # LBX_ADMIT_F_ACL_V4
ADMIT_F_ACL_V6 = 0x02    # LBX_ADMIT_F_ACL_V6
ADMIT_SIZE = 24          # sizeof(struct lbx_admit)


def acl_scope(family: int, scope_id: int) -> int:
    """LBX_ACL_SCOPE(family, id): the scope word of an ACL or limiter key."""
    return family << 24 | scope_id


class AclAction(enum.IntEnum):
    """enum lbx_acl_action: the value of an ACL trie entry."""
    ALLOW = 0
    DENY = 1
    NOT_ALLOWED = 2


# NAT (bpf/nat.h, bpf/return_path.h, issue 12)
NAT_F_SNAT = 0x01        # LBX_NAT_F_SNAT (struct backend.nat_flags)
NAT_TIME_SHIFT = 20      # LBX_NAT_TIME_SHIFT: lbx_nat times are CLOCK_MONOTONIC ns >> this
NAT_PORT_TRIES = 8       # LBX_NAT_PORT_TRIES
NAT_CAPACITY = 131072    # LBX_NAT_CAPACITY (entries: two per connection)
NAT_NEW_CAPACITY = 65536 # LBX_NAT_NEW_CAPACITY (slots: two per new connection, not yet assured)
NAT_NEW_WAYS = 4         # LBX_NAT_NEW_WAYS (slots per bucket of lbx_nat_new)
NAT_NEW_SLOT = 128       # sizeof(struct nat_new_slot): flow_key at 0, nat_entry at 40 (after the bucket's 64-byte line of checks)
NAT_ENTRY_SIZE = 64      # sizeof(struct nat_entry)
NAT_CFG_SIZE = 48        # sizeof(struct nat_cfg)
NAT_BACKEND_SIZE = 64    # sizeof(struct nat_backend)


class NatState(enum.IntEnum):
    """enum lbx_nat_state: a lbx_nat entry's connection state (its timeout is the state's)."""
    SYN_SENT = 0
    ESTABLISHED = 1
    CLOSING = 2
    UDP = 3
    STATES = 4


class NatDir(enum.IntEnum):
    """enum lbx_nat_dir: which direction a lbx_nat entry's key is."""
    FWD = 0
    REPLY = 1


CTL_SIZE = 64            # sizeof(struct lbx_ctl)
BACKEND_SIZE = 64        # sizeof(struct backend)

PROGRAM = "lbxdp_ingress"
STUB_PROGRAM = "xdp_stub"


class Sched(enum.IntEnum):
    """enum lbx_sched"""

    RR = 0
    HASH = 1
    MAGLEV = 2
    SOURCE = 3
    LEASTCONN = 4


class FwdMode(enum.IntEnum):
    """enum lbx_fwd_mode"""

    DSR = 0
    IPIP = 1
    GUE = 2
    NAT = 3


class Reason(enum.IntEnum):
    """enum lbx_reason: why the program returned its verdict. The prefix is the verdict."""

    OK = 0
    TX_FORWARD = 1
    PASS_NOT_IP = 2
    PASS_NOT_VIP = 3
    PASS_NOT_L4 = 4
    PASS_TRUNCATED = 5
    PASS_BAD_HEADER = 6
    PASS_FRAGMENT = 7
    PASS_IP_OPTIONS = 8
    PASS_IPV6_EXT = 9
    PASS_NO_BACKEND = 10
    DROP_NO_BACKEND = 11
    DROP_BACKEND_GONE = 12
    ABORT_REWRITE = 13
    PASS_NOT_FOR_US = 14
    PASS_NO_OWN_MAC = 15
    PASS_BAD_IP_LEN = 16
    PASS_BAD_TCP_LEN = 17
    PASS_BAD_UDP_LEN = 18
    PASS_TTL_ZERO = 19
    DROP_BAD_SOURCE = 20
    DROP_UNKNOWN_MODE = 21
    DROP_UNKNOWN_SCHED = 22
    TX_ICMP_STEERED = 23
    PASS_ICMP_ECHO = 24
    PASS_ICMP_BAD_QUOTE = 25
    PASS_ICMP_QUOTE_EXT = 26
    PASS_ICMP_MTU_TOO_SMALL = 27
    PASS_ICMP_FROM_CLIENT = 28
    PASS_ICMP_NO_FLOW = 29
    PASS_ICMP_STEER_OFF = 30
    TX_ICMP_TOO_BIG = 31
    DROP_TOO_BIG = 32
    DROP_NO_OWN_ADDR = 33
    DROP_SRC_RATE = 34
    DROP_ACL_DENY = 35
    DROP_ACL_NOT_ALLOWED = 36
    TX_NAT_REPLY = 37
    TX_NAT_ICMP_REPLY = 38
    PASS_NAT_NO_FLOW = 39
    DROP_NAT_NO_PORT = 40
    DROP_NAT_TUPLE_TAKEN = 41
    PASS_NAT_ICMP_NO_FLOW = 42
    DROP_BACKENDS_FULL = 43
    PASS_BACKENDS_FULL = 44
    MAX = 45

    @property
    def verdict(self) -> str:
        """'tx', 'pass', 'drop' or 'abort'."""
        return self.name.split("_", 1)[0].lower()

    @property
    def label(self) -> str:
        """The reason without its verdict, lower case: 'not_vip'."""
        return self.name.split("_", 1)[1].lower()

    @classmethod
    def exits(cls) -> list["Reason"]:
        """Every reason the program can return with (all but OK and MAX)."""
        return [r for r in cls if r not in (cls.OK, cls.MAX)]


class Map(str, enum.Enum):
    """Map names, as declared in bpf/maps.h (under 16 characters: the kernel keeps 15)."""

    VIPS = "lbx_vips"
    VIP_FILTER = "lbx_vip_filter"
    BACKENDS = "lbx_backends"
    TABLE_TMPL = "lbx_table_tmpl"
    TABLES = "lbx_tables"
    FLOWS = "lbx_flows"
    HALF_OPEN = "lbx_half_open"
    FLOOD = "lbx_flood"
    RR = "lbx_rr"
    VIP_RETIRED = "lbx_vip_retired"
    BE_STATS = "lbx_be_stats"
    REASONS = "lbx_reasons"
    CTL = "lbx_ctl"
    ADMIT = "lbx_admit"
    ACL_TMPL = "lbx_acl_tmpl"
    ACL = "lbx_acl"
    MBT_TMPL = "lbx_mbt_tmpl"
    ACL_MBT = "lbx_acl_mbt"
    SRC_LIMIT = "lbx_src_limit"
    SRC_LIMIT4 = "lbx_src_limit4"
    NAT = "lbx_nat"
    NAT_NEW = "lbx_nat_new"
    NAT_CFG = "lbx_nat_cfg"
    NAT_FILTER = "lbx_nat_filter"
    NAT_BE = "lbx_nat_be"
    NAT_SCRATCH = "lbx_nat_scratch"
    CONNS = "lbx_conns"
    BACKUPS = "lbx_backups"
    BACKUP_OVERFLOWS = "lbx_overflows"
    QUIC_IDS = "lbx_quic_ids"
    QUIC_STATS = "lbx_quic_stats"
    QUIC_VIP = "lbx_quic_vip"
    QUIC_SID = "lbx_quic_sid"


LEGACY_VIP_STATS = "lbx_vip_stats"
"""The per-CPU VIP counters the program wrote per packet until lbx_vip_retired replaced them
(lbxdp.migrate fills lbx_vip_retired from this pin and removes it)."""


# --- QUIC connection-ID routing (bpf/quic.h, issue 13) -------------------------------------------
QUIC_SID_OFF = 1         # LBX_QUIC_SID_OFF: the server id is DCID bytes 1-2, network order
QUIC_SID_END = 3         # LBX_QUIC_SID_END
QUIC_F_DOWN = 0x01       # LBX_QUIC_F_DOWN
QUIC_V1 = 0x00000001     # LBX_QUIC_V1
QUIC_V2 = 0x6B3343CF     # LBX_QUIC_V2
QUIC_SERVER_ID_MAX = 0xFFFF
QUIC_SID_VAL_SIZE = 12   # sizeof(struct quic_sid_val): lbx_quic_sid, direct by server id


class QuicReason(enum.IntEnum):
    """enum lbx_quic_reason: how a QUIC VIP's new-tuple packet was routed (lbx_quic_stats)."""
    BY_ID = 0
    INITIAL = 1
    UNKNOWN_ID = 2
    DOWN_ID = 3
    SHORT_CID = 4
    OTHER = 5
    MAX = 6


# --- lbxdp_decap (bpf/decap_abi.h, bpf/decap_maps.h): the backend's decapsulation program -----

DECAP_PROGRAM = "lbxdp_decap"
PROBE_PROGRAM = "lbxdp_probe"   # bpf/probe.c: tc egress, health probes through the tunnel
DECAP_SLOT_BITS = 12       # LBX_DECAP_SLOT_BITS
DECAP_SLOTS = 4096         # LBX_DECAP_SLOTS
DECAP_PROBES = 8           # LBX_DECAP_PROBES
DECAP_MAX_ENTRIES = 1024   # LBX_DECAP_MAX_ENTRIES
DECAP_MAX_VIPS = 1024      # LBX_DECAP_MAX_VIPS
DECAP_F_HOST = 0x01        # LBX_DECAP_F_HOST
DECAP_F_VIP = 0x02         # LBX_DECAP_F_VIP
DECAP_CTL_F_LOOSE = 0x01   # LBX_DECAP_CTL_F_LOOSE
DECAP_SLOT_SIZE = 20       # sizeof(struct decap_slot)
DECAP_CTL_SIZE = 16        # sizeof(struct decap_ctl)


class DecapReason(enum.IntEnum):
    """enum lbx_decap_reason (prefix LBX_D_): why lbxdp_decap passed a frame, and whether opened."""

    OK = 0
    PASS_DECAP = 1
    PASS_NOT_TUNNEL = 2
    PASS_NOT_LOCAL = 3
    PASS_OUTER_FRAGMENT = 4
    PASS_OUTER_OPTIONS = 5
    PASS_TRUNCATED_OUTER = 6
    PASS_TRUNCATED_INNER = 7
    PASS_BAD_INNER = 8
    PASS_NOT_VIP = 9
    PASS_GUE_UNSUPPORTED = 10
    PASS_ADJUST_FAILED = 11
    MAX = 12

    @property
    def label(self) -> str:
        """The reason without its verdict, lower case: 'not_vip'."""
        return self.name.split("_", 1)[1].lower()

    @classmethod
    def exits(cls) -> list["DecapReason"]:
        return [r for r in cls if r not in (cls.OK, cls.MAX)]


class DecapMap(str, enum.Enum):
    """Map names of lbxdp_decap, as declared in bpf/decap_maps.h."""

    CTL = "lbxd_ctl"
    ADDRS = "lbxd_addrs"
    VIP_STATS = "lbxd_vip_stats"
    REASONS = "lbxd_reasons"
