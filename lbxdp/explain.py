"""`lbxdp explain` and `lbxdp preview`: which backend the program gives a packet, and what a
backend change would move.

explain runs the real program, not a model of it. DryRun compiles the same C (bpf/lbxdp.c, the
same flags, only another pin directory) and loads it over a scratch bpffs directory in which
  - every map the program only reads (VIPs, backends, tables, ACLs, ...) is the LIVE map, pinned
    a second time there (the same kernel object: a table switch is seen at once), and
  - every map the program writes (the connection and half-open tables, NAT conntrack, flood
    window, round-robin positions, limiter buckets, counters) is a scratch map of the same
    type, into which each query first copies the live entries that this one packet can read
    (its flow's entries, its source's buckets, its VIP's round-robin position, the flood window).
A crafted frame then goes through BPF_PROG_TEST_RUN. The verdict, the reason (the scratch
lbx_reasons) and the backend (the scratch lbx_be_stats) are what the live program would do with
that frame on this CPU now, and no live map is written: nothing recorded, no counter moved.
Because the instructions are the normal build's, explain cannot disagree with the data path
(tests/datapath/test_explain.py compares 10,000 tuples per VIP with the program itself).

What the copies leave out: a NAT connection's SNAT port is allocated against the scratch
conntrack (the first free candidate), so the port shown may differ and an exhausted pool is
not predicted; the backend and the reason are not affected by that.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import re
import shutil
import socket
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import abi, bpfsys, loader, model
from .errors import LbxError
from .maps import HandshakeTable, Maps, addr_bytes, flow_words_hash, handshake_table, mac_str, src_limit_set

# Maps the program only reads: shared with the live program.
SHARED = frozenset({abi.Map.VIPS, abi.Map.VIP_FILTER, abi.Map.BACKENDS, abi.Map.TABLE_TMPL, abi.Map.TABLES,
                    abi.Map.CTL, abi.Map.ADMIT, abi.Map.ACL_TMPL, abi.Map.ACL, abi.Map.NAT_CFG,
                    abi.Map.NAT_FILTER, abi.Map.QUIC_IDS, abi.Map.QUIC_SID, abi.Map.BACKUPS, abi.Map.MBT_TMPL, abi.Map.ACL_MBT,
                    abi.Map.VIP_RETIRED})   # ... or never touches (the control plane's counters)
# Maps the program writes: scratch copies, filled per query with what the packet can read.
WRITTEN = frozenset({abi.Map.FLOWS, abi.Map.HALF_OPEN, abi.Map.FLOOD, abi.Map.RR,
                     abi.Map.BE_STATS, abi.Map.REASONS, abi.Map.SRC_LIMIT, abi.Map.SRC_LIMIT4, abi.Map.NAT,
                     abi.Map.NAT_NEW, abi.Map.NAT_BE, abi.Map.NAT_SCRATCH, abi.Map.CONNS, abi.Map.QUIC_STATS, abi.Map.QUIC_VIP,
                     abi.Map.BACKUP_OVERFLOWS})
_unsorted = set(abi.Map) - SHARED - WRITTEN
assert not _unsorted, f"lbxdp.explain: say whether the program writes {sorted(_unsorted)} (SHARED or WRITTEN)"

# Small scratch tables: they hold one packet's entries at a time.
_SCRATCH_DEFINES = ("LBX_NAT_CAPACITY=1024", "LBX_NAT_NEW_CAPACITY=1024", "LBX_SRC_LIMIT_CAPACITY=1024")
_SCRATCH_FLOWS = 1024

XDP_VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}
SCRATCH_MAC = "02:00:00:00:00:fe"   # the crafted frame's source MAC (no guard reads it)


# --- the packet ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """The packet to explain: SRC[:PORT] -> VIP:PORT/PROTO, a TCP SYN or a later segment."""

    src: model.IPAddress
    sport: int
    dst: model.IPAddress
    dport: int
    protocol: model.Protocol
    syn: bool = False

    @property
    def name(self) -> str:
        flag = " (syn)" if self.syn and self.protocol is model.Protocol.TCP else ""
        return f"{model.endpoint(self.src, self.sport)} -> {model.endpoint(self.dst, self.dport)}/{self.protocol.value}{flag}"

    @property
    def family(self) -> int:
        return model.family(self.dst)


_ARROW = re.compile(r"\s*->\s*|\s+")


def parse_probe(text: str, syn: bool = False, default_sport: int = 40000) -> Probe:
    """'10.0.0.5:40000 -> 10.112.0.10:80/tcp' (or the same without the arrow, or SRC without a
    port: default_sport) -> Probe; ValueError saying what is wrong."""
    parts = [p for p in _ARROW.split(text.strip()) if p]
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not SRC[:PORT] -> VIP:PORT/PROTO")
    src_text, vip_text = parts
    try:
        vip = model.VipKey.parse(vip_text)
    except ValueError as e:
        raise ValueError(f"{vip_text!r} is not VIP:PORT/PROTO ({e})") from None
    try:
        src, sport = model.parse_endpoint(src_text)
    except ValueError:
        try:
            src, sport = ipaddress.ip_address(src_text.strip("[]")), default_sport
        except ValueError:
            raise ValueError(f"{src_text!r} is not SRC or SRC:PORT") from None
    if src.version != vip.address.version:
        raise ValueError(f"{src} and {vip.address} are of different families")
    if not 0 < sport < 65536 or not 0 < vip.port < 65536:
        raise ValueError("the ports must be 1-65535 (explain a packet, not a port-0 VIP key)")
    return Probe(src, sport, vip.address, vip.port, vip.protocol, syn)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(p: Probe, dst_mac: str, payload: bytes = b"lbxdp-explain") -> bytes:
    """The Ethernet frame a client would send: a TCP SYN (p.syn) or ACK with payload, or a UDP
    datagram, addressed to the balancer's MAC, with valid checksums."""
    tcp = p.protocol is model.Protocol.TCP
    if tcp:
        flags = 0x02 if p.syn else 0x18   # SYN, or PSH|ACK
        data = b"" if p.syn else payload
        l4 = struct.pack("!HHIIBBHHH", p.sport, p.dport, 1000, 0 if p.syn else 1, 5 << 4, flags, 64240, 0, 0) + data
    else:
        l4 = struct.pack("!HHHH", p.sport, p.dport, 8 + len(payload), 0) + payload
    proto = 6 if tcp else 17
    if p.family == abi.FAMILY_V4:
        pseudo = p.src.packed + p.dst.packed + struct.pack("!BBH", 0, proto, len(l4))
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, p.src.packed, p.dst.packed)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        pseudo = p.src.packed + p.dst.packed + struct.pack("!IxxxB", len(l4), proto)
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, p.src.packed, p.dst.packed)
        ethertype = 0x86DD
    off = 16 if tcp else 6
    c = _csum(pseudo + l4) or (0xFFFF if not tcp else 0)
    l4 = l4[:off] + struct.pack("!H", c) + l4[off + 2:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(SCRATCH_MAC.replace(":", "")) + struct.pack("!H", ethertype)
    return eth + ip + l4


# --- the program's hash, for saying which slot ---------------------------------------------------

def flow_hash(p: Probe) -> int:
    """flow_hash() of bpf/select.h for this packet's flow key (lbxdp.maps.flow_words_hash)."""
    sport, dport = (struct.unpack("<H", struct.pack("!H", x))[0] for x in (p.sport, p.dport))
    return flow_words_hash(struct.unpack("<4I", addr_bytes(p.src)), struct.unpack("<4I", addr_bytes(p.dst)),
                           sport, dport, p.protocol.number)


# --- the answer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A connection-table, half-open or NAT conntrack entry the packet's flow has."""
    table: str            # 'connection table', 'half-open table', 'nat conntrack'
    backend_id: int
    gen: int
    live: bool            # its backend entry is active with that generation (else it is ignored)

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "backend_id": self.backend_id, "gen": self.gen, "live": self.live}


@dataclass(frozen=True)
class BackendState:
    """The chosen backend as the control plane sees it (applied state), when known."""
    name: str
    id: int
    mode: str
    mac: str
    weight: int | None = None
    backup: bool | None = None
    down: bool | None = None
    draining: bool | None = None
    slots: int = 0                 # slots of the VIP's live table it holds

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Explanation:
    probe: Probe
    verdict: str                   # 'tx', 'pass', 'drop', 'aborted'
    reason: abi.Reason | None
    vip: str | None = None
    vip_id: int | None = None
    scheduler: str | None = None
    table_size: int = 0
    backend: BackendState | None = None
    via: str = ""                  # 'connection table', 'half-open table', 'nat conntrack', 'table slot'
    slot: int | None = None        # the new-flow slot (hash, maglev: the flow's; rr: this CPU's next)
    table_choice: str | None = None   # the backend the VIP's table gives a new flow of this tuple
    new_flow: bool = False
    entries: tuple[Entry, ...] = ()
    cpu: int = 0
    output: str = ""               # what the frame became: 'dst mac ...', 'outer ... -> ...', 'dst ...'
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        p = self.probe
        return {"packet": {"src": str(p.src), "sport": p.sport, "dst": str(p.dst), "dport": p.dport,
                           "protocol": p.protocol.value, "syn": p.syn},
                "verdict": self.verdict, "reason": self.reason.label if self.reason else None,
                "vip": self.vip, "vip_id": self.vip_id, "scheduler": self.scheduler, "table_size": self.table_size,
                "backend": self.backend.to_json() if self.backend else None, "via": self.via, "slot": self.slot,
                "table_choice": self.table_choice, "new_flow": self.new_flow,
                "entries": [e.to_json() for e in self.entries], "cpu": self.cpu, "output": self.output,
                "notes": list(self.notes)}

    def text(self) -> list[str]:
        out = [f"packet:   {self.probe.name}",
               f"verdict:  {self.verdict.upper()} ({self.reason.name.lower() if self.reason else '?'})"]
        if self.vip:
            out.append(f"vip:      {self.vip} (id {self.vip_id}, {self.scheduler}, {self.table_size} slots)")
        if self.backend:
            b = self.backend
            state = []
            if b.weight is not None:
                state.append(f"weight {b.weight}")
            if b.backup:
                state.append("backup")
            if b.down is not None:
                state.append("down" if b.down else "up")
            if b.draining:
                state.append("draining")
            state.append(f"{b.slots} slots")
            out.append(f"backend:  {b.name} (id {b.id}, {b.mode}, next hop {b.mac}; {', '.join(state)})")
        if self.via:
            why = self.via
            if self.via == "table slot" and self.slot is not None:
                why = f"new flow: slot {self.slot} of {self.table_size} by {self.scheduler}"
                if self.scheduler == "rr":
                    why += f" (CPU {self.cpu}'s next position)"
            out.append(f"because:  {why}")
        for e in self.entries:
            out.append(f"entry:    {e.table}: backend id {e.backend_id} gen {e.gen}"
                       f"{'' if e.live else ' (stale: ignored)'}")
        if self.table_choice and self.via != "table slot":
            out.append(f"a new flow of this tuple would go to {self.table_choice} (its table slot)")
        if self.output:
            out.append(f"output:   {self.output}")
        out += [f"note:     {n}" for n in self.notes]
        return out


def _current_cpu() -> int:
    cpus = os.sched_getaffinity(0)
    if len(cpus) == 1:
        return next(iter(cpus))
    return ctypes.CDLL(None).sched_getcpu()


# --- the dry run ------------------------------------------------------------------------------------

def _pin_root() -> Path:
    return Path("/sys/fs/bpf")


class DryRun:
    """The program over the live read-only maps and scratch copies of the written ones.

    live: the live maps by name (loader.open_pinned_maps, or a compiled Program's .maps). Use as
    a context manager; close() unloads the copy and removes its scratch pins.
    """

    def __init__(self, live: dict[str, bpfsys.Map], src_dir: Path | None = None):
        self.live = live
        self.lm = Maps(live)
        self.scratch = _pin_root() / f"lbxdp-dry-{uuid.uuid4().hex[:12]}"
        self.build = loader.BuildConfig(
            self.scratch, max_vips=live[abi.Map.VIPS].info.max_entries,
            max_backends=live[abi.Map.BACKENDS].info.max_entries, flow_capacity=_SCRATCH_FLOWS,
            half_open_capacity=_SCRATCH_FLOWS, defines=_SCRATCH_DEFINES, src_dir=src_dir)
        self.prog: loader.Program | None = None
        self.tables: dict[str, tuple[Any, Any]] = {}
        self._members: dict[int, tuple[int, frozenset[int]]] = {}
        loader.ensure_bpffs()
        self.scratch.mkdir(mode=0o700)
        try:
            for name in SHARED:
                if name in live:
                    bpfsys.obj_pin(live[name].fd, self.scratch / name.value)
            self.prog = loader.compile_program(self.build)
            shared_now = {n: m.info.id for n, m in self.prog.maps.items() if n in SHARED}
            wrong = [n for n, i in shared_now.items() if n in live and live[n].info.id != i]
            if wrong:
                raise LbxError(f"the dry-run program did not reuse the live maps {wrong}", "report this as a bug")
            self.sm = self.prog.maps
            # lbx_nat_new is an array of buckets (bpf/maps.h): read and written as a table by key
            self.tables = {abi.Map.NAT_NEW: (handshake_table(live), handshake_table(self.sm))}
            self.runner = bpfsys.TestRunner(self.prog.fd)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for t in (t for pair in self.tables.values() for t in pair):
            if isinstance(t, HandshakeTable):
                t.close()
        self.tables = {}
        if self.prog is not None:
            self.prog.close()
            self.prog = None
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "DryRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- copies ----------------------------------------------------------------------------------
    def _flow_key(self, p: Probe) -> Any:
        k = self.sm[abi.Map.FLOWS].Key()
        raw = addr_bytes(p.src) + addr_bytes(p.dst) + struct.pack("!HH", p.sport, p.dport) + \
            bytes([p.protocol.number, p.family, 0, 0])
        ctypes.memmove(ctypes.addressof(k), raw, len(raw))
        return k

    def _copy(self, name: str, key: Any) -> Any:
        """Make the scratch map's entry at key the live one's (or absent); returns the live value."""
        live, scratch = self.tables.get(name) or (self.live.get(name), self.sm.get(name))
        if scratch is None:
            return None
        lkey, skey = (key, key) if isinstance(key, int) else (live.Key.from_buffer_copy(bytes(key)) if live else None,
                                                             scratch.Key.from_buffer_copy(bytes(key)))
        v = live.lookup(lkey) if live is not None else None
        if v is None:
            scratch.delete(skey)
        elif isinstance(v, list):   # per-CPU: every CPU's value
            scratch.update(skey, [x if isinstance(x, int) else scratch.Leaf.from_buffer_copy(bytes(x)) for x in v])
        else:
            scratch.update(skey, v if isinstance(v, int) else scratch.Leaf.from_buffer_copy(bytes(v)))
        return v

    def _copy_half_open(self, key: Any) -> Any:
        """The half-open table is an array of buckets (bpf/maps.h): only the flow's own slot is
        copied, into the scratch table's bucket for it (another size, another bucket), not the
        whole array. Returns the live slot (backend_id, gen) or None."""
        if abi.Map.HALF_OPEN not in self.sm or abi.Map.HALF_OPEN not in self.live:
            return None
        scratch = Maps(self.sm)
        scratch.half_open_forget(bytes(key))
        slot = self.lm.half_open_get(bytes(key))
        if slot is not None:
            scratch.half_open_put(slot.key, slot.backend_id, slot.gen, slot.time)
        return slot

    def _vip_id(self, p: Probe) -> int | None:
        for port in (p.dport, 0):
            meta = self.live[abi.Map.VIPS].lookup(self.lm.vip_key(model.VipKey(p.dst, port, p.protocol)))
            if meta is not None:
                return meta.id
        return None

    def _prepare(self, p: Probe, key: Any, vip_id: int | None) -> list[Entry]:
        entries = []
        for name, label in ((abi.Map.FLOWS, "connection table"), (abi.Map.HALF_OPEN, "half-open table"),
                            (abi.Map.NAT, "nat conntrack"), (abi.Map.NAT_NEW, "nat handshakes")):
            v = self._copy_half_open(key) if name == abi.Map.HALF_OPEN else self._copy(name, key)
            if v is not None and (name not in (abi.Map.NAT, abi.Map.NAT_NEW) or v.dir == abi.NatDir.FWD):
                entries.append(Entry(label, v.backend_id, v.gen, self._live_entry(v.backend_id, v.gen)))
        self._copy(abi.Map.FLOOD, 0)
        if vip_id is not None:
            self._copy(abi.Map.RR, vip_id)
        # bpf/limit.h: a source's buckets are in one set of a per-CPU array per family; the
        # live set is copied into the scratch table's set for the source (another size).
        name = abi.Map.SRC_LIMIT4 if p.family == abi.FAMILY_V4 else abi.Map.SRC_LIMIT
        live, scratch = self.live.get(name), self.sm.get(name)
        if live is not None and scratch is not None:
            src = addr_bytes(p.src)
            scopes = [self.live[abi.Map.VIPS].info.max_entries] + ([vip_id] if vip_id is not None else [])
            for s in scopes:
                scope = abi.acl_scope(p.family, s)
                v = live.lookup(src_limit_set(p.family, src, scope, live.info.max_entries))
                if v is not None:
                    scratch.update(src_limit_set(p.family, src, scope, scratch.info.max_entries),
                                   [scratch.Leaf.from_buffer_copy(bytes(x)) for x in v])
        return entries

    def _live_entry(self, backend_id: int, gen: int) -> bool:
        be = self.live[abi.Map.BACKENDS].lookup(backend_id)
        return be is not None and bool(be.flags & abi.BE_F_ACTIVE) and be.gen == gen

    def _candidates(self, vip_id: int | None, entries: list[Entry]) -> set[int]:
        """Backend ids whose scratch counters may move: the entries' and the VIP's table's
        (cached per table: a switch installs a new inner map, with a new id)."""
        ids = {e.backend_id for e in entries}
        if vip_id is not None:
            inner = self.live[abi.Map.TABLES].lookup(vip_id)
            inner_id = inner.value if inner is not None else 0
            cached = self._members.get(vip_id)
            if cached is None or cached[0] != inner_id:
                cached = (inner_id, frozenset(self.lm.table(vip_id)))
                self._members[vip_id] = cached
            ids |= cached[1]
        return ids

    # -- the run ---------------------------------------------------------------------------------
    def run(self, p: Probe) -> tuple[bpfsys.TestRun, abi.Reason | None, int | None, int | None, bool, list[Entry], int]:
        """One dry run: (test run, reason, vip id, backend id, new flow, entries, cpu)."""
        key = self._flow_key(p)
        vip_id = self._vip_id(p)
        entries = self._prepare(p, key, vip_id)
        cands = self._candidates(vip_id, entries)
        nat_be = self.sm.get(abi.Map.NAT_BE)
        for bid in cands:
            if nat_be is not None:
                self._copy(abi.Map.NAT_BE, bid)
            self._copy(abi.Map.CONNS, bid)   # leastconn and caps read the live counts (bpf/sched.h)
        mac = self.lm.own_mac() or "00:00:00:00:00:00"
        cpu = _current_cpu()
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})   # the copies' per-CPU state is this CPU's
        try:
            got = self.runner.run(frame(p, mac))
        finally:
            os.sched_setaffinity(0, old)
        reason = self._take_reason()
        backend, new_flow = None, False
        stats = self.sm[abi.Map.BE_STATS]
        for bid in cands:
            per_cpu = stats.lookup(bid) or []
            if any(c.packets for c in per_cpu):
                backend, new_flow = bid, any(c.new_flows for c in per_cpu)
                stats.zero(bid)
        if reason is None and backend is not None:
            reason = abi.Reason.TX_FORWARD   # the one reason bpf/stats.h leaves to the backend's counter
        for name in (abi.Map.FLOWS, abi.Map.NAT, abi.Map.NAT_NEW):
            m = self.tables[name][1] if name in self.tables else self.sm.get(name)
            if m is not None:
                m.delete(m.Key.from_buffer_copy(bytes(key)))
        if abi.Map.HALF_OPEN in self.sm:
            Maps(self.sm).half_open_forget(bytes(key))
        return got, reason, vip_id, backend, new_flow, entries, cpu

    def _take_reason(self) -> abi.Reason | None:
        m, found = self.sm[abi.Map.REASONS], None
        for r in abi.Reason.exits():
            per_cpu = m.lookup(int(r)) or []
            if any(c.packets for c in per_cpu):
                found = r
                m.zero(int(r))
        return found

    def choose(self, p: Probe) -> tuple[int, abi.Reason | None, int | None, bytes]:
        """(XDP verdict, reason, backend id or None, output frame): the data path's answer."""
        got, reason, _, backend, _, _, _ = self.run(p)
        return got.retval, reason, backend, got.data

    def explain(self, p: Probe, state: Any = None) -> Explanation:
        """The answer with its why; state: the instance's applied.State (weights, health, drains)."""
        got, reason, vip_id, bid, new_flow, entries, cpu = self.run(p)
        verdict = XDP_VERDICTS.get(got.retval, str(got.retval))
        metas = {m.id: (k, m) for k, m in self.lm.vips().items()} if vip_id is not None else {}
        vk, meta = metas.get(vip_id, (None, None))
        table = self.lm.table(vip_id) if vip_id is not None else None
        sched = abi.Sched(meta.sched).name.lower() if meta else None
        slot = None
        if meta and meta.table_size and table:
            if meta.sched == abi.Sched.RR:
                pos = self.live[abi.Map.RR].lookup(vip_id)
                slot = pos[cpu] if pos and pos[cpu] < meta.table_size else 0
            else:
                slot = flow_hash(p) % meta.table_size
        bes = self.lm.backends()
        table_choice = bes[table[slot]].name if slot is not None and slot < len(table) and table[slot] in bes else None
        via, notes = "", []
        if bid is not None:
            hit = [e for e in entries if e.backend_id == bid and e.live]
            order = {"nat conntrack": 0, "connection table": 1, "half-open table": 2}
            if hit and not (p.syn and new_flow):
                via = min(hit, key=lambda e: order[e.table]).table
            else:
                via = "table slot"
                if slot is not None and table[slot] != bid:
                    notes.append(f"the table's slot {slot} names backend id {table[slot]}, not {bid}: "
                                 "the table changed while this ran, or the program differs")
        be_state = _backend_state(bes.get(bid), table, vk, state) if bid is not None else None
        if bid is not None and be_state is None:
            notes.append(f"backend id {bid} has no active entry any more")
        return Explanation(p, verdict, reason, vk.name if vk else None, vip_id, sched, meta.table_size if meta else 0,
                           be_state, via, slot, table_choice, new_flow,
                           tuple(entries), cpu, describe_output(got.data, got.retval), tuple(notes))


def _backend_state(e: Any, table: Any, vk: model.VipKey | None, state: Any) -> BackendState | None:
    if e is None:
        return None
    slots = sum(1 for x in table if x == e.id) if table is not None else 0
    bs = BackendState(e.name, e.id, abi.FwdMode(e.mode).name.lower() if e.mode in abi.FwdMode._value2member_map_
                      else str(e.mode), e.mac, slots=slots)
    if state is None or vk is None:
        return bs
    for v in state.cfg.vips:
        if v.key != vk:
            continue
        for b in v.backends:
            if (b.address, b.port) == (e.address, e.port):
                bid = v.id_of(b)
                return BackendState(bs.name, bs.id, bs.mode, bs.mac, b.weight, b.backup, state.is_down(bid),
                                    bid in state.draining, slots)
    return bs


def describe_output(data: bytes, verdict: int) -> str:
    """What the frame became, in one line: the next hop, and the outer or rewritten addresses."""
    if verdict != 3 or len(data) < 14:
        return ""
    dst = mac_str(data[:6])
    etype = struct.unpack("!H", data[12:14])[0]
    off = 14
    if etype == 0x8100 and len(data) >= 18:
        etype, off = struct.unpack("!H", data[16:18])[0], 18
    if etype == 0x0800 and len(data) >= off + 20:
        proto, src, dsta = data[off + 9], ipaddress.IPv4Address(data[off + 12:off + 16]), ipaddress.IPv4Address(data[off + 16:off + 20])
        ihl = (data[off] & 0xF) * 4
        l4 = off + ihl
    elif etype == 0x86DD and len(data) >= off + 40:
        proto, src, dsta = data[off + 6], ipaddress.IPv6Address(data[off + 8:off + 24]), ipaddress.IPv6Address(data[off + 24:off + 40])
        l4 = off + 40
    else:
        return f"to {dst}"
    kind = {4: "ipip", 41: "ipip6", 17: "udp", 6: "tcp"}.get(proto, str(proto))
    port = ""
    if proto in (6, 17) and len(data) >= l4 + 4:
        port = f":{struct.unpack('!H', data[l4 + 2:l4 + 4])[0]}"
    return f"to {dst}: {kind} {src} -> {model.endpoint(dsta, int(port[1:])) if port else dsta}"


# --- the CLI's entry points -------------------------------------------------------------------------

@dataclass
class Session:
    """explain on an attached instance: its pinned maps, the dry run, its applied state."""
    inst: Any
    maps: dict[str, bpfsys.Map] = field(default_factory=dict)
    dry: DryRun | None = None
    notes: list[str] = field(default_factory=list)

    def __enter__(self) -> "Session":
        from . import applied
        self.maps = loader.open_pinned_maps(self.inst)
        try:
            self.dry = DryRun(self.maps)
            saved = loader.read_schema(self.inst)
            want = loader.fingerprint(loader.BuildConfig(self.inst.pin_dir, max_vips=self.dry.build.max_vips,
                                                         max_backends=self.dry.build.max_backends))
            if saved is not None and saved.source and saved.source != want:
                self.notes.append("the attached program was compiled from other sources (or flags) than this "
                                  "lbxdp's: explain ran this lbxdp's program over its maps; re-attach to compare like with like")
            try:
                self.state = applied.load(self.inst)
            except LbxError:
                self.state = None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.dry is not None:
            self.dry.close()
        for m in self.maps.values():
            m.close()

    def explain(self, p: Probe) -> Explanation:
        assert self.dry is not None
        e = self.dry.explain(p, self.state)
        if self.notes:
            e = Explanation(**{**e.__dict__, "notes": e.notes + tuple(self.notes)})
        return e


# --- preview --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preview:
    vip: str
    change: str
    slots: int                 # slots of the VIP's table
    slots_moved: int           # slots whose backend the change would change
    flows: int                 # connection-table entries of the VIP
    flows_moved: int           # of them, entries of a backend that would lose them or whose table slot moves
    flows_lost: int            # entries of a removed backend (they start over)

    @property
    def slot_share(self) -> float:
        return self.slots_moved / self.slots if self.slots else 0.0

    @property
    def flow_share(self) -> float:
        return self.flows_moved / self.flows if self.flows else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"vip": self.vip, "change": self.change, "slots": self.slots, "slots_moved": self.slots_moved,
                "slot_share": round(self.slot_share, 6), "flows": self.flows, "flows_moved": self.flows_moved,
                "flow_share": round(self.flow_share, 6), "flows_lost": self.flows_lost}

    def text(self) -> list[str]:
        return [f"{self.change} on {self.vip}:",
                f"  new-flow table: {self.slots_moved} of {self.slots} slots change backend ({self.slot_share:.1%})",
                f"  recorded flows: {self.flows_moved} of {self.flows} would hash to another backend "
                f"({self.flow_share:.1%}); {self.flows_lost} belong to a removed backend and start over",
                "  (recorded flows keep their backend while it stays; this is the share a lost "
                "connection-table entry, e.g. after a restart without pins, would move)"]


def preview(m: Maps, state: Any, vip_key: model.VipKey, backend: tuple[model.IPAddress, int],
            weight: int | None, now: float) -> Preview:
    """The VIP's table with backend at weight (None: removed), built the way lbxdp.balancer
    builds it, compared slot by slot with the live table; and the VIP's recorded flows, whose
    slot's backend would change."""
    from . import balancer
    vip = next((v for v in state.cfg.vips if v.key == vip_key), None)
    if vip is None:
        raise LbxError(f"no VIP {vip_key.name} in the applied config", "list them with `lbxdp vip ls`")
    b = next((x for x in vip.backends if (x.address, x.port) == backend), None)
    if b is None:
        raise LbxError(f"{vip_key.name} has no backend {model.endpoint(*backend)}", "list them with `lbxdp backend ls`")
    metas = m.vips()
    if vip_key not in metas:
        raise LbxError(f"{vip_key.name} is in the applied config but not in the maps", "run `lbxdp attach` again")
    meta = metas[vip_key]
    by_addr = {(e.address, e.port): e.id for e in m.backends().values() if e.vip_id == meta.id}
    live = m.table(meta.id)
    if weight is None:
        new_vip = dataclasses.replace(vip, backends=tuple(x for x in vip.backends if x is not b))
        change = f"remove {b.name}"
    else:
        new_vip = dataclasses.replace(vip, backends=tuple(dataclasses.replace(x, weight=weight) if x is b else x
                                                          for x in vip.backends))
        change = f"set weight of {b.name} to {weight}"
    ids = [by_addr.get((x.address, x.port), 0) for x in new_vip.backends]
    new, _ = balancer.build_table(new_vip, ids, state.runtime(now))
    if len(new) == len(live):
        moved = sum(1 for a, c in zip(live, new) if a != c)
    else:   # a round-robin sequence changed length: every position means something else
        moved = len(live)
    gone = by_addr.get(backend) if weight is None else None
    flows = moved_flows = lost = 0
    for e in m.flow_entries():
        if e.vip != vip_key.name or not e.live:
            continue
        flows += 1
        if gone is not None and e.backend_id == gone:
            lost += 1
            moved_flows += 1
            continue
        if meta.sched != abi.Sched.RR and len(new) and len(live):
            p = Probe(e.src, e.sport, e.dst, e.dport, e.protocol)
            s_old, s_new = flow_hash(p) % len(live), flow_hash(p) % len(new)
            if live[s_old] != new[s_new]:
                moved_flows += 1
    return Preview(vip_key.name, change, len(live), moved, flows, moved_flows, lost)


__all__ = ["DryRun", "Explanation", "Preview", "Probe", "Session", "flow_hash", "frame", "parse_probe", "preview"]
