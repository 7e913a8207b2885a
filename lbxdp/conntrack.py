"""NAT conntrack (lbx_nat, issue 12) as the control plane sees it: a bounded summary for
`status` and the exporter, the connections for `lbxdp nat ls`, and the daemon's garbage
collector.

Why a module of its own: a full table is LBX_NAT_CAPACITY = 131,072 entries (two per
connection). Building a Python object per entry (maps.Maps.nat_entries) costs ~5 us each,
~0.7 s for a full table: too slow for a scrape. summarize() reads the table in batches (one
system call per 16k entries) and counts over the raw bytes with strided slices, so a scrape of
a full table stays in tens of milliseconds (scripts/bench_scrape.py --nat-entries prints it).
The offsets come from the compiled struct (bcc's ctypes types), never from a re-declaration.

An entry past seen + timeout counts as absent for the program (bpf/nat.h nat_expired): the
summary counts such entries apart ("expired"), and Gc deletes them, a bounded chunk per tick,
re-reading each entry right before deleting it so that one the program refreshed or reused in
the meantime stays.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections import Counter
from itertools import compress, repeat
from operator import and_, eq, le, lshift, or_, sub
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import abi, model
from .maps import Maps, NatEntry, nat_now, nat_tables

_U32 = 0xFFFFFFFF
CHUNK = 16384              # entries read per batch (and per GC tick)
GC_GRACE = (250_000_000 >> abi.NAT_TIME_SHIFT) + 1
"""Units (~250 ms) an entry must be past its timeout before the GC deletes it: the program's
clock (jiffies, bpf/clock.h) lags CLOCK_MONOTONIC, the one maps.nat_now() reads, by up to a
few ticks plus a boot-time constant (~60 ms here), so without it the GC could delete an entry
the program still counts as live for that long."""


@dataclass(frozen=True)
class PortUse:
    """SNAT ports in use for one source address and protocol (live reply entries to it)."""
    address: str
    protocol: str
    in_use: int


@dataclass(frozen=True)
class NatStatus:
    """The NAT side of an instance: conntrack entries by direction and state (live ones), the
    expired ones not yet collected, and the SNAT pool with its use per source and protocol."""
    capacity: int = 0
    entries: dict[tuple[str, str], int] = field(default_factory=dict)   # (direction, state) -> live entries
    expired: int = 0                                                    # in both tables
    pool: tuple[int, int] | None = None                                 # inclusive port range
    sources: tuple[str, ...] = ()                                       # SNAT addresses (v4, v6)
    ports: tuple[PortUse, ...] = ()
    timeouts: dict[str, int] = field(default_factory=dict)              # seconds by state
    handshakes: int = 0           # live entries of lbx_nat_new (new connections, not yet assured)
    handshake_capacity: int = 0

    @property
    def pool_size(self) -> int:
        return 0 if self.pool is None else self.pool[1] - self.pool[0] + 1

    @property
    def live(self) -> int:
        return sum(self.entries.values())

    def to_json(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "live": self.live, "expired": self.expired,
                "handshakes": {"entries": self.handshakes, "capacity": self.handshake_capacity},
                "entries": [{"direction": d, "state": s, "entries": n} for (d, s), n in sorted(self.entries.items())],
                "snat_pool": {"ports": list(self.pool) if self.pool else None, "size": self.pool_size,
                              "sources": list(self.sources),
                              "in_use": [{"address": p.address, "protocol": p.protocol, "ports": p.in_use}
                                         for p in self.ports]},
                "timeouts": self.timeouts}

    def text(self) -> list[str]:
        by_state: Counter[str] = Counter()
        for (d, s), n in self.entries.items():
            by_state[f"{d} {s}"] += n
        states = ", ".join(f"{k} {n}" for k, n in sorted(by_state.items())) or "none"
        out = [f"NAT conntrack: {self.live} live + {self.expired} expired / {self.capacity} entries ({states})"]
        if self.handshake_capacity:
            out.append(f"NAT handshake table (new connections, not yet assured): {self.handshakes} / "
                       f"{self.handshake_capacity} entries")
        if self.pool is not None:
            use = ", ".join(f"{p.address}/{p.protocol} {p.in_use}" for p in self.ports) or "none in use"
            out.append(f"SNAT pool: ports {self.pool[0]}-{self.pool[1]} ({self.pool_size} per address and "
                       f"protocol) on {', '.join(self.sources) or 'no address'}: {use}")
        return out


def state_name(state: int, proto: int) -> str:
    try:
        return abi.NatState(state).name.lower()
    except ValueError:
        return f"state{state}"


def dir_name(d: int) -> str:
    try:
        return {abi.NatDir.FWD: "forward", abi.NatDir.REPLY: "reply"}[abi.NatDir(d)]
    except ValueError:
        return f"dir{d}"


class _Layout:
    """Offsets of the fields summarize() and Gc read, from the compiled structs."""

    def __init__(self, m: Any):
        L, K = m.Leaf, m.Key
        self.esize, self.ksize = ctypes.sizeof(L), ctypes.sizeof(K)
        assert self.esize % 4 == 0 and self.ksize % 4 == 0
        self.dir, self.state = L.dir.offset, L.state.offset
        self.seen, self.timeout = L.seen.offset // 4, L.timeout.offset // 4
        self.created, self.backend = L.created.offset // 4, L.backend_id.offset // 4
        self.kdst, self.kproto, self.kfamily = K.dst.offset // 4, K.proto.offset, K.family.offset
        # summarize() reads (dir, state) and (proto, family) as one little-endian 16-bit word each
        assert sys.byteorder == "little" and self.dir % 2 == 0 and self.state == self.dir + 1 \
            and self.kproto % 2 == 0 and self.kfamily == self.kproto + 1, "struct nat_entry/flow_key moved"


def _raw(arr: Any, size: int, n: int) -> bytes:
    return ctypes.string_at(ctypes.addressof(arr), size * n)


def _words(a: model.IPAddress) -> tuple[int, ...]:
    """struct lbx_addr's four words as the CPU loads them (network order bytes, IPv4 zero-padded)."""
    return struct.unpack("=4I", a.packed.ljust(16, b"\0"))


def _live(w: memoryview, lay: "_Layout", now: int) -> list[bool]:
    """Per entry: not past seen + timeout. map() chains run the loop in C (3x a comprehension)."""
    ew = lay.esize // 4
    return list(map(le, map(and_, map(sub, repeat(now), w[lay.seen::ew]), repeat(_U32)), w[lay.timeout::ew]))


def summarize(maps: Maps, now: int | None = None) -> NatStatus | None:
    """The NAT status of an instance (None: a program without NAT maps). One batched walk;
    every per-entry loop is a map/zip/compress/Counter chain, so it runs in C."""
    tables = maps.nat_tables()
    if not tables:
        return None
    cfg = maps.nat_cfg()
    now = nat_now() if now is None else now
    snat = [a for a in ((cfg.snat_v4, cfg.snat_v6) if cfg else ()) if a is not None]
    counts: Counter[int] = Counter()        # dir | state << 8 -> live entries
    # Live replies to an SNAT address (by construction the only keys with it as destination),
    # by (dst words, proto | family << 8); the first word filters in C before anything is counted.
    replies: Counter[tuple[int, ...]] = Counter()
    first = {_words(a)[0] for a in snat}
    expired = handshakes = 0
    for m, keys, values, n in ((m, *b) for m in tables for b in m.batches(CHUNK)):
        lay = _Layout(m)
        raw, kraw = _raw(values, lay.esize, n), _raw(keys, lay.ksize, n)
        w, kw = memoryview(raw).cast("I"), memoryview(kraw).cast("I")
        live = _live(w, lay, now)
        expired += n - sum(live)
        if m is not tables[0]:      # lbx_nat_new: counted apart (a SYN flood fills it, by design)
            handshakes += sum(live)
        else:   # dir and state are adjacent bytes: one 16-bit load per entry names both
            ds = memoryview(raw).cast("H")[lay.dir // 2::lay.esize // 2]
            counts.update(compress(ds, live))
        if snat:   # ports held by handshakes are in use too
            kwn, d = lay.ksize // 4, lay.kdst
            pf = memoryview(kraw).cast("H")[lay.kproto // 2::lay.ksize // 2]
            w0 = kw[d::kwn]
            mask = map(and_, map(and_, live, map(eq, raw[lay.dir::lay.esize], repeat(int(abi.NatDir.REPLY)))),
                       map(first.__contains__, w0))
            replies.update(compress(zip(w0, kw[d + 1::kwn], kw[d + 2::kwn], kw[d + 3::kwn], pf), mask))
    entries = {(dir_name(v & 0xFF), state_name(v >> 8, 0)): c for v, c in counts.items()}
    use = []
    for a in snat:
        words = _words(a)
        for proto, name in ((6, "tcp"), (17, "udp")):
            pf_a = proto | model.family(a) << 8
            c = replies.get((*words, pf_a), 0)
            if c:
                use.append(PortUse(str(a), name, c))
    timeouts = dict(vars(cfg.timeouts)) if cfg is not None else {}
    return NatStatus(tables[0].info.max_entries, entries, expired, cfg.ports if cfg and snat else None,
                     tuple(str(a) for a in snat), tuple(use), timeouts, handshakes,
                     tables[1].info.max_entries if len(tables) > 1 else 0)


# ------------------------------------------------------------------------------ connections


@dataclass(frozen=True)
class Connection:
    """One NAT connection as `lbxdp nat ls` shows it, from its forward entry."""
    protocol: str
    client: str
    vip: str
    backend: str
    snat: str | None          # the source the backend sees, when it is not the client
    state: str
    age: float                # seconds since the first packet
    idle: float               # seconds since the client's last packet
    expired: bool
    assured: bool = True      # False: a new connection not yet assured (lbx_nat_new)

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "client": self.client, "vip": self.vip, "backend": self.backend,
                "snat": self.snat, "state": self.state, "age": round(self.age, 3), "idle": round(self.idle, 3),
                "expired": self.expired, "assured": self.assured}


def _secs(units: int) -> float:
    return (units & _U32) * (1 << abi.NAT_TIME_SHIFT) / 1e9


def connection(e: NatEntry, now: int) -> Connection:
    client = model.endpoint(e.src, e.sport)
    snat = None if (e.new_src, e.new_sport) == (e.src, e.sport) else model.endpoint(e.new_src, e.new_sport)
    return Connection(e.protocol.value, client, model.endpoint(e.dst, e.dport), model.endpoint(e.new_dst, e.new_dport),
                      snat, state_name(e.state, 0), _secs(now - e.created), _secs(now - e.seen), e.expired(now),
                      e.assured)


def connections(maps: Maps, limit: int | None = None, expired: bool = False) -> list[Connection]:
    """The connections (forward entries), oldest first; expired ones only if asked."""
    now = nat_now()
    out = [connection(e, now) for e in maps.nat_entries() if e.dir == abi.NatDir.FWD]
    out = [c for c in out if expired or not c.expired]
    out.sort(key=lambda c: -c.age)
    return out if limit is None else out[:limit]


# ------------------------------------------------------------------------------------- GC


@dataclass
class GcTick:
    """What one Gc.tick() did."""
    scanned: int = 0
    removed: Counter[str] = field(default_factory=Counter)   # by state name
    pass_done: bool = False
    syn_timeouts: Counter[int] = field(default_factory=Counter)   # backend id -> handshakes past the timeout


class Gc:
    """Removes lbx_nat and lbx_nat_new entries past their state's timeout (and GC_GRACE), at most
    `chunk` entries read (and `max_deletes` deleted) per tick, resuming where the last tick
    stopped (the kernel's batch cursor; in lbx_nat_new, an array of buckets, `chunk` slots are
    read per step and steps without an entry are skipped); a pass over both tables takes at most
    their capacity / chunk ticks. An entry is deleted only if
    a fresh read right before the delete still finds it expired (the program may have reused
    the tuple for a new connection meanwhile).

    syn_timeout: units (LBX_NAT_TIME_SHIFT) after which a forward entry still in SYN_SENT is a
    handshake that got no SYN-ACK in time (passive health, by backend entry id); each counted
    once per connection (remembered by key and creation time)."""

    def __init__(self, chunk: int = CHUNK, max_deletes: int = CHUNK):
        self.chunk, self.max_deletes = chunk, max_deletes
        self._walk: Iterator[tuple[Any, Any, Any, int]] | None = None   # (table, keys, values, n)
        self._maps: Maps | None = None
        self.syn_timeout: dict[int, int] = {}      # backend id -> units; only backends with passive health
        self._timed_out: set[bytes] = set()
        self._seen_this_pass: set[bytes] = set()

    def close(self) -> None:
        self._walk = None
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def tick(self, open_maps: Any, now: int | None = None) -> GcTick:
        """One bounded step. open_maps() -> Maps (opened at the start of each pass, kept for it)."""
        out = GcTick()
        if self._walk is None:
            self.close()
            self._maps = open_maps()
            tables = nat_tables(self._maps.m)
            if not tables:
                self.close()
                out.pass_done = True
                return out
            self._walk = ((m, *b) for m in tables for b in m.batches(self.chunk))
        now = nat_now() if now is None else now
        try:
            m, keys, values, n = next(self._walk)
        except StopIteration:
            out.pass_done = True
            self._end_pass()
            return out
        out.scanned = n
        lay = _Layout(m)
        raw = _raw(values, lay.esize, n)
        w, ew = memoryview(raw).cast("I"), lay.esize // 4
        g = GC_GRACE
        doomed = [i for i, (s, t) in enumerate(zip(w[lay.seen::ew], w[lay.timeout::ew])) if (now - s) & _U32 > t + g]
        for i in doomed[:self.max_deletes]:
            k = m.Key.from_buffer_copy(keys[i])
            v = m.lookup(k)
            if v is None or (now - v.seen) & _U32 <= v.timeout + g:
                continue
            if m.delete(k):
                out.removed[state_name(v.state, 0)] += 1
        if self.syn_timeout:
            self._syn_timeouts(keys, raw, lay, n, now, out)
        return out

    def _syn_timeouts(self, keys: Any, raw: bytes, lay: _Layout, n: int, now: int, out: GcTick) -> None:
        w, ew = memoryview(raw).cast("I"), lay.esize // 4
        fwd, syn = abi.NatDir.FWD, abi.NatState.SYN_SENT
        for i, (d, s, be, c, seen, t) in enumerate(zip(raw[lay.dir::lay.esize], raw[lay.state::lay.esize],
                                                        w[lay.backend::ew], w[lay.created::ew],
                                                        w[lay.seen::ew], w[lay.timeout::ew])):
            limit = self.syn_timeout.get(be)
            if d != fwd or s != syn or limit is None or (now - c) & _U32 <= limit or (now - seen) & _U32 > t:
                continue
            ident = bytes(keys[i]) + c.to_bytes(4, "little")
            self._seen_this_pass.add(ident)
            if ident not in self._timed_out:
                self._timed_out.add(ident)
                out.syn_timeouts[be] += 1

    def _end_pass(self) -> None:
        self._walk = None
        # forget handshakes no longer in SYN_SENT (established, closed or collected)
        self._timed_out &= self._seen_this_pass
        self._seen_this_pass = set()
