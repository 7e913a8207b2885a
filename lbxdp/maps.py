"""The only module that converts between model values and map structs.

Struct types come from bcc (via lbxdp.loader's schema), never from a Python re-declaration;
make() builds one and refuses field names the compiled C does not have.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import errno
import ipaddress
import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Iterable, Iterator

from . import abi, acl_mbt, bpfsys, model


TABLES_PER_SWAP = 256
"""New tables swapped into lbx_tables per write (each write waits an RCU grace period); as
many file descriptors are open at once."""


def make(struct_t: type, **fields: Any) -> Any:
    """struct_t(**fields), except that a field the compiled struct lacks is an error.

    (Plain ctypes silently accepts a misspelled keyword and leaves the real field zero.)
    """
    known = {f[0] for f in struct_t._fields_}
    unknown = set(fields) - known
    if unknown:
        raise TypeError(f"{struct_t.__name__} has no field(s) {sorted(unknown)}; it has {sorted(known)}")
    s = struct_t()
    for k, v in fields.items():
        if isinstance(v, (bytes, bytearray)):
            dst = getattr(struct_t, k)
            ctypes.memmove(ctypes.addressof(s) + dst.offset, bytes(v), min(len(v), dst.size))
        else:
            setattr(s, k, v)
    return s


def addr_bytes(addr: model.IPAddress) -> bytes:
    """An address as struct lbx_addr holds it: 16 bytes, network order, IPv4 zero-padded."""
    return addr.packed.ljust(16, b"\0")


def addr_from(a: Any, fam: int) -> model.IPAddress:
    raw = bytes(a)
    return ipaddress.IPv4Address(raw[:4]) if fam == abi.FAMILY_V4 else ipaddress.IPv6Address(raw)


def filter_bit(addr: model.IPAddress) -> int:
    """addr's bit in the VIP address filter: what may_be_vip() (bpf/classify.h) computes."""
    w = struct.unpack("=4I", addr_bytes(addr))  # the words as the CPU loads them
    return (((w[0] ^ w[1] ^ w[2] ^ w[3]) * abi.VIP_FILTER_MUL) & 0xFFFFFFFF) >> (32 - abi.VIP_FILTER_BITS)


def filter_words(addrs: set[model.IPAddress] | frozenset[model.IPAddress]) -> dict[int, int]:
    """The filter words (index -> 64 bits) that have the bits of addrs set; other words are zero."""
    words: dict[int, int] = {}
    for a in addrs:
        bit = filter_bit(a)
        words[bit // 64] = words.get(bit // 64, 0) | 1 << (bit % 64)
    return words


def _next_gen(gen: int) -> int:
    """struct backend.gen after gen: 1..65535, wrapping past 0."""
    return gen % 0xFFFF + 1


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_str(raw: Any) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


@dataclass(frozen=True)
class VipMeta:
    id: int
    table_size: int
    sched: abi.Sched
    mode: abi.FwdMode
    table_tag: int = 0
    flags: int = 0
    changed_at: int = 0   # when the table last changed, in the program's clock (now_units()); 0 = settled
    src_prefix: int = 0   # source scheduler: client address bits hashed (bpf/sched.h)


def now_units() -> int:
    """The program's clock for vip_meta.changed_at: CLOCK_MONOTONIC ns >> LBX_TIME_SHIFT (never 0)."""
    return max(1, time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> abi.TIME_SHIFT) & 0xFFFFFFFF


# --- the half-open table's slots (bpf/abi.h struct half_open_slot, bpf/select.h) -----------------
HO_SLOT = 64             # sizeof(struct half_open_slot)
HALF_OPEN_UNITS = 64     # bpf/select.h LBX_HALF_OPEN_UNITS: older entries are ignored
_M32 = 0xFFFFFFFF


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def flow_words_hash(src: tuple[int, ...], dst: tuple[int, ...], sport: int, dport: int, proto: int) -> int:
    """flow_hash() of bpf/select.h: the addresses as four 32-bit words each and the ports as
    16-bit words, as an x86 CPU loads them from a struct flow_key (lbxdp.explain uses it too)."""
    h = _mix32(((sport << 16) | dport) ^ (proto << 8))
    for i in range(4):
        h = (_mix32(h ^ src[i]) + dst[i]) & _M32
    return _mix32(h)


def src_limit_set(family: int, src: bytes, scope: int, sets: int) -> int:
    """src_set_index() of bpf/limit.h: the set of the limiter table (of `sets` sets) that holds
    the bucket of a source (struct lbx_addr bytes; IPv6: only its /64 counts) in a scope
    (abi.acl_scope), its words loaded as an x86 CPU loads them."""
    w = struct.unpack_from("<2I", src, 0)
    x = (w[0] if family == abi.FAMILY_V4 else w[0] ^ w[1]) ^ ((scope * abi.SRC_SCOPE_MUL) & _M32)
    return (((x * abi.VIP_FILTER_MUL) & _M32) * sets) >> 32


def src_limit_tat(family: int, src: bytes, scope: int, set_bytes: bytes) -> int | None:
    """The TAT of the source's bucket in one CPU's copy of its set (the raw struct src_set4 or
    src_set6), or None when the set holds none."""
    if family == abi.FAMILY_V4:
        who = scope << 32 | struct.unpack_from("<I", src, 0)[0]
        for off in range(0, len(set_bytes), 16):
            w, tat = struct.unpack_from("<QQ", set_bytes, off)
            if w == who and tat:
                return tat
        return None
    net = struct.unpack_from("<Q", src, 0)[0]
    for off in range(0, len(set_bytes), 24):
        n, sc, tat = struct.unpack_from("<QQQ", set_bytes, off)
        if n == net and sc == scope and tat:
            return tat
    return None


def new_table(name: str, backend_ids: "array.array[int]", flags: int, packed: bool = True) -> int:
    """A filled inner map for lbx_tables (the caller owns the fd): slot -> backend id, packed four
    to a value (bpf/abi.h) unless `packed` is False (a u32 per slot: older programs). flags: the
    template's (the kernel compares them when the map is stored); BPF_F_MMAPABLE is written as
    memory."""
    assert not packed or max(backend_ids, default=0) < 1 << 16, "a packed slot holds a 16-bit backend id"
    mmapable = bool(flags & bpfsys.BPF_F_MMAPABLE)
    if packed:
        fd = bpfsys.array_create(name, bpfsys.table_words(len(backend_ids)), value_size=8, flags=flags)
    else:
        fd = bpfsys.array_create(name, len(backend_ids), flags=flags)
    try:
        if packed:
            bpfsys.table_fill(fd, backend_ids, mmapable=mmapable)
        else:
            bpfsys.array_fill(fd, backend_ids, mmapable=mmapable)
    except BaseException:
        os.close(fd)
        raise
    return fd


def flow_key_hash(key: bytes) -> int:
    """flow_hash() of bpf/select.h over the bytes of a struct flow_key."""
    sport, dport, proto = struct.unpack_from("<HHB", key, 32)
    return flow_words_hash(struct.unpack_from("<4I", key, 0), struct.unpack_from("<4I", key, 16), sport, dport, proto)


@dataclass(frozen=True)
class HalfOpenSlot:
    """One slot: the flow key's bytes, its choice, the low 16 bits of its SYN's now_units(), and
    its check (0: empty; a torn slot's does not hold)."""

    key: bytes
    backend_id: int
    gen: int
    time: int
    check: int

    @classmethod
    def parse(cls, raw: bytes) -> "HalfOpenSlot":
        bid, gen, t, check = struct.unpack_from("<IHHI", raw, 40)
        return cls(bytes(raw[:40]), bid, gen, t, check)

    def pack(self) -> bytes:
        return self.key + struct.pack("<IHHI", self.backend_id, self.gen, self.time, self.check) + bytes(12)

    def expected_check(self) -> int:
        """ho_check() of bpf/select.h."""
        v = _mix32(self.backend_id ^ ((self.gen << 16) | self.time))
        return _mix32(flow_key_hash(self.key) ^ v) | 1

    def valid(self) -> bool:
        return self.check != 0 and self.check == self.expected_check()


@dataclass(frozen=True)
class FloodState:
    """The handshake gate's state (bpf/select.h): the per-CPU insert threshold, how many CPUs are
    over it in their current second, inserts skipped for it and half-open entries written, ever."""
    threshold: int = abi.FLOOD_THRESHOLD
    cpus_flooded: int = 0
    skipped: int = 0
    half_open_written: int = 0


@dataclass(frozen=True)
class Encap:
    """The encap fields of a backend entry (bpf/encap.h reads them); all zero in dsr mode."""
    port: int = 0    # gue: UDP destination port
    flags: int = 0   # abi.ENC_F_*
    mtu: int = 0     # largest outer packet; 0 = no check
    mss: int = 0     # clamp SYNs' MSS to this; 0 = off


@dataclass(frozen=True)
class SchedFields:
    """The scheduling fields of a backend entry (bpf/sched.h, issue 13)."""
    weight: int = 0      # leastconn: the weight scaled to 16 bits (0 counts as 1)
    max_conns: int = 0   # 0 = no cap
    counted: bool = False   # LBX_BE_F_COUNTED: its open connections are counted in lbx_conns


@dataclass(frozen=True)
class Conns:
    """lbx_conns of one backend entry, and its cap."""
    open: int = 0
    cap_hits: int = 0
    max_conns: int = 0


@dataclass(frozen=True)
class OwnAddresses:
    """What lbx_ctl holds for the encap modes: the outer sources and the flow-source prefixes."""
    v4: ipaddress.IPv4Address | None = None
    v6: ipaddress.IPv6Address | None = None
    flow_v4: ipaddress.IPv4Network | None = None
    flow_v6: ipaddress.IPv6Network | None = None


@dataclass(frozen=True)
class NatCfg:
    """What lbx_nat_cfg holds (bpf/abi.h struct nat_cfg): SNAT sources, the port pool, and the
    timeouts in seconds by enum lbx_nat_state."""
    snat_v4: ipaddress.IPv4Address | None = None
    snat_v6: ipaddress.IPv6Address | None = None
    ports: tuple[int, int] = model.DEFAULT_SNAT_PORTS
    timeouts: model.NatTimeouts = model.NatTimeouts()

    def timeout_units(self) -> list[int]:
        """The timeouts as the program compares them: LBX_NAT_TIME_SHIFT units, rounded up."""
        t = self.timeouts
        secs = {abi.NatState.SYN_SENT: t.tcp_syn, abi.NatState.ESTABLISHED: t.tcp_established,
                abi.NatState.CLOSING: t.tcp_close, abi.NatState.UDP: t.udp}
        return [-(-secs[abi.NatState(i)] * 1_000_000_000 >> abi.NAT_TIME_SHIFT) for i in range(abi.NatState.STATES)]


def nat_now() -> int:
    """The program's conntrack clock (nat_now() in bpf/nat.h): CLOCK_MONOTONIC ns >> LBX_NAT_TIME_SHIFT, u32.
    The coarse clock the program reads lags this by at most a tick."""
    return (time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> abi.NAT_TIME_SHIFT) & 0xFFFFFFFF


@dataclass(frozen=True)
class NatEntry:
    """One lbx_nat entry: its key (the tuple its direction's packets carry) and what it writes."""
    dir: abi.NatDir
    src: model.IPAddress
    sport: int
    dst: model.IPAddress
    dport: int
    protocol: model.Protocol
    new_src: model.IPAddress
    new_sport: int
    new_dst: model.IPAddress
    new_dport: int
    state: int            # abi.NatState as stored
    backend_id: int
    gen: int
    mac: str
    seen: int             # nat_now() units
    timeout: int          # units
    created: int
    assured: bool = True  # in lbx_nat; False: lbx_nat_new (a new connection, not yet assured: bpf/maps.h)

    def expired(self, now: int) -> bool:
        """What the program decides: past seen + timeout, the entry counts as absent."""
        return (now - self.seen) & 0xFFFFFFFF > self.timeout


@dataclass(frozen=True)
class NatBackendState:
    """lbx_nat_be[id]: passive-health signals of a NAT backend entry (bpf/nat.h)."""
    consecutive: int = 0
    last_failure: int = 0
    syn_rst: int = 0
    syn_retx: int = 0
    synack: int = 0
    pending_since: int = 0   # dsr/ipip/gue passive health (bpf/select.h passive_syn): CLOCK_MONOTONIC ns, 0 none
    syn_sent: int = 0
    pending: int = 0


@dataclass(frozen=True)
class BackendEntry:
    id: int
    vip_id: int
    address: model.IPAddress
    port: int
    mac: str
    in_table: bool = False
    mode: int = abi.FwdMode.DSR   # enum lbx_fwd_mode as stored (an int: a raw write may hold any value)
    encap: Encap = Encap()
    nat_flags: int = 0            # abi.NAT_F_*
    sched: SchedFields = SchedFields()
    server_id: int = 0            # quic: the id its connection IDs carry (bpf/quic.h); 0 = none

    @property
    def name(self) -> str:
        return model.endpoint(self.address, self.port)


@dataclass(frozen=True)
class FlowEntry:
    """One connection-table entry: a flow's 5-tuple and the backend entry it started on.

    live: that backend entry is still active with the generation the flow recorded (what the
    program checks, see established() in bpf/select.h); a flow that is not live starts over as a
    new flow at its next packet. backend: the entry's ADDR:PORT and vip: its VIP's name, when live.
    """

    src: model.IPAddress
    sport: int
    dst: model.IPAddress
    dport: int
    protocol: model.Protocol
    backend_id: int
    gen: int
    live: bool
    backend: str | None = None
    vip: str | None = None
    key: bytes = field(default=b"", repr=False, compare=False)   # the map key as stored

    @property
    def name(self) -> str:
        """'10.111.0.2:40000 -> 10.112.0.10:8080/tcp'"""
        return f"{model.endpoint(self.src, self.sport)} -> {model.endpoint(self.dst, self.dport)}/{self.protocol.value}"


@dataclass(frozen=True)
class Stats:
    packets: int = 0
    bytes: int = 0
    new_flows: int = 0


def _total(parts: Iterable[Stats]) -> Stats:
    parts = list(parts)
    return Stats(sum(p.packets for p in parts), sum(p.bytes for p in parts), sum(p.new_flows for p in parts))


def per_cpu_total(per_cpu: Any) -> Stats:
    """One entry of a per-CPU counter map (a list of struct lbx_stats, or of struct lbx_count,
    which has no new_flows), summed over CPUs; None (no entry) is zero."""
    per_cpu = per_cpu or []
    return Stats(sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu),
                 sum(getattr(c, "new_flows", 0) for c in per_cpu))


def stats_total(m: Any) -> Stats:
    """Every entry of a per-CPU array of struct lbx_stats (three u64), summed over entries and
    CPUs: one batch read per 4,096 entries and three slice sums, not a lookup per entry (16,384
    backend entries)."""
    words = 3
    assert m.percpu and ctypes.sizeof(m.Leaf) == 8 * words, "struct lbx_stats: packets, bytes, new_flows"
    out = [0] * words
    for _keys, values, n in m.batches(chunk=4096):
        flat = (ctypes.c_uint64 * (n * bpfsys.possible_cpus() * words)).from_buffer(values)
        for i in range(words):
            out[i] += sum(flat[i::words])
    return Stats(*out)


@dataclass(frozen=True)
class BackendView:
    """One backend entry as status and the exporter show it."""

    name: str            # '10.0.0.1:80' or '[fd00::1]:80'
    stats: Stats
    in_table: bool       # in the VIP's live selection table
    id: int = 0
    mac: str = ""


@dataclass(frozen=True)
class VipView:
    name: str            # '10.0.0.1:80/tcp'
    stats: Stats
    backends: tuple[BackendView, ...] = ()
    id: int = 0
    mode: str = ""
    scheduler: str = ""
    table_size: int = 0


@dataclass(frozen=True)
class AclEntry:
    """One entry of the ACL trie (bpf/acl.h): scope is a VIP id or Maps.global_scope."""
    scope: int
    network: model.IPNetwork
    action: abi.AclAction


def acl_entries(scopes: dict[int, model.Admission]) -> frozenset[AclEntry]:
    """The trie entries of these scopes' rules: each rule, and for a scope with an allow list the
    implicit NOT_ALLOWED 0.0.0.0/0 and ::/0 (a rule for /0 itself replaces its family's)."""
    out: dict[tuple[int, model.IPNetwork], AclEntry] = {}
    for scope, a in scopes.items():
        if a.allow:
            for n in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
                out[(scope, n)] = AclEntry(scope, n, abi.AclAction.NOT_ALLOWED)
        for nets, action in ((a.allow, abi.AclAction.ALLOW), (a.deny, abi.AclAction.DENY)):
            for n in nets:
                out[(scope, n)] = AclEntry(scope, n, action)
    return frozenset(out.values())


def admit_flags(scope: int, entries: frozenset[AclEntry]) -> int:
    """lbx_admit flags of a scope: which families the trie has entries of."""
    return sum({abi.ADMIT_F_ACL_V4 if e.network.version == 4 else abi.ADMIT_F_ACL_V6
                for e in entries if e.scope == scope})


def _field_type(struct_t: Any, name: str) -> Any:
    return next(f[1] for f in struct_t._fields_ if f[0] == name)


_M64 = (1 << 64) - 1


def _hs_mix(x: int) -> int:
    """hs_mix() of bpf/nat.h."""
    x = (x * 0x9E3779B97F4A7C15) & _M64
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    return x >> 32


def hs_words_check(w: tuple[int, ...]) -> int:
    """hs_hash() of bpf/nat.h | 1: the check of the handshake-table slot of a struct flow_key
    whose ten 32-bit words (as an x86 CPU loads them) are w; never 0 (0: an empty slot)."""
    return _hs_mix(((w[0] ^ w[1] ^ w[2] ^ w[3]) << 32 | (w[4] ^ w[5] ^ w[6] ^ w[7])) ^ (w[8] << 16) ^ w[9]) | 1


def hs_check(key: bytes) -> int:
    """hs_words_check() of the bytes of a struct flow_key."""
    return hs_words_check(struct.unpack_from("<10I", key, 0))


def hs_bucket_hash(key: bytes, reply: bool) -> int:
    """hs_bucket_hash() of bpf/nat.h: the hash of a key's client-side endpoint (a forward key's
    source, a reply key's destination), which picks its bucket (masked to the bucket count)."""
    w = struct.unpack_from("<10I", key, 0)
    a = (w[4] ^ w[5] ^ w[6] ^ w[7]) if reply else (w[0] ^ w[1] ^ w[2] ^ w[3])
    port = w[8] >> 16 if reply else w[8] & 0xFFFF
    return _hs_mix((a << 32) ^ (port << 16) ^ w[9])


class HandshakeTable:
    """lbx_nat_new, the NAT handshake table (bpf/maps.h, bpf/nat.h hs_*): an array of buckets of
    abi.NAT_NEW_WAYS slots (bpf/abi.h struct nat_new_bucket: a line of the ways' checks, then the
    slots), behind the interface of the LRU hash it replaced, so that nat_tables()'s callers read
    it as they read lbx_nat: Key (struct flow_key), Leaf (struct nat_entry), info (max_entries:
    slots), batches(), lookup(), delete(), update().

    A slot holds an entry when its check is hs_check() of its key, in the bucket of the key's
    client side (hs_bucket_hash(): a forward key's source, a reply key's destination; a DNAT
    connection's two slots share one); empty slots and slots being written are left out, entries past their timeout are not (as lbx_nat's: NatEntry.expired). The
    table is read and written through a shared mapping of the map (BPF_F_MMAPABLE; 9 MiB at the
    default 65,536 slots): the program writes other slots of a bucket meanwhile, so a delete is
    one aligned 4-byte store of 0 to the slot's check word, never a rewrite of the bucket. update()
    (tests, explain's scratch copies) writes the slot as hs_write() does: check 0, slot, check.
    """

    def __init__(self, m: bpfsys.Map):
        if m.info.type != bpfsys.BPF_MAP_TYPE_ARRAY or not m.info.flags & bpfsys.BPF_F_MMAPABLE:
            raise bpfsys.BpfError(errno.EINVAL, f"map {m.name}: not a BPF_F_MMAPABLE array of handshake buckets")
        self.m = m
        way_t, check_t = _field_type(m.Leaf, "way"), _field_type(m.Leaf, "check")
        slot_t = way_t._type_
        self.ways, self.slot, self.bucket = way_t._length_, ctypes.sizeof(slot_t), ctypes.sizeof(m.Leaf)
        self.Key, self.Leaf = _field_type(slot_t, "key"), _field_type(slot_t, "e")
        self.percpu = False
        self.info = dataclasses.replace(m.info, key_size=ctypes.sizeof(self.Key), value_size=ctypes.sizeof(self.Leaf),
                                        max_entries=m.info.max_entries * self.ways)
        self._check, self._ways = m.Leaf.check.offset, m.Leaf.way.offset
        self._kofs, self._eofs = slot_t.key.offset, slot_t.e.offset
        self._ksize, self._esize = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf)
        # The kernel lays array values out round_up(value_size, 8) apart: here, back to back.
        assert check_t._length_ == self.ways and self._check % 4 == 0 and self.bucket % 8 == 0
        assert self._ksize == 40 and self._kofs % 4 == 0, "struct nat_new_bucket moved"
        self._mm: mmap.mmap | None = None

    @property
    def name(self) -> str:
        return self.m.name

    @property
    def fd(self) -> int:
        return self.m.fd

    def close(self) -> None:
        """Unmap the table (the map's fd is its owner's)."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            size = self.m.info.max_entries * self.bucket
            try:
                self._mm = mmap.mmap(self.m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except PermissionError:   # a read-only fd: reads only
                self._mm = mmap.mmap(self.m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        return self._mm

    def _slot(self, b: int, w: int) -> int:
        """Offset of way w's slot of bucket b (in the mapping, or in a copy starting at bucket 0)."""
        return b * self.bucket + self._ways + w * self.slot

    def valid(self, raw: bytes, n: int) -> list[tuple[int, int]]:
        """(bucket, way) of the slots that hold an entry among raw's first n buckets (a copy of
        whole buckets), in table order."""
        words = memoryview(raw).cast("I")
        stride, out = self.bucket // 4, []
        for w in range(self.ways):
            checks = words[self._check // 4 + w:n * stride:stride]
            for b in compress(range(n), checks):
                o = self._slot(b, w) + self._kofs
                if hs_words_check(struct.unpack_from("<10I", raw, o)) == checks[b]:
                    out.append((b, w))
        return sorted(out)

    def _find(self, kb: bytes, reply: bool | None = None) -> tuple[int, int, bytes, int]:
        """(kb's check, the mapping's offset of kb's bucket, the bucket's bytes, the way holding
        kb or -1): as hs_find(), the first way whose check is kb's, if its key is kb. reply: kb is
        a reply key (True) or a forward one (False), which says its bucket; None: either (a key
        not found in its forward bucket is looked for in its reply bucket, whose offset and
        bytes come back then)."""
        h = hs_check(kb)
        for r in (False, True) if reply is None else (reply,):
            base = (hs_bucket_hash(kb, r) & (self.m.info.max_entries - 1)) * self.bucket
            raw = self._map()[base:base + self.bucket]
            checks = struct.unpack_from(f"<{self.ways}I", raw, self._check)
            w = checks.index(h) if h in checks else -1
            o = self._slot(0, w) + self._kofs
            if w >= 0 and raw[o:o + self._ksize] == kb:
                return h, base, raw, w
        return h, base, raw, -1

    def _store_check(self, base: int, w: int, value: int, expect: int | None = None) -> bool:
        """One aligned 4-byte store of value into way w's check word of the bucket at base (if it
        still holds expect)."""
        word = ctypes.c_uint32.from_buffer(self._map(), base + self._check + 4 * w)
        try:
            if expect is not None and word.value != expect:
                return False
            word.value = value
            return True
        finally:
            del word   # releases the mapping's buffer (close() refuses while it is exported)

    def locate(self, key: Any, reply: bool | None = None) -> tuple[int, int] | None:
        """(bucket, way) of key's slot, or None (reply: as _find())."""
        _, base, _, w = self._find(bytes(key), reply)
        return None if w < 0 else (base // self.bucket, w)

    def lookup(self, key: Any) -> Any:
        """A copy of key's entry (a Leaf), or None."""
        _, _, raw, w = self._find(bytes(key))
        return None if w < 0 else self.Leaf.from_buffer_copy(raw, self._slot(0, w) + self._eofs)

    def delete(self, key: Any) -> bool:
        """Empty key's slot (what hs_delete() does); False if it held no entry for key (or was
        rewritten meanwhile)."""
        h, base, _, w = self._find(bytes(key))
        return w >= 0 and self._store_check(base, w, 0, expect=h)

    def update(self, key: Any, value: Any, flags: int = bpfsys.BPF_ANY) -> None:
        """Write value under key: over key's own slot, else the first empty one, else way 0 (for
        tests and explain's scratch copies; the program takes an empty way from a hash-given start)."""
        kb, vb = bytes(key), bytes(value)
        h, base, raw, found = self._find(kb, reply=vb[self.Leaf.dir.offset] == abi.NatDir.REPLY)
        if (flags == bpfsys.BPF_NOEXIST and found >= 0) or (flags == bpfsys.BPF_EXIST and found < 0):
            raise bpfsys.BpfError(errno.EEXIST if found >= 0 else errno.ENOENT, f"update of {self.name}")
        checks = struct.unpack_from(f"<{self.ways}I", raw, self._check)
        way = found if found >= 0 else next((w for w in range(self.ways) if not checks[w]), 0)
        off = base + self._slot(0, way)
        mm = self._map()
        self._store_check(base, way, 0)
        mm[off + self._kofs:off + self._kofs + self._ksize] = kb
        mm[off + self._eofs:off + self._eofs + self._esize] = vb[:self._esize]
        self._store_check(base, way, h)

    def batches(self, chunk: int = 16384) -> Iterator[tuple[Any, Any, int]]:
        """(keys array, values array, n) of the entries, about chunk slots read per step (as
        bpfsys.Map.batches; fewer entries than slots come out)."""
        total, per = self.m.info.max_entries, max(1, chunk // self.ways)
        for first in range(0, total, per):
            raw = self._map()[first * self.bucket:min(first + per, total) * self.bucket]
            valid = self.valid(raw, len(raw) // self.bucket)
            if not valid:
                continue
            keys, values = (self.Key * len(valid))(), (self.Leaf * len(valid))()
            offs = [self._slot(b, w) for b, w in valid]
            kb = b"".join(raw[o + self._kofs:o + self._kofs + self._ksize] for o in offs)
            vb = b"".join(raw[o + self._eofs:o + self._eofs + self._esize] for o in offs)
            ctypes.memmove(keys, kb, len(kb))
            ctypes.memmove(values, vb, len(vb))
            yield keys, values, len(valid)

    def items(self) -> Iterator[tuple[Any, Any]]:
        for keys, values, n in self.batches():
            for i in range(n):
                yield self.Key.from_buffer_copy(keys[i]), self.Leaf.from_buffer_copy(values[i])

    def keys(self) -> Iterator[Any]:
        return (k for k, _ in self.items())

    def count(self) -> int:
        return sum(n for _, _, n in self.batches())

    def clear(self) -> int:
        """Zero every slot's check word (tests, flushes); returns how many entries there were."""
        n, buckets = self.count(), self.m.info.max_entries
        with memoryview(self._map()) as raw, raw.cast("I") as words:
            for w in range(self.ways):
                words[self._check // 4 + w::self.bucket // 4] = array.array("I", bytes(4 * buckets))
        return n


def handshake_table(m: dict[str, Any]) -> Any:
    """lbx_nat_new among a program's maps m: a HandshakeTable, or the LRU hash that a pin of an
    older version still is (until an upgrade recreates it: lbxdp.migrate), or None (programs
    before it)."""
    t = m.get(abi.Map.NAT_NEW)
    return HandshakeTable(t) if t is not None and t.info.type == bpfsys.BPF_MAP_TYPE_ARRAY else t


def nat_tables(m: dict[str, Any]) -> list[Any]:
    """The NAT conntrack's tables among a program's maps m: lbx_nat, then lbx_nat_new (new
    connections not yet assured, bpf/maps.h; absent in programs before it) as handshake_table()
    gives it."""
    return [t for t in (m.get(abi.Map.NAT), handshake_table(m)) if t is not None]


class Maps:
    """Typed access to one instance's maps (from a fresh compile or from the pins)."""

    def __init__(self, maps: dict[str, bpfsys.Map]):
        self.m = maps
        self.vip_map = maps[abi.Map.VIPS]
        self.filter_map = maps[abi.Map.VIP_FILTER]
        self.be_map = maps[abi.Map.BACKENDS]
        self.tables_map = maps[abi.Map.TABLES]
        self.flow_map = maps[abi.Map.FLOWS]
        # None only for pins of an older version (re-attach creates it) or a program built from
        # older sources (the scripts' --bpf-dir).
        self.ctl_map = maps.get(abi.Map.CTL)
        # A new table must have its template's flags (the kernel compares them when it is
        # stored); pins made before BPF_F_MMAPABLE was added are filled the slower way.
        self.table_flags = maps[abi.Map.TABLE_TMPL].info.flags
        # 8: four 16-bit slots per value (bpf/abi.h LBX_TABLE_SLOTS_PER_WORD); 4: a u32 per slot
        # (programs built from sources before the packed tables: the scripts' --baseline-dir).
        self.table_packed = maps[abi.Map.TABLE_TMPL].info.value_size == 8
        # Admission of new flows (issue 11); None for pins or programs of an older version.
        self.admit_map = maps.get(abi.Map.ADMIT)
        self.acl_map = maps.get(abi.Map.ACL)
        self.acl_tmpl = maps.get(abi.Map.ACL_TMPL)
        # The same rules as a multibit trie (bpf/acl.h, lbxdp/acl_mbt.py); None for older programs.
        self.acl_mbt = maps.get(abi.Map.ACL_MBT)
        self.mbt_tmpl = maps.get(abi.Map.MBT_TMPL)
        self.acl_mbt_budget: int | None = None   # words of the blob to use (None: all; tests: less)

    def close(self) -> None:
        for m in self.m.values():
            m.close()

    @property
    def max_vips(self) -> int:
        return self.vip_map.info.max_entries

    @property
    def max_backends(self) -> int:
        return self.be_map.info.max_entries

    # --- the interface -------------------------------------------------------------------------
    def own_mac(self) -> str | None:
        """The MAC the program forwards frames for (lbx_ctl), or None if it has none."""
        ctl = self.ctl_map.lookup(0) if self.ctl_map is not None else None
        return mac_str(ctl.mac) if ctl is not None and ctl.flags & abi.CTL_F_MAC_SET else None

    def set_own_mac(self, mac: str | None) -> bool:
        """Tell the program the interface's MAC; None (or all zeros) makes it forward nothing.
        Returns whether the map changed. The entry's other fields are kept."""
        if self.ctl_map is None or self.own_mac() == mac:
            return False
        raw = mac_bytes(mac) if mac else bytes(6)
        ctl = self.ctl_map.lookup(0) or make(self.ctl_map.Leaf)
        ctypes.memmove(ctypes.addressof(ctl) + type(ctl).mac.offset, raw, 6)
        ctl.flags = (ctl.flags | abi.CTL_F_MAC_SET) if any(raw) else (ctl.flags & ~abi.CTL_F_MAC_SET)
        self.ctl_map.update(0, ctl)
        return True

    def own_addresses(self) -> OwnAddresses:
        ctl = self.ctl_map.lookup(0) if self.ctl_map is not None else None
        if ctl is None or not hasattr(ctl, "flow_src_v4"):
            return OwnAddresses()
        v4 = ipaddress.IPv4Address(struct.pack("=I", ctl.own_v4))
        v6 = ipaddress.IPv6Address(bytes(ctl.own_v6))
        f4 = ipaddress.IPv4Address(struct.pack("=I", ctl.flow_src_v4))
        mask = ipaddress.IPv4Address(struct.pack("=I", ctl.flow_src_v4_mask))
        f6 = bytes(ctl.flow_src_v6)
        return OwnAddresses(v4 if int(v4) else None, v6 if int(v6) else None,
                            ipaddress.IPv4Network(f"{f4}/{mask}") if int(f4) else None,
                            ipaddress.IPv6Network((f6 + bytes(8), 64)) if any(f6) else None)

    def set_own_addresses(self, own: OwnAddresses) -> bool:
        """Write the outer sources and flow-source prefixes into lbx_ctl (the MAC and flags are
        kept); returns whether the map changed. A v6 prefix shorter than /64 is written as its
        first /64: the program fills the low 64 bits from the flow hash."""
        if self.ctl_map is None or self.own_addresses() == own:
            return False
        ctl = self.ctl_map.lookup(0) or make(self.ctl_map.Leaf)
        ctl.own_v4 = struct.unpack("=I", own.v4.packed)[0] if own.v4 else 0
        v6 = own.v6.packed if own.v6 else bytes(16)
        ctypes.memmove(ctypes.addressof(ctl) + type(ctl).own_v6.offset, v6, 16)
        ctl.flow_src_v4 = struct.unpack("=I", own.flow_v4.network_address.packed)[0] if own.flow_v4 else 0
        ctl.flow_src_v4_mask = struct.unpack("=I", own.flow_v4.netmask.packed)[0] if own.flow_v4 else 0
        f6 = own.flow_v6.network_address.packed[:8] if own.flow_v6 else bytes(8)
        ctypes.memmove(ctypes.addressof(ctl) + type(ctl).flow_src_v6.offset, f6, 8)
        self.ctl_map.update(0, ctl)
        return True

    def flood_threshold(self) -> int:
        """lbx_ctl's connection-table inserts per second per CPU (0: the program's default)."""
        ctl = self.ctl_map.lookup(0) if self.ctl_map is not None else None
        return getattr(ctl, "flood_threshold", 0) if ctl is not None else 0

    def set_flood_threshold(self, per_cpu: int) -> bool:
        """Write [balancer] flood_threshold into lbx_ctl (0: abi.FLOOD_THRESHOLD); returns whether it changed."""
        if self.ctl_map is None or self.flood_threshold() == per_cpu:
            return False
        ctl = self.ctl_map.lookup(0) or make(self.ctl_map.Leaf)
        ctl.flood_threshold = per_cpu
        self.ctl_map.update(0, ctl)
        return True

    def flood(self) -> FloodState:
        """The program's new-flow flood state, summed over CPUs (bpf/select.h: may_record)."""
        m = self.m.get(abi.Map.FLOOD)
        if m is None:
            return FloodState()
        limit = self.flood_threshold() or abi.FLOOD_THRESHOLD
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        under = skipped = half_open = 0
        for f in m.lookup(0) or []:
            skipped += f.skipped
            half_open += f.half_open
            under += 0 < now - f.window < 1_000_000_000 and max(f.inserts, getattr(f, "syns", 0)) > limit
        return FloodState(limit, under, skipped, half_open)

    # --- the half-open table (bpf/maps.h, bpf/select.h: buckets of HALF_OPEN_WAYS slots) -------
    def half_open_slots(self) -> Iterator[HalfOpenSlot]:
        """Every occupied slot of the half-open table, torn or expired ones included (one batched
        read of the whole array: 1 MiB at the default 16384 slots)."""
        m = self.m.get(abi.Map.HALF_OPEN)
        if m is None or m.info.type != bpfsys.BPF_MAP_TYPE_ARRAY:
            return
        for _, values, n in m.batches(chunk=1024):
            raw = ctypes.string_at(ctypes.addressof(values), n * ctypes.sizeof(m.Leaf))
            for off in range(0, len(raw), HO_SLOT):
                if raw[off + 48:off + 52] != b"\0\0\0\0":
                    yield HalfOpenSlot.parse(raw[off:off + HO_SLOT])

    def half_open_entries(self) -> int:
        """Half-open entries the program would still follow: slots whose check holds and whose
        SYN is at most HALF_OPEN_UNITS old."""
        m = self.m.get(abi.Map.HALF_OPEN)
        if m is None or m.info.type != bpfsys.BPF_MAP_TYPE_ARRAY:   # an older version's LRU pin
            return 0 if m is None else m.count()
        now = now_units() & 0xFFFF
        return sum(1 for s in self.half_open_slots() if s.valid() and (now - s.time) & 0xFFFF <= HALF_OPEN_UNITS)

    def half_open_capacity(self) -> int:
        """Slots of the half-open table (entries of an older version's LRU pin)."""
        m = self.m.get(abi.Map.HALF_OPEN)
        if m is None:
            return 0
        if m.info.type != bpfsys.BPF_MAP_TYPE_ARRAY:
            return m.info.max_entries
        return m.info.max_entries * (m.info.value_size // HO_SLOT)

    def _ho_bucket(self, key: bytes) -> tuple[Any, int, Any]:
        m = self.m[abi.Map.HALF_OPEN]
        idx = flow_key_hash(key) & (m.info.max_entries - 1)
        return m, idx, m.lookup(idx)

    def half_open_get(self, key: bytes) -> HalfOpenSlot | None:
        """The valid slot of this flow key (bytes of struct flow_key), or None."""
        m, _, b = self._ho_bucket(key)
        raw = bytes(b) if b is not None else b""
        for off in range(0, len(raw), HO_SLOT):
            s = HalfOpenSlot.parse(raw[off:off + HO_SLOT])
            if s.key == bytes(key) and s.valid():
                return s
        return None

    def half_open_put(self, key: bytes, backend_id: int, gen: int, time16: int) -> None:
        """Write a valid entry for key (over its own slot, else the first empty one, else way 0):
        what record_half_open() writes; for tests and explain's scratch copies."""
        m, idx, b = self._ho_bucket(key)
        raw = bytearray(bytes(b) if b is not None else bytes(ctypes.sizeof(m.Leaf)))
        slots = [HalfOpenSlot.parse(bytes(raw[o:o + HO_SLOT])) for o in range(0, len(raw), HO_SLOT)]
        way = next((i for i, s in enumerate(slots) if s.key == bytes(key)),
                   next((i for i, s in enumerate(slots) if not s.check), 0))
        s = HalfOpenSlot(bytes(key), backend_id, gen, time16 & 0xFFFF, 0)
        raw[way * HO_SLOT:(way + 1) * HO_SLOT] = dataclasses.replace(s, check=s.expected_check()).pack()
        m.update(idx, m.Leaf.from_buffer_copy(bytes(raw)))

    def half_open_forget(self, key: bytes) -> bool:
        """Empty key's slot (what the program does at a passive-health handshake's end)."""
        m, idx, b = self._ho_bucket(key)
        raw = bytearray(bytes(b) if b is not None else b"")
        for off in range(0, len(raw), HO_SLOT):
            if bytes(raw[off:off + 40]) == bytes(key):
                raw[off + 48:off + 52] = bytes(4)
                m.update(idx, m.Leaf.from_buffer_copy(bytes(raw)))
                return True
        return False

    def forget_half_open(self, keys: set[bytes]) -> int:
        """Empty the slots of these flow keys (one pass over the table); returns how many."""
        m = self.m.get(abi.Map.HALF_OPEN)
        if not keys or m is None or m.info.type != bpfsys.BPF_MAP_TYPE_ARRAY:
            return 0
        size, gone = ctypes.sizeof(m.Leaf), 0
        for idx, values, n in m.batches(chunk=1024):
            raw = ctypes.string_at(ctypes.addressof(values), n * size)
            for i in range(n):
                bucket = bytearray(raw[i * size:(i + 1) * size])
                hit = [o for o in range(0, size, HO_SLOT)
                       if bytes(bucket[o:o + 40]) in keys and bucket[o + 48:o + 52] != bytes(4)]
                for o in hit:
                    bucket[o + 48:o + 52] = bytes(4)
                if hit:
                    m.update(idx[i], m.Leaf.from_buffer_copy(bytes(bucket)))
                    gone += len(hit)
        return gone

    def clear_half_open(self) -> int:
        """Empty the half-open table (flows flush, tests); returns how many slots were occupied.
        A handshake in flight then gets its VIP's table's choice for its ACK, as after an eviction."""
        m = self.m.get(abi.Map.HALF_OPEN)
        if m is None:
            return 0
        n = sum(1 for _ in self.half_open_slots())
        if n:
            empty = m.Leaf()
            for i in range(m.info.max_entries):
                m.update(i, empty)
        return n

    # --- VIPs ----------------------------------------------------------------------------------
    def vip_key(self, key: model.VipKey) -> Any:
        return make(self.vip_map.Key, addr=addr_bytes(key.address), port=socket.htons(key.port),
                    proto=key.protocol.number, family=model.family(key.address))

    def vips(self) -> dict[model.VipKey, VipMeta]:
        out = {}
        for keys, values, n in self.vip_map.batches():
            for k, v in zip(keys[:n], values[:n]):
                proto = {6: model.Protocol.TCP, 17: model.Protocol.UDP}[k.proto]
                key = model.VipKey(addr_from(k.addr, k.family), socket.ntohs(k.port), proto)
                out[key] = VipMeta(v.id, v.table_size, abi.Sched(v.sched), abi.FwdMode(v.mode), v.table_tag,
                                   v.flags, getattr(v, "changed_at", 0), getattr(v, "src_prefix", 0))
        return out

    def put_vip(self, key: model.VipKey, meta: VipMeta) -> None:
        """One map write: size, scheduler and mode of the VIP change together."""
        leaf = make(self.vip_map.Leaf, id=meta.id, table_size=meta.table_size,
                    sched=int(meta.sched), mode=int(meta.mode), table_tag=meta.table_tag, flags=meta.flags,
                    **({"changed_at": meta.changed_at} if hasattr(self.vip_map.Leaf, "changed_at") else {}),
                    **({"src_prefix": meta.src_prefix} if meta.src_prefix else {}))
        self.vip_map.update(self.vip_key(key), leaf)

    def delete_vip(self, key: model.VipKey) -> None:
        self.vip_map.delete(self.vip_key(key))

    # --- the VIP address filter -----------------------------------------------------------------
    def vip_filter(self) -> dict[int, int]:
        """The filter's non-zero words: index -> 64 bits."""
        # Arrays of c_uint32 / c_uint64 index as ints.
        return {keys[i]: values[i] for keys, values, n in self.filter_map.batches() for i in range(n) if values[i]}

    def add_to_vip_filter(self, addrs: set[model.IPAddress]) -> None:
        """Set the bits of addrs, keeping every bit already set. Call before inserting their VIPs."""
        have = self.vip_filter()
        self._write_filter(have, {i: w | have.get(i, 0) for i, w in filter_words(addrs).items()})

    def reset_vip_filter(self, addrs: set[model.IPAddress]) -> None:
        """Make the filter exactly the bits of addrs: call only once every other VIP is deleted,
        with the addresses of all VIPs that remain (a bit is cleared only when none maps to it)."""
        have, want = self.vip_filter(), filter_words(addrs)
        self._write_filter(have, {i: want.get(i, 0) for i in set(have) | set(want)})

    def _write_filter(self, have: dict[int, int], words: dict[int, int]) -> None:
        for i, w in sorted(words.items()):
            if have.get(i, 0) != w:
                self.filter_map.update(i, self.filter_map.Leaf(w))

    # --- NAT (bpf/nat.h, bpf/return_path.h, issue 12) ---------------------------------------------
    def nat_cfg(self) -> NatCfg | None:
        """What lbx_nat_cfg holds (None: a program without NAT maps)."""
        m = self.m.get(abi.Map.NAT_CFG)
        c = m.lookup(0) if m is not None else None
        if c is None:
            return None
        v4 = ipaddress.IPv4Address(struct.pack("=I", c.snat_v4))
        v6 = ipaddress.IPv6Address(bytes(c.snat_v6))
        units = list(c.timeout)
        secs = [round(u * (1 << abi.NAT_TIME_SHIFT) / 1e9) for u in units]
        return NatCfg(v4 if int(v4) else None, v6 if int(v6) else None, (c.port_min, c.port_max),
                      model.NatTimeouts(*secs))

    def set_nat_cfg(self, cfg: NatCfg) -> bool:
        """Write lbx_nat_cfg; returns whether it changed. Open connections keep their entries'
        timeouts until their next state change."""
        m = self.m.get(abi.Map.NAT_CFG)
        if m is None:
            return False
        leaf = make(m.Leaf, snat_v4=struct.unpack("=I", cfg.snat_v4.packed)[0] if cfg.snat_v4 else 0,
                    snat_v6=cfg.snat_v6.packed if cfg.snat_v6 else bytes(16),
                    port_min=cfg.ports[0], port_max=cfg.ports[1])
        for i, u in enumerate(cfg.timeout_units()):
            leaf.timeout[i] = u
        old = m.lookup(0)
        if old is not None and bytes(old) == bytes(leaf):
            return False
        m.update(0, leaf)
        return True

    def nat_filter(self) -> dict[int, int]:
        m = self.m.get(abi.Map.NAT_FILTER)
        if m is None:
            return {}
        return {keys[i]: values[i] for keys, values, n in m.batches() for i in range(n) if values[i]}

    def add_to_nat_filter(self, addrs: set[model.IPAddress]) -> None:
        """Set the bits of addrs (NAT VIP and NAT backend addresses), keeping the others: call
        before the VIPs and backends they are for take traffic."""
        m = self.m.get(abi.Map.NAT_FILTER)
        if m is None:
            if addrs:
                raise LookupError("this program has no NAT maps: re-attach to upgrade it")
            return
        have = self.nat_filter()
        for i, w in sorted(filter_words(addrs).items()):
            if have.get(i, 0) | w != have.get(i, 0):
                m.update(i, m.Leaf(have.get(i, 0) | w))

    def reset_nat_filter(self, addrs: set[model.IPAddress]) -> None:
        """Make the NAT filter exactly the bits of addrs (after deleting what no longer uses them)."""
        m = self.m.get(abi.Map.NAT_FILTER)
        if m is None:
            return
        have, want = self.nat_filter(), filter_words(addrs)
        for i in sorted(set(have) | set(want)):
            if have.get(i, 0) != want.get(i, 0):
                m.update(i, m.Leaf(want.get(i, 0)))

    def nat_tables(self) -> list[Any]:
        return nat_tables(self.m)

    def nat_entries(self, limit: int | None = None) -> list[NatEntry]:
        """The NAT conntrack (both tables, both directions' entries; expired ones included: see
        NatEntry.expired; NatEntry.assured says which table)."""
        out: list[NatEntry] = []
        for m in self.nat_tables():
            if not self._nat_entries(m, m is self.m.get(abi.Map.NAT), out, limit):
                break
        return out

    @staticmethod
    def _nat_entries(m: Any, assured: bool, out: list[NatEntry], limit: int | None) -> bool:
        """Append m's entries to out; False once limit is reached."""
        for keys, values, n in m.batches():
            for i in range(n):
                if limit is not None and len(out) >= limit:
                    return False
                k, v = keys[i], values[i]
                proto = {6: model.Protocol.TCP, 17: model.Protocol.UDP}.get(k.proto)
                if proto is None:
                    continue
                out.append(NatEntry(abi.NatDir(v.dir), addr_from(k.src, k.family), socket.ntohs(k.sport),
                                    addr_from(k.dst, k.family), socket.ntohs(k.dport), proto,
                                    addr_from(v.saddr, v.family), socket.ntohs(v.sport),
                                    addr_from(v.daddr, v.family), socket.ntohs(v.dport), v.state, v.backend_id,
                                    v.gen, mac_str(v.mac), v.seen, v.timeout, v.created, assured))
        return True

    def nat_entry_count(self) -> int:
        return sum(n for m in self.nat_tables() for _, _, n in m.batches())

    def nat_backend(self, backend_id: int) -> NatBackendState:
        m = self.m.get(abi.Map.NAT_BE)
        v = m.lookup(backend_id) if m is not None else None
        if v is None:
            return NatBackendState()
        return NatBackendState(v.consecutive, v.last_failure, v.syn_rst, v.syn_retx, v.synack,
                               v.pending_since, v.syn_sent, v.pending)

    # --- backends ------------------------------------------------------------------------------
    def backends(self) -> dict[int, BackendEntry]:
        """Active backend entries by id."""
        out = {}
        for keys, values, n in self.be_map.batches():
            for i in range(n):
                b, bid = values[i], keys[i]  # an array of c_uint indexes as int
                if bid and b.flags & abi.BE_F_ACTIVE:
                    enc = Encap(socket.ntohs(b.encap_port), b.encap_flags, b.mtu, b.mss) \
                        if hasattr(b, "encap_port") else Encap()
                    out[bid] = BackendEntry(bid, b.vip_id, addr_from(b.addr, b.family), socket.ntohs(b.port),
                                            mac_str(b.mac), bool(b.flags & abi.BE_F_IN_TABLE),
                                            getattr(b, "mode", abi.FwdMode.DSR), enc, getattr(b, "nat_flags", 0),
                                            SchedFields(getattr(b, "weight", 0), getattr(b, "max_conns", 0),
                                                        bool(b.flags & abi.BE_F_COUNTED)),
                                            getattr(b, "server_id", 0))
        return out

    def put_backend(self, backend_id: int, vip_id: int, b: model.Backend, mac: str,
                    mode: abi.FwdMode = abi.FwdMode.DSR, encap: Encap = Encap(), nat_flags: int = 0,
                    sched: SchedFields = SchedFields(), server_id: int = 0) -> None:
        """Write a backend entry; mode is its VIP's (the program forwards by the entry's mode).
        Giving the id to another (VIP, backend) bumps its generation, so flows that started on
        the id's previous owner start over instead of following the id; rewriting the same (VIP,
        backend), e.g. with a new MAC or mode, keeps it and keeps its flows."""
        old = self.be_map.lookup(backend_id)
        same = (old is not None and old.flags & abi.BE_F_ACTIVE and old.vip_id == vip_id
                and bytes(old.addr) == addr_bytes(b.address) and old.port == socket.htons(b.port))
        gen = old.gen if same else _next_gen(old.gen if old is not None else 0)
        flags = abi.BE_F_ACTIVE | (old.flags & abi.BE_F_IN_TABLE if same else 0) | (abi.BE_F_COUNTED if sched.counted else 0)
        fields = dict(addr=addr_bytes(b.address), port=socket.htons(b.port), family=model.family(b.address),
                      flags=flags, mac=mac_bytes(mac), gen=gen, vip_id=vip_id, mode=int(mode))
        if encap != Encap():
            fields |= dict(encap_port=socket.htons(encap.port), encap_flags=encap.flags, mtu=encap.mtu, mss=encap.mss)
        if nat_flags:
            fields["nat_flags"] = nat_flags
        if sched.weight or sched.max_conns:
            fields |= dict(weight=sched.weight, max_conns=sched.max_conns)
        if server_id:
            fields["server_id"] = server_id
        if same and hasattr(old, "lc_peer"):
            fields["lc_peer"] = old.lc_peer   # set_lc_peers' (kept while the entry is the same)
        if mode == abi.FwdMode.DSR and not hasattr(self.be_map.Leaf, "mode"):
            del fields["mode"]   # a program built from older sources (the scripts' --bpf-dir): DSR only
        self.be_map.update(backend_id, make(self.be_map.Leaf, **fields))

    def mark_in_table(self, backend_id: int, in_table: bool) -> None:
        """Record in the entry whether its VIP's live table names it, so that readers (status, the
        exporter) need not read the tables, and a SYN of a half-open flow follows its entry only
        to a backend still in the table (bpf/select.h half_open())."""
        old = self.be_map.lookup(backend_id)
        if old is None or not old.flags & abi.BE_F_ACTIVE or bool(old.flags & abi.BE_F_IN_TABLE) == in_table:
            return
        old.flags = (old.flags | abi.BE_F_IN_TABLE) if in_table else (old.flags & ~abi.BE_F_IN_TABLE)
        self.be_map.update(backend_id, old)

    def set_lc_peers(self, backend_id: int, peers: tuple[int, ...]) -> None:
        """A leastconn entry's peers (bpf/sched.h: its flows' second candidates); written only
        when they differ. A program without the field (older sources): nothing."""
        old = self.be_map.lookup(backend_id)
        if old is None or not hasattr(old, "lc_peer") or tuple(old.lc_peer) == tuple(peers):
            return
        for k, p in enumerate(peers):
            old.lc_peer[k] = p
        self.be_map.update(backend_id, old)

    def deactivate_backend(self, backend_id: int) -> None:
        """Clear the entry but keep its generation (the next owner's must differ from it)."""
        old = self.be_map.lookup(backend_id)
        self.be_map.update(backend_id, make(self.be_map.Leaf, gen=old.gen if old is not None else 0))

    # --- selection tables ----------------------------------------------------------------------
    def write_table(self, vip_id: int, backend_ids: "array.array[int]") -> None:
        """write_tables() for one VIP."""
        self.write_tables([(vip_id, backend_ids)])

    def write_tables(self, tables: Iterable[tuple[int, "array.array[int]"]]) -> None:
        """Build each VIP's new table aside (a new inner map), then swap them in, many per write.

        Every write of lbx_tables costs an RCU grace period (about 10 ms here): the kernel waits
        after each update of a map of maps, so that when the call returns no program still uses
        the old tables. One batch write swaps up to TABLES_PER_SWAP tables for one wait. Each
        swap is still atomic per VIP. `tables` is consumed one at a time (it may be a generator
        that builds them): only the filled inner maps are held, by file descriptor.

        An old table stays valid for packets already using it and is freed by the kernel when
        the last reference goes. An empty table is not swapped in: a VIP with table_size 0 drops
        new flows before it looks at its table.
        """
        staged: dict[int, int] = {}   # vip id -> fd of its filled new table
        try:
            for vip_id, backend_ids in tables:
                if not len(backend_ids):
                    continue
                if vip_id in staged:
                    os.close(staged.pop(vip_id))
                staged[vip_id] = self._new_table(vip_id, backend_ids)
                if len(staged) >= TABLES_PER_SWAP:
                    self._swap(staged)
            self._swap(staged)
        finally:
            for fd in staged.values():
                os.close(fd)

    def _new_table(self, vip_id: int, backend_ids: "array.array[int]") -> int:
        return new_table(f"lbx_t{vip_id}", backend_ids, self.table_flags, self.table_packed)

    def _swap(self, staged: dict[int, int]) -> None:
        """Store the staged tables in lbx_tables (one write), close and forget their fds."""
        if not staged:
            return
        vip_ids = list(staged)
        self.tables_map.update_batch(vip_ids, [self.tables_map.Leaf(staged[v]) for v in vip_ids])
        for v in vip_ids:
            os.close(staged.pop(v))

    def table(self, vip_id: int) -> "array.array[int]":
        """The VIP's live table (empty if it has none)."""
        inner_id = self.tables_map.lookup(vip_id)  # the kernel answers with the inner map's id
        if inner_id is None or not inner_id.value:
            return array.array("I")
        fd = bpfsys.map_fd_by_id(inner_id.value)
        try:
            return bpfsys.table_read(fd) if self.table_packed else bpfsys.array_read(fd)
        finally:
            os.close(fd)

    def delete_table(self, vip_id: int) -> None:
        self.tables_map.delete(vip_id)

    # --- admission of new flows (bpf/admit.h) ---------------------------------------------------
    @property
    def global_scope(self) -> int:
        """The scope id of the [balancer] rules: LBX_ADMIT_GLOBAL, the index after the last VIP."""
        return self.admit_map.info.max_entries - 1

    def acl(self) -> frozenset[AclEntry]:
        """The entries of the live ACL trie."""
        if self.acl_map is None:
            return frozenset()
        inner_id = self.acl_map.lookup(0)
        if inner_id is None or not inner_id.value:
            return frozenset()
        fd = bpfsys.map_fd_by_id(inner_id.value)
        try:
            trie = bpfsys.Map(fd, self.acl_tmpl.Key, ctypes.c_uint8)
            out = set()
            for k, v in trie.items():
                fam, scope = k.scope >> 24, k.scope & 0xFFFFFF
                raw = bytes(k.addr)
                addr = raw[:4] if fam == abi.FAMILY_V4 else raw
                out.add(AclEntry(scope, ipaddress.ip_network((addr, k.prefixlen - 32)),
                                 abi.AclAction(v.value)))
            return frozenset(out)
        finally:
            os.close(fd)

    def admission(self) -> dict[int, tuple[int, int, int]]:
        """Scopes with a limit or ACL flags: scope -> (interval_ns, burst_ns, flags)."""
        if self.admit_map is None:
            return {}
        return {keys[i]: (values[i].interval_ns, values[i].burst_ns, values[i].flags)
                for keys, values, n in self.admit_map.batches() for i in range(n)
                if values[i].interval_ns or values[i].flags}

    def write_admission(self, scopes: dict[int, model.Admission]) -> bool:
        """Make the trie and lbx_admit hold these scopes' rules and limits (every other scope
        none); returns whether the rule set changed.

        A changed rule set is a new trie, built aside and swapped in with one write of lbx_acl,
        so a packet sees the old rules or the new ones, never a half-written set. The flags are
        written after the swap; either order is safe: a flag without entries, or entries
        without a flag, just means the old answer a moment longer. Call it before a new VIP is
        inserted, so its first packet already meets its rules.
        """
        if self.admit_map is None:
            if any(a != model.Admission() for a in scopes.values()):
                raise LookupError("this program has no admission maps: re-attach to upgrade it")
            return False
        want = acl_entries(scopes)
        changed = want != self.acl()
        if changed:
            self._swap_acl(want)
        if changed or (want and self.acl_mbt is not None and self.acl_mbt.lookup(0) is None):
            self._swap_acl_mbt(want)    # after the trie: a scope the blob leaves to it finds it new
        have = self.admission()
        for scope in set(have) | set(scopes):
            a = scopes.get(scope, model.Admission())
            lim = a.new_flow_limit
            interval = lim.interval_ns if lim else 0
            row = (interval, (lim.burst - 1) * interval if lim else 0, admit_flags(scope, want))
            if have.get(scope, (0, 0, 0)) != row:
                self.admit_map.update(scope, make(self.admit_map.Leaf, interval_ns=row[0], burst_ns=row[1],
                                                  flags=row[2]))
        return changed

    def _swap_acl(self, entries: frozenset[AclEntry]) -> None:
        tmpl = self.acl_tmpl
        fd = bpfsys.lpm_trie_create("lbx_acl_t", tmpl.info.key_size, tmpl.info.value_size,
                                    tmpl.info.max_entries, tmpl.info.flags)
        try:
            trie = bpfsys.Map(fd, tmpl.Key, ctypes.c_uint8)
            for e in entries:
                fam = abi.FAMILY_V4 if e.network.version == 4 else abi.FAMILY_V6
                key = make(tmpl.Key, prefixlen=32 + e.network.prefixlen, scope=abi.acl_scope(fam, e.scope),
                           addr=addr_bytes(e.network.network_address))
                trie.update(key, ctypes.c_uint8(int(e.action)))
            self.acl_map.update(0, self.acl_map.Leaf(fd))
        finally:
            os.close(fd)

    @property
    def acl_mbt_capacity(self) -> int:
        """Words of the ACL blob (LBX_ACL_MBT_WORDS); 0 for a program without it."""
        return self.mbt_tmpl.info.value_size // 4 - acl_mbt.PAD if self.mbt_tmpl is not None else 0

    def _swap_acl_mbt(self, entries: frozenset[AclEntry]) -> acl_mbt.Built | None:
        """Build the blob of these entries and swap it in (or empty the slot: no rules); a scope
        over the budget is marked for the kernel trie, which _swap_acl wrote just before."""
        if self.acl_mbt is None or self.mbt_tmpl is None:
            return None
        if not entries:
            self.acl_mbt.delete(0)
            return None
        cap = self.acl_mbt_capacity
        built = acl_mbt.build(((e.scope, e.network, e.action) for e in entries), self.global_scope,
                              min(cap, self.acl_mbt_budget or cap))
        tmpl = self.mbt_tmpl
        fd = bpfsys.array_create("lbx_acl_b", 1, tmpl.info.value_size, tmpl.info.flags)
        try:
            blob = bpfsys.Map(fd, tmpl.Key, tmpl.Leaf)
            value = tmpl.Leaf()
            ctypes.memmove(ctypes.addressof(value), built.words.tobytes(), 4 * len(built.words))
            blob.update(0, value)
            self.acl_mbt.update(0, self.acl_mbt.Leaf(fd))
        finally:
            os.close(fd)
        return built

    def acl_placement(self, entries: frozenset[AclEntry] | None = None) -> dict[tuple[int, int], bool]:
        """(scope, 4|6) -> whether the program walks the blob for it (False: the kernel trie,
        because the blob's budget had no room for it or there is no blob), for every (scope,
        family) the ACL has entries of (entries: self.acl(), if the caller has it already)."""
        fams = {(e.scope, e.network.version) for e in (self.acl() if entries is None else entries)}
        if not fams:
            return {}
        blob = None
        if self.acl_mbt is not None and self.mbt_tmpl is not None:
            inner = self.acl_mbt.lookup(0)
            if inner is not None and inner.value:
                fd = bpfsys.map_fd_by_id(inner.value)
                try:
                    blob = bpfsys.Map(fd, self.mbt_tmpl.Key, self.mbt_tmpl.Leaf).lookup(0)
                finally:
                    os.close(fd)
        if blob is None:
            return {k: False for k in fams}
        words = blob.w
        return {(s, f): not words[2 * s + (f == 6)] & acl_mbt.H_FALLBACK for s, f in fams}

    def acl_mbt_words(self) -> int:
        """Words of the live blob in use (its header's last word); 0 without one."""
        if self.acl_mbt is None or self.mbt_tmpl is None:
            return 0
        inner = self.acl_mbt.lookup(0)
        if inner is None or not inner.value:
            return 0
        fd = bpfsys.map_fd_by_id(inner.value)
        try:
            blob = bpfsys.Map(fd, self.mbt_tmpl.Key, self.mbt_tmpl.Leaf).lookup(0)
        finally:
            os.close(fd)
        return blob.w[acl_mbt.header_words(self.global_scope) - 1] if blob is not None else 0

    def purge_refused(self, scopes: dict[int, model.Admission]) -> int:
        """Delete the connection-table entries of flows these rules refuse (global first, then
        their VIP's), so that their next packet is classified again and dropped; returns how
        many. Established flows never meet the ACL otherwise (bpf/admit.h)."""
        glob = scopes.get(self.global_scope, model.Admission())
        vip_of = {e.id: e.vip_id for e in self.backends().values()}
        doomed = []
        for keys, values, n in self.flow_map.batches():
            for i in range(n):
                k = keys[i]
                if k.proto not in (6, 17):
                    continue
                src = addr_from(k.src, k.family)
                vip = scopes.get(vip_of.get(values[i].backend_id, -1), model.Admission())
                if glob.verdict(src) != abi.AclAction.ALLOW or vip.verdict(src) != abi.AclAction.ALLOW:
                    doomed.append(self.flow_map.Key.from_buffer_copy(k))
        return sum(1 for k in doomed if self.flow_map.delete(k))

    # --- counters ------------------------------------------------------------------------------
    def _sum(self, name: str, key: int) -> Stats:
        return per_cpu_total(self.m[name].lookup(key))

    @property
    def counts_per_vip(self) -> bool:
        """The maps of a program older than lbx_vip_retired, which counted every forwarded packet
        in its VIP's lbx_vip_stats and under tx_forward too (a status of the running program
        before the new one is attached): read those as they are."""
        return abi.Map.VIP_RETIRED not in self.m and abi.LEGACY_VIP_STATS in self.m

    @property
    def retired_all(self) -> int:
        """lbx_vip_retired's index of every retired entry (LBX_RETIRED_ALL: after the last VIP)."""
        return self.m[abi.Map.VIP_RETIRED].info.max_entries - 1

    def _retired(self, index: int) -> Stats:
        v = self.m[abi.Map.VIP_RETIRED].lookup(index)
        return Stats(v.packets, v.bytes, v.new_flows) if v is not None else Stats(0, 0, 0)

    def vip_stats(self, vip_id: int) -> Stats:
        """The VIP's counters: its active backend entries' plus those it retired (the program
        counts a forwarded packet in its backend's entry only: bpf/stats.h)."""
        if self.counts_per_vip:
            return self._sum(abi.LEGACY_VIP_STATS, vip_id)
        return _total([self._retired(vip_id)] + [self.backend_stats(e.id) for e in self.backends().values()
                                                 if e.vip_id == vip_id])

    def backend_stats(self, backend_id: int) -> Stats:
        return self._sum(abi.Map.BE_STATS, backend_id)

    def reasons(self) -> dict[abi.Reason, tuple[int, int]]:
        """(packets, bytes) per exit reason, summed over CPUs. tx_forward is derived (bpf/stats.h
        does not count it): every backend entry's packets (any entry: one whose id was freed may
        still hold a few) plus the retired ones', less the ICMP errors steered (account() counts
        those in their backend too)."""
        out = self.counted_reasons()
        if self.counts_per_vip:
            return out
        fwd = _total([self._retired(self.retired_all), stats_total(self.m[abi.Map.BE_STATS])])
        steered = out.get(abi.Reason.TX_ICMP_STEERED, (0, 0))
        out[abi.Reason.TX_FORWARD] = (max(0, fwd.packets - steered[0]), max(0, fwd.bytes - steered[1]))
        return out

    def counted_reasons(self) -> dict[abi.Reason, tuple[int, int]]:
        """(packets, bytes) per exit reason as the program counts them (lbx_reasons, summed over
        CPUs): tx_forward stays 0 (reasons() derives it). Cheap: no read of the backends'."""
        m, out = self.m[abi.Map.REASONS], {}
        for r in abi.Reason.exits():
            s = per_cpu_total(m.lookup(int(r)))
            out[r] = (s.packets, s.bytes)
        return out

    def retire_backend_counters(self, backend_id: int, vip_id: int | None) -> None:
        """The entry leaves service: add its counters to its VIP's retired ones (vip_id; None when
        the VIP goes too) and to every entry's, then zero them, so that neither the VIP's counters
        nor tx_forward go down when it is removed, and its id's next owner starts from zero.
        Call it after the entry is deactivated (no packet counts in it any more). A reader
        between the two writes (microseconds) sees the entry's counts twice."""
        s = self.backend_stats(backend_id)
        if self.counts_per_vip or s == Stats(0, 0, 0):
            self.m[abi.Map.BE_STATS].zero(backend_id)
            return
        m = self.m[abi.Map.VIP_RETIRED]
        for index in ([vip_id] if vip_id is not None else []) + [self.retired_all]:
            v = m.lookup(index) or m.Leaf()
            v.packets, v.bytes, v.new_flows = v.packets + s.packets, v.bytes + s.bytes, v.new_flows + s.new_flows
            m.update(index, v)
        self.m[abi.Map.BE_STATS].zero(backend_id)

    def reset_vip_counters(self, vip_id: int) -> None:
        """A reused VIP id starts from zero (counters and round-robin position)."""
        self.m[abi.LEGACY_VIP_STATS if self.counts_per_vip else abi.Map.VIP_RETIRED].zero(vip_id)
        self.m[abi.Map.RR].zero(vip_id)
        if abi.Map.BACKUP_OVERFLOWS in self.m:   # issue 13: its backup overflows
            self.m[abi.Map.BACKUP_OVERFLOWS].zero(vip_id)
        if abi.Map.QUIC_VIP in self.m:           # ... and its QUIC counters (bpf/quic.h)
            for r in range(abi.QuicReason.MAX):
                self.m[abi.Map.QUIC_VIP].zero(vip_id * abi.QuicReason.MAX + r)

    def reset_backend_counters(self, backend_id: int) -> None:
        """A reused backend id starts from zero: what its entry still counted (packets after its
        retirement) goes to every entry's retired counters, so tx_forward does not go down."""
        self.retire_backend_counters(backend_id, None)
        if abi.Map.NAT_BE in self.m:   # a new owner starts with no handshake history and no SNAT cursor
            self.m[abi.Map.NAT_BE].zero(backend_id)
        if abi.Map.CONNS in self.m:    # ... and no open connections
            self.m[abi.Map.CONNS].zero(backend_id)

    # --- QUIC connection-ID routing (bpf/quic.h, issue 13) -------------------------------------
    def write_quic_ids(self, ids: dict[int, dict[int, tuple[int, bool]]]) -> None:
        """Make lbx_quic_ids exactly `ids`: VIP id -> {server id: (backend entry id, down)}. Each
        value carries the entry's current generation (read back from lbx_backends), so a stale
        one (the id given to another backend) is never followed. Entries first, then removals:
        a packet sees the old id or the new one, never none in between."""
        m = self.m.get(abi.Map.QUIC_IDS)
        if m is None:
            if any(ids.values()):
                from .errors import LbxError
                raise LbxError("this program has no lbx_quic_ids (built from older sources): quic = true needs a reattach")
            return
        want = {}
        for vip_id, by_sid in ids.items():
            for sid, (bid, down) in by_sid.items():
                be = self.be_map.lookup(bid)
                want[(vip_id, sid)] = (bid, be.gen if be is not None else 0, abi.QUIC_F_DOWN if down else 0)
        have = {(k.vip_id, k.server_id): (v.backend_id, v.gen, v.flags) for k, v in m.items()}
        direct = self.m.get(abi.Map.QUIC_SID)
        # lbx_quic_sid: per server id, the entry of the lowest VIP id using it (quic.h reads it
        # first). Stale slots are cleared before the hash loses their entry and written after it
        # has the new one, so a packet finds the id in one of the two, or falls back.
        want_sid: dict[int, tuple[int, int, int, int]] = {}
        for (vip_id, sid), (bid, gen, flags) in sorted(want.items()):
            want_sid.setdefault(sid, (vip_id, bid, gen, flags))
        have_sid: dict[int, tuple[int, int, int, int]] = {}
        if direct is not None:
            for keys, values, n in direct.batches():
                for i in range(n):
                    if values[i].val.backend_id:
                        v = values[i]
                        have_sid[int(getattr(keys[i], "value", keys[i]))] = (v.vip_id, v.val.backend_id, v.val.gen,
                                                                            v.val.flags)
            for sid in have_sid.keys() - want_sid.keys():
                direct.zero(sid)
            for sid, cur in have_sid.items():   # owner changed: empty first (the hash answers meanwhile)
                if sid in want_sid and want_sid[sid][0] != cur[0]:
                    direct.zero(sid)
        for (vip_id, sid), (bid, gen, flags) in want.items():
            if have.get((vip_id, sid)) != (bid, gen, flags):
                m.update(make(m.Key, vip_id=vip_id, server_id=sid), make(m.Leaf, backend_id=bid, gen=gen, flags=flags))
        if direct is not None:
            for sid, (vip_id, bid, gen, flags) in want_sid.items():
                if have_sid.get(sid) != (vip_id, bid, gen, flags):
                    leaf = direct.Leaf()
                    leaf.vip_id, leaf.val.backend_id, leaf.val.gen, leaf.val.flags = vip_id, bid, gen, flags
                    direct.update(sid, leaf)
        for vip_id, sid in have.keys() - want.keys():
            m.delete(make(m.Key, vip_id=vip_id, server_id=sid))

    def quic_sids(self) -> dict[int, tuple[int, int, int, int]]:
        """lbx_quic_sid's used slots: server id -> (VIP id, backend entry id, generation, flags)."""
        m = self.m.get(abi.Map.QUIC_SID)
        out = {}
        if m is not None:
            for keys, values, n in m.batches():
                for i in range(n):
                    v = values[i]
                    if v.val.backend_id:
                        out[int(getattr(keys[i], "value", keys[i]))] = (v.vip_id, v.val.backend_id, v.val.gen, v.val.flags)
        return out

    def quic_ids(self) -> dict[tuple[int, int], tuple[int, int, int]]:
        """lbx_quic_ids: (VIP id, server id) -> (backend entry id, generation, flags)."""
        m = self.m.get(abi.Map.QUIC_IDS)
        return {} if m is None else {(k.vip_id, k.server_id): (v.backend_id, v.gen, v.flags) for k, v in m.items()}

    def write_backups(self, backups: dict[int, list[int]]) -> None:
        """Make lbx_backups say `backups` (VIP id -> backup entry ids, at most abi.BACKUP_MAX);
        every other VIP's entry n = 0. One array write per changed VIP (bpf/sched.h reads n and
        checks each id's VIP and activity, so a torn read names nobody else's backend)."""
        m = self.m.get(abi.Map.BACKUPS)
        if m is None:
            if any(backups.values()):
                from .errors import LbxError
                raise LbxError("this program has no lbx_backups (built from older sources): reattach for caps to overflow to backups")
            return
        have = {int(getattr(k, "value", k)): list(v.id[:min(v.n, abi.BACKUP_MAX)])
                for k, v in m.items() if v.n}
        for vip_id in set(have) | {v for v, ids in backups.items() if ids}:
            want = list(backups.get(vip_id, []))[:abi.BACKUP_MAX]
            if have.get(vip_id, []) != want:
                leaf = m.Leaf()
                leaf.n = len(want)
                for i, bid in enumerate(want):
                    leaf.id[i] = bid
                m.update(vip_id, leaf)

    def backups(self, vip_id: int) -> list[int]:
        """lbx_backups of one VIP (empty if the program has none)."""
        m = self.m.get(abi.Map.BACKUPS)
        v = None if m is None else m.lookup(vip_id)
        return [] if v is None else list(v.id[:min(v.n, abi.BACKUP_MAX)])

    def backup_overflows(self) -> dict[int, int]:
        """lbx_overflows summed over CPUs, by VIP id (those with any)."""
        m = self.m.get(abi.Map.BACKUP_OVERFLOWS)
        if m is None:
            return {}
        return {int(getattr(k, "value", k)): n for k, v in m.items() if (n := sum(v))}

    def quic_vip_stats(self, vip_ids: Iterable[int]) -> dict[int, dict[abi.QuicReason, int]]:
        """lbx_quic_vip summed over CPUs: the same counts per VIP id (each of vip_ids; {} if the
        program is older than the per-VIP counters)."""
        m = self.m.get(abi.Map.QUIC_VIP)
        if m is None:
            return {}
        return {vid: {r: sum(m.lookup(vid * abi.QuicReason.MAX + int(r)) or [])
                      for r in abi.QuicReason if r is not abi.QuicReason.MAX} for vid in vip_ids}

    def quic_stats(self) -> dict[abi.QuicReason, int]:
        """lbx_quic_stats summed over CPUs: how QUIC VIPs' new-tuple packets were routed."""
        m = self.m.get(abi.Map.QUIC_STATS)
        out = {r: 0 for r in abi.QuicReason if r is not abi.QuicReason.MAX}
        if m is not None:
            for r in out:
                out[r] = sum(m.lookup(int(r)) or [])
        return out

    # --- open connections (bpf/sched.h, issue 13) ---------------------------------------------
    def conns(self) -> dict[int, Conns]:
        """lbx_conns of every counted active backend entry, by id."""
        m = self.m.get(abi.Map.CONNS)
        if m is None:
            return {}
        out = {}
        for bid, e in self.backends().items():
            if e.sched.counted or e.sched.max_conns:
                v = m.lookup(bid)
                out[bid] = Conns(v.open, v.cap_hits, e.sched.max_conns) if v is not None else Conns(0, 0, e.sched.max_conns)
        return out

    def recount_conns(self) -> dict[int, tuple[int, int]]:
        """Set every counted backend entry's open connections to what lbx_flows holds: its live
        entries (same generation) that were counted and not closed. This corrects what the program
        cannot see (timeouts, LRU evictions, flushes, servers' FINs in DSR). A snapshot: a flow
        opened or closed between the table's read and the write is off by one until the next
        recount. Returns {id: (before, after)} of the entries it changed."""
        m = self.m.get(abi.Map.CONNS)
        if m is None:
            return {}
        counted = {bid: e for bid, e in self.backends().items() if e.sched.counted}
        if not counted:
            return {}
        gens = {}
        for keys, values, n in self.be_map.batches():
            gens.update({keys[i]: values[i].gen for i in range(n) if keys[i] in counted})
        live = dict.fromkeys(counted, 0)
        for _keys, values, n in self.flow_map.batches():
            for i in range(n):
                v = values[i]
                if v.backend_id in live and gens.get(v.backend_id) == v.gen and \
                        (v.pad & (abi.FLOW_F_COUNTED | abi.FLOW_F_CLOSED)) == abi.FLOW_F_COUNTED:
                    live[v.backend_id] += 1
        changed = {}
        for bid, n in live.items():
            old = m.lookup(bid)
            if old is not None and old.open != n:
                changed[bid] = (old.open, n)
                old.open = n
                m.update(bid, old)
        return changed

    def vip_views(self) -> tuple[VipView, ...]:
        """Every VIP with its backends and counters, read once (for status and the exporter)."""
        backends = sorted(self.backends().values(), key=lambda e: e.id)
        out = []
        for key, meta in sorted(self.vips().items(), key=lambda kv: kv[1].id):
            # in_table from the entry's flag: reading a 65537-slot table per VIP per scrape is not
            # affordable (100 VIPs: 1.5 s); the balancer sets the flag with every table switch.
            bes = tuple(BackendView(e.name, self.backend_stats(e.id), e.in_table and meta.table_size > 0, e.id, e.mac)
                        for e in backends if e.vip_id == meta.id)
            total = self.vip_stats(meta.id) if self.counts_per_vip else \
                _total([self._retired(meta.id)] + [b.stats for b in bes])   # as vip_stats()
            out.append(VipView(key.name, total, bes, meta.id, meta.mode.name.lower(),
                               meta.sched.name.lower(), meta.table_size))
        return tuple(out)

    # --- connection table ----------------------------------------------------------------------
    def flows(self) -> Iterator[tuple[Any, Any]]:
        return self.flow_map.items()

    def purge_flows(self, backend_ids: list[int]) -> int:
        """Delete the connection-table entries of these backend entries, and their NAT
        connections' entries (both directions: a migrated NAT connection's next packet is a new
        connection to another backend); returns how many entries."""
        ids, doomed = set(backend_ids), []
        for keys, values, n in self.flow_map.batches():
            doomed += [self.flow_map.Key.from_buffer_copy(keys[i]) for i in range(n) if values[i].backend_id in ids]
        gone = sum(1 for k in doomed if self.flow_map.delete(k))
        for nat in self.nat_tables():
            doomed = []
            for keys, values, n in nat.batches():
                doomed += [nat.Key.from_buffer_copy(keys[i]) for i in range(n) if values[i].backend_id in ids]
            gone += sum(1 for k in doomed if nat.delete(k))
        return gone

    def flow_count(self) -> int:
        return self.flow_map.count()

    def flow_entries(self, limit: int | None = None) -> list[FlowEntry]:
        """The connection table (at most limit entries, in the kernel's order), each entry with
        its backend and VIP resolved. A snapshot: the program adds and the LRU evicts meanwhile."""
        gens = {}
        for keys, values, n in self.be_map.batches():
            gens.update({keys[i]: values[i].gen for i in range(n) if values[i].flags & abi.BE_F_ACTIVE})
        active = self.backends()
        vip_names = {m.id: k.name for k, m in self.vips().items()}
        out: list[FlowEntry] = []
        for keys, values, n in self.flow_map.batches():
            for i in range(n):
                if limit is not None and len(out) >= limit:
                    return out
                k, v = keys[i], values[i]
                be = active.get(v.backend_id)
                live = be is not None and gens.get(v.backend_id) == v.gen
                proto = {6: model.Protocol.TCP, 17: model.Protocol.UDP}[k.proto]
                out.append(FlowEntry(addr_from(k.src, k.family), socket.ntohs(k.sport), addr_from(k.dst, k.family),
                                     socket.ntohs(k.dport), proto, v.backend_id, v.gen, live,
                                     be.name if live else None, vip_names.get(be.vip_id) if live else None,
                                     bytes(k)))
        return out

    def delete_flows(self, entries: list[FlowEntry]) -> int:
        """Delete these connection-table entries, and their half-open entries (a flushed flow's
        next packet is a new flow: its VIP's choice now, not its SYN's); returns how many
        connection-table entries were still there."""
        n = sum(1 for e in entries if self.flow_map.delete(self.flow_map.Key.from_buffer_copy(e.key)))
        self.forget_half_open({bytes(e.key) for e in entries})
        return n
