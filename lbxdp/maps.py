"""The only module that converts between model values and map structs.

Struct types come from bcc (via lbxdp.loader's schema), never from a Python re-declaration;
make() builds one and refuses field names the compiled C does not have.
"""

from __future__ import annotations

import array
import ctypes
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from . import abi, bpfsys, model


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


@dataclass(frozen=True)
class BackendEntry:
    id: int
    vip_id: int
    address: model.IPAddress
    port: int
    mac: str

    @property
    def name(self) -> str:
        return model.endpoint(self.address, self.port)


@dataclass(frozen=True)
class Stats:
    packets: int = 0
    bytes: int = 0
    new_flows: int = 0


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


class Maps:
    """Typed access to one instance's maps (from a fresh compile or from the pins)."""

    def __init__(self, maps: dict[str, bpfsys.Map]):
        self.m = maps
        self.vip_map = maps[abi.Map.VIPS]
        self.filter_map = maps[abi.Map.VIP_FILTER]
        self.be_map = maps[abi.Map.BACKENDS]
        self.tables_map = maps[abi.Map.TABLES]
        self.flow_map = maps[abi.Map.FLOWS]

    def close(self) -> None:
        for m in self.m.values():
            m.close()

    @property
    def max_vips(self) -> int:
        return self.vip_map.info.max_entries

    @property
    def max_backends(self) -> int:
        return self.be_map.info.max_entries

    # --- VIPs ----------------------------------------------------------------------------------
    def vip_key(self, key: model.VipKey) -> Any:
        return make(self.vip_map.Key, addr=addr_bytes(key.address), port=socket.htons(key.port),
                    proto=key.protocol.number, family=model.family(key.address))

    def vips(self) -> dict[model.VipKey, VipMeta]:
        out = {}
        for k, v in self.vip_map.items():
            proto = {6: model.Protocol.TCP, 17: model.Protocol.UDP}[k.proto]
            key = model.VipKey(addr_from(k.addr, k.family), socket.ntohs(k.port), proto)
            out[key] = VipMeta(v.id, v.table_size, abi.Sched(v.sched), abi.FwdMode(v.mode), v.table_tag)
        return out

    def put_vip(self, key: model.VipKey, meta: VipMeta) -> None:
        """One map write: size, scheduler and mode of the VIP change together."""
        leaf = make(self.vip_map.Leaf, id=meta.id, table_size=meta.table_size,
                    sched=int(meta.sched), mode=int(meta.mode), table_tag=meta.table_tag)
        self.vip_map.update(self.vip_key(key), leaf)

    def delete_vip(self, key: model.VipKey) -> None:
        self.vip_map.delete(self.vip_key(key))

    # --- the VIP address filter -----------------------------------------------------------------
    def vip_filter(self) -> dict[int, int]:
        """The filter's non-zero words: index -> 64 bits."""
        out = {}
        for i in range(self.filter_map.info.max_entries):
            v = self.filter_map.lookup(i)
            if v is not None and v.value:
                out[i] = v.value
        return out

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

    # --- backends ------------------------------------------------------------------------------
    def backends(self) -> dict[int, BackendEntry]:
        """Active backend entries by id."""
        out = {}
        for keys, values, n in self.be_map.batches():
            for i in range(n):
                b, bid = values[i], keys[i]  # an array of c_uint indexes as int
                if bid and b.flags & abi.BE_F_ACTIVE:
                    out[bid] = BackendEntry(bid, b.vip_id, addr_from(b.addr, b.family), socket.ntohs(b.port),
                                            mac_str(b.mac))
        return out

    def put_backend(self, backend_id: int, vip_id: int, b: model.Backend, mac: str) -> None:
        """Write a backend entry. Giving the id to another (VIP, backend) bumps its generation, so
        flows that started on the id's previous owner start over instead of following the id;
        rewriting the same (VIP, backend), e.g. with a new MAC, keeps it and keeps its flows."""
        old = self.be_map.lookup(backend_id)
        same = (old is not None and old.flags & abi.BE_F_ACTIVE and old.vip_id == vip_id
                and bytes(old.addr) == addr_bytes(b.address) and old.port == socket.htons(b.port))
        gen = old.gen if same else _next_gen(old.gen if old is not None else 0)
        leaf = make(self.be_map.Leaf, addr=addr_bytes(b.address), port=socket.htons(b.port),
                    family=model.family(b.address), flags=abi.BE_F_ACTIVE, mac=mac_bytes(mac), gen=gen,
                    vip_id=vip_id)
        self.be_map.update(backend_id, leaf)

    def deactivate_backend(self, backend_id: int) -> None:
        """Clear the entry but keep its generation (the next owner's must differ from it)."""
        old = self.be_map.lookup(backend_id)
        self.be_map.update(backend_id, make(self.be_map.Leaf, gen=old.gen if old is not None else 0))

    # --- selection tables ----------------------------------------------------------------------
    def write_table(self, vip_id: int, backend_ids: "array.array[int]") -> None:
        """Build the VIP's new table aside (a new inner map), then swap it in with one write.

        The old table stays valid for packets already using it and is freed by the kernel when
        the last reference goes. An empty table is not swapped in: a VIP with table_size 0 drops
        new flows before it looks at its table.
        """
        if not len(backend_ids):
            return
        fd = bpfsys.array_create(f"lbx_t{vip_id}", len(backend_ids), flags=bpfsys.BPF_F_INNER_MAP)
        try:
            bpfsys.array_fill(fd, backend_ids)
            self.tables_map.update(vip_id, self.tables_map.Leaf(fd))
        finally:
            os.close(fd)

    def table(self, vip_id: int) -> "array.array[int]":
        """The VIP's live table (empty if it has none)."""
        inner_id = self.tables_map.lookup(vip_id)  # the kernel answers with the inner map's id
        if inner_id is None or not inner_id.value:
            return array.array("I")
        fd = bpfsys.map_fd_by_id(inner_id.value)
        try:
            return bpfsys.array_read(fd)
        finally:
            os.close(fd)

    def delete_table(self, vip_id: int) -> None:
        self.tables_map.delete(vip_id)

    # --- counters ------------------------------------------------------------------------------
    def _sum(self, name: str, key: int) -> Stats:
        per_cpu = self.m[name].lookup(key) or []
        return Stats(sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu),
                     sum(c.new_flows for c in per_cpu))

    def vip_stats(self, vip_id: int) -> Stats:
        return self._sum(abi.Map.VIP_STATS, vip_id)

    def backend_stats(self, backend_id: int) -> Stats:
        return self._sum(abi.Map.BE_STATS, backend_id)

    def reasons(self) -> dict[abi.Reason, tuple[int, int]]:
        """(packets, bytes) per exit reason, summed over CPUs."""
        m, out = self.m[abi.Map.REASONS], {}
        for r in abi.Reason.exits():
            per_cpu = m.lookup(int(r)) or []
            out[r] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out

    def reset_vip_counters(self, vip_id: int) -> None:
        """A reused VIP id starts from zero (counters and round-robin position)."""
        self.m[abi.Map.VIP_STATS].zero(vip_id)
        self.m[abi.Map.RR].zero(vip_id)

    def reset_backend_counters(self, backend_id: int) -> None:
        self.m[abi.Map.BE_STATS].zero(backend_id)

    def vip_views(self) -> tuple[VipView, ...]:
        """Every VIP with its backends and counters, read once (for status and the exporter)."""
        backends = sorted(self.backends().values(), key=lambda e: e.id)
        out = []
        for key, meta in sorted(self.vips().items(), key=lambda kv: kv[1].id):
            live = set(self.table(meta.id)) if meta.table_size else set()
            bes = tuple(BackendView(e.name, self.backend_stats(e.id), e.id in live, e.id, e.mac)
                        for e in backends if e.vip_id == meta.id)
            out.append(VipView(key.name, self.vip_stats(meta.id), bes, meta.id, meta.mode.name.lower(),
                               meta.sched.name.lower(), meta.table_size))
        return tuple(out)

    # --- connection table ----------------------------------------------------------------------
    def flows(self) -> Iterator[tuple[Any, Any]]:
        return self.flow_map.items()

    def purge_flows(self, backend_ids: list[int]) -> int:
        """Delete the connection-table entries of these backend entries; returns how many."""
        ids, doomed = set(backend_ids), []
        for keys, values, n in self.flow_map.batches():
            doomed += [self.flow_map.Key.from_buffer_copy(keys[i]) for i in range(n) if values[i].backend_id in ids]
        return sum(1 for k in doomed if self.flow_map.delete(k))

    def flow_count(self) -> int:
        return self.flow_map.count()
