"""lbxdp.maps.HandshakeTable over a memfd laid out as lbx_nat_new (bpf/abi.h struct nat_new_slot):
slots written by hand as bpf/nat.h hs_write() writes them are found, others are not, a delete
clears the check word only. No kernel: the table's mmap of the map fd is a mmap of the memfd."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import struct
from types import SimpleNamespace
from typing import Iterator

import pytest

from lbxdp import abi, bpfsys
from lbxdp.maps import HandshakeTable, hs_bucket_hash, hs_check, nat_tables

# bcc's type descriptions (what schema.json holds) of the structs, decoded as the loader does.
ADDR = ["lbx_addr", [["w", "unsigned int", [4]]], "struct"]
FLOW_KEY = ["flow_key", [["src", ADDR], ["dst", ADDR], ["sport", "unsigned short"], ["dport", "unsigned short"],
                         ["proto", "unsigned char"], ["family", "unsigned char"], ["pad", "unsigned char", [2]]], "struct"]
NAT_ENTRY = ["nat_entry", [["saddr", ADDR], ["daddr", ADDR], ["sport", "unsigned short"], ["dport", "unsigned short"],
                           ["mac", "unsigned char", [6]], ["dir", "unsigned char"], ["state", "unsigned char"],
                           ["backend_id", "unsigned int"], ["gen", "unsigned short"], ["family", "unsigned char"],
                           ["proto", "unsigned char"], ["seen", "unsigned int"], ["timeout", "unsigned int"],
                           ["created", "unsigned int"]], "struct"]
SLOT = ["nat_new_slot", [["key", FLOW_KEY], ["e", NAT_ENTRY], ["reserved", "unsigned char", [24]]], "struct"]
BUCKET = ["nat_new_bucket", [["check", "unsigned int", [abi.NAT_NEW_WAYS]],
                             ["reserved", "unsigned char", [64 - 4 * abi.NAT_NEW_WAYS]],
                             ["way", SLOT, [abi.NAT_NEW_WAYS]]], "struct"]
BUCKET_SIZE = 64 + abi.NAT_NEW_WAYS * abi.NAT_NEW_SLOT
BUCKETS = 16


@pytest.fixture
def table() -> Iterator[tuple[HandshakeTable, mmap.mmap]]:
    leaf = bpfsys.ctype_from_desc(BUCKET)
    assert ctypes.sizeof(leaf) == BUCKET_SIZE
    fd = os.memfd_create("lbx_nat_new")
    os.ftruncate(fd, BUCKETS * ctypes.sizeof(leaf))
    info = bpfsys.MapInfo(1, bpfsys.BPF_MAP_TYPE_ARRAY, 4, ctypes.sizeof(leaf), BUCKETS, "lbx_nat_new",
                          bpfsys.BPF_F_MMAPABLE)
    t = HandshakeTable(SimpleNamespace(fd=fd, info=info, Key=ctypes.c_uint32, Leaf=leaf, name=info.name))  # type: ignore[arg-type]
    mm = mmap.mmap(fd, BUCKETS * ctypes.sizeof(leaf))
    yield t, mm
    t.close()
    mm.close()
    os.close(fd)


def key(sport: int, src: str = "192.0.2.1", dst: str = "198.51.100.1", dport: int = 80) -> bytes:
    """struct flow_key of src:sport -> dst:dport/tcp (a forward key by default: client -> VIP)."""
    s, d = socket.inet_aton(src).ljust(16, b"\0"), socket.inet_aton(dst).ljust(16, b"\0")
    return s + d + struct.pack("!HH", sport, dport) + bytes([6, abi.FAMILY_V4, 0, 0])


def entry(backend_id: int, created: int, seen: int = 5, reply: bool = False) -> bytes:
    return bytes(42) + bytes([int(reply), 0]) + struct.pack("<IHBBIII", backend_id, 1, abi.FAMILY_V4, 6, seen, 100, created)


def bucket_of(k: bytes, reply: bool = False) -> int:
    """The mapping's offset of k's bucket (its client side's hash, masked)."""
    return (hs_bucket_hash(k, reply) & (BUCKETS - 1)) * BUCKET_SIZE


def put(mm: mmap.mmap, way: int, k: bytes, e: bytes, reply: bool = False) -> int:
    """Write a slot as hs_write() does, into k's bucket; its check word's offset."""
    c = hs_check(k)
    base = bucket_of(k, reply)
    off = base + 64 + way * abi.NAT_NEW_SLOT
    mm[off:off + abi.NAT_NEW_SLOT] = k + e + bytes(24)
    mm[base + 4 * way:base + 4 * way + 4] = struct.pack("<I", c)
    return base + 4 * way


def test_the_check_is_bpf_nat_h_hs_hash() -> None:
    """Values of hs_hash() | 1 worked out by hand from bpf/nat.h for two keys (the datapath tests
    then find the program's slots through it: tests/datapath/test_nat.py)."""
    w = struct.unpack("<10I", key(1000))
    x = ((w[0] ^ w[1] ^ w[2] ^ w[3]) << 32 | (w[4] ^ w[5] ^ w[6] ^ w[7])) ^ (w[8] << 16) ^ w[9]
    x = x * 0x9E3779B97F4A7C15 % 2**64
    x = (x ^ x >> 29) * 0xBF58476D1CE4E5B9 % 2**64
    assert hs_check(key(1000)) == (x >> 32) | 1 and hs_check(key(1000)) & 1
    assert hs_check(key(1000)) != hs_check(key(1001))


def test_the_bucket_is_the_client_sides_hash_so_a_dnat_connection_has_one() -> None:
    """hs_bucket_hash() worked out by hand for a forward key (client 192.0.2.1:1000 -> VIP) and
    the reply key of its DNAT connection (backend 10.0.0.5:8080 -> client 192.0.2.1:1000): one
    value, so both slots share a bucket; the SNAT reply key (-> pool address and port) has its own."""
    w = struct.unpack("<10I", key(1000))
    x = (w[0] ^ w[1] ^ w[2] ^ w[3]) << 32 ^ (w[8] & 0xFFFF) << 16 ^ w[9]
    x = x * 0x9E3779B97F4A7C15 % 2**64
    x = (x ^ x >> 29) * 0xBF58476D1CE4E5B9 % 2**64
    fwd, dnat_reply = key(1000), key(8080, src="10.0.0.5", dst="192.0.2.1", dport=1000)
    snat_reply = key(8080, src="10.0.0.5", dst="203.0.113.9", dport=40000)
    assert hs_bucket_hash(fwd, False) == x >> 32 == hs_bucket_hash(dnat_reply, True)
    assert hs_bucket_hash(snat_reply, True) != hs_bucket_hash(fwd, False)
    assert hs_bucket_hash(key(1001), False) != hs_bucket_hash(fwd, False)   # the port counts


def test_a_reply_key_is_found_in_its_destinations_bucket(table) -> None:
    """lookup() of a key of unknown direction tries its forward bucket, then its reply one;
    update() of a reply entry writes the reply bucket (by the entry's dir)."""
    t, mm = table
    rk = key(8080, src="10.0.0.5", dst="203.0.113.9", dport=40001)
    assert bucket_of(rk, True) != bucket_of(rk, False)   # the test means something
    put(mm, 3, rk, entry(4, 11, reply=True), reply=True)
    got = t.lookup(t.Key.from_buffer_copy(rk))
    assert got is not None and got.backend_id == 4 and got.dir == abi.NatDir.REPLY
    rk2 = key(8080, src="10.0.0.5", dst="203.0.113.9", dport=40002)
    t.update(t.Key.from_buffer_copy(rk2), t.Leaf.from_buffer_copy(entry(5, 12, reply=True)))
    base = bucket_of(rk2, True)
    assert hs_check(rk2) in struct.unpack_from("<4I", mm, base) and t.lookup(t.Key.from_buffer_copy(rk2)).created == 12
    assert t.delete(t.Key.from_buffer_copy(rk2)) and t.lookup(t.Key.from_buffer_copy(rk2)) is None


def test_a_slot_written_as_the_program_writes_it_is_an_entry_and_a_torn_one_is_not(table) -> None:
    t, mm = table
    assert (t.info.max_entries, t.info.key_size, t.info.value_size) == (BUCKETS * abi.NAT_NEW_WAYS, 40, 64)
    put(mm, 2, key(1000), entry(7, 1234))
    off = put(mm, 0, key(1001), entry(8, 99))
    mm[off:off + 4] = struct.pack("<I", struct.unpack_from("<I", mm, off)[0] ^ 2)   # its check does not hold
    got = t.lookup(t.Key.from_buffer_copy(key(1000)))
    assert got is not None and (got.backend_id, got.created, got.seen) == (7, 1234, 5)
    assert t.lookup(t.Key.from_buffer_copy(key(1001))) is None
    assert [bytes(k) for k in t.keys()] == [key(1000)] and t.count() == 1
    [(keys, values, n)] = list(t.batches(chunk=BUCKETS * abi.NAT_NEW_WAYS))
    assert n == 1 and bytes(keys[0]) == key(1000) and values[0].backend_id == 7


def test_a_delete_zeroes_the_check_word_only(table) -> None:
    t, mm = table
    off = put(mm, 1, key(2000), entry(3, 42))   # the check word's offset
    before = mm[:]
    assert t.delete(t.Key.from_buffer_copy(key(2000)))
    assert not t.delete(t.Key.from_buffer_copy(key(2000)))
    after = mm[:]
    assert after[off:off + 4] == bytes(4) and after[off + 4:] == before[off + 4:] and after[:off] == before[:off]


def test_update_writes_the_slot_the_program_finds(table) -> None:
    t, mm = table
    t.update(t.Key.from_buffer_copy(key(3000)), t.Leaf.from_buffer_copy(entry(9, 77)))
    t.update(t.Key.from_buffer_copy(key(3000)), t.Leaf.from_buffer_copy(entry(9, 78)))   # over its own slot
    assert t.count() == 1 and t.lookup(t.Key.from_buffer_copy(key(3000))).created == 78
    h = hs_check(key(3000))
    base = bucket_of(key(3000))
    assert struct.unpack_from("<I", mm, base)[0] == h           # way 0: the first empty one
    assert mm[base + 64:base + 104] == key(3000)
    assert t.clear() == 1 and t.count() == 0 and t.lookup(t.Key.from_buffer_copy(key(3000))) is None


def test_nat_tables_wraps_the_array_and_leaves_an_older_versions_lru_pin_as_it_is(table) -> None:
    t, _ = table
    lru = SimpleNamespace(info=bpfsys.MapInfo(2, 9, 40, 64, 65536, "lbx_nat_new"))   # BPF_MAP_TYPE_LRU_HASH
    nat = SimpleNamespace(info=bpfsys.MapInfo(3, 9, 40, 64, 131072, "lbx_nat"))
    assert nat_tables({abi.Map.NAT: nat, abi.Map.NAT_NEW: lru}) == [nat, lru]
    assert nat_tables({abi.Map.NAT: nat}) == [nat]
    [first, wrapped] = nat_tables({abi.Map.NAT: nat, abi.Map.NAT_NEW: t.m})
    assert first is nat and isinstance(wrapped, HandshakeTable) and wrapped.info.max_entries == BUCKETS * abi.NAT_NEW_WAYS
    wrapped.close()
