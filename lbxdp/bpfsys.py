"""Thin ctypes layer over the system libbpf (libbpf.so.1, a dependency of Debian's bcc).

Typed map access on file descriptors, pinned objects, XDP attach/query, and BPF_PROG_TEST_RUN
(which bcc 0.26 does not wrap). It knows bytes and ctypes, never the model: lbxdp.maps converts.
Nothing here imports bcc, so a CLI process can read pinned maps without compiling anything.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import mmap
import os
from dataclasses import dataclass
from functools import cache
from typing import Any, Iterator

# enum bpf_map_type values that hold one value per possible CPU.
_PERCPU_MAP_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4

# enum bpf_xdp_attach_mode (what bpf_xdp_query reports)
XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_HW, XDP_ATTACHED_MULTI = range(5)

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


class BpfError(OSError):
    """A libbpf call failed; errno and the call are kept for the error message."""


@cache
def lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        so = ctypes.CDLL(name, use_errno=True)
    except OSError as e:  # pragma: no cover - depends on the machine
        raise BpfError(errno.ENOENT, f"cannot load libbpf ({name}): install libbpf1 (scripts/install.sh)") from e
    vp, u32, i = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    for fn, args in {
        "bpf_obj_get": [ctypes.c_char_p],
        "bpf_obj_pin": [i, ctypes.c_char_p],
        "bpf_obj_get_info_by_fd": [i, vp, ctypes.POINTER(u32)],
        "bpf_map_lookup_elem": [i, vp, vp],
        "bpf_map_update_elem": [i, vp, vp, ctypes.c_uint64],
        "bpf_map_delete_elem": [i, vp],
        "bpf_map_get_next_key": [i, vp, vp],
        "bpf_map_update_batch": [i, vp, vp, ctypes.POINTER(u32), vp],
        "bpf_map_lookup_batch": [i, vp, vp, vp, vp, ctypes.POINTER(u32), vp],
        "bpf_prog_test_run_opts": [i, vp],
        "bpf_xdp_attach": [i, i, u32, vp],
        "bpf_xdp_detach": [i, u32, vp],
        "bpf_xdp_query": [i, i, vp],
        "bpf_prog_get_fd_by_id": [u32],
        "bpf_map_get_fd_by_id": [u32],
        "bpf_map_create": [i, ctypes.c_char_p, u32, u32, u32, vp],
        "libbpf_num_possible_cpus": [],
    }.items():
        f = getattr(so, fn)
        f.argtypes = args
        f.restype = i
    return so


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret < -1 else (ctypes.get_errno() or errno.EIO)
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


@cache
def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def obj_get(path: str | os.PathLike) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"open pinned {os.fspath(path)}")


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin at {os.fspath(path)}")


_SCALARS = {
    "char": ctypes.c_char, "signed char": ctypes.c_byte, "unsigned char": ctypes.c_ubyte,
    "_Bool": ctypes.c_bool, "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int, "unsigned int": ctypes.c_uint, "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
}


def ctype_from_desc(desc: Any) -> type:
    """ctypes type from bcc's JSON type description of a map key or value.

    The description is what bcc's compiler emits (bpf_table_key_desc): a scalar's C name, or
    [name, [[field, type] | [field, type, [dim]] | [field, type, bits], ...], "struct" |
    "struct_packed" | "union"]. Decoding it here, not with bcc's Python module, keeps processes
    that only read maps (status, the exporter) from loading libbcc and its LLVM (the exporter: 104 MiB RSS with it, 43 without).
    """
    if isinstance(desc, str):
        try:
            return _SCALARS[desc]
        except KeyError:
            raise BpfError(errno.EINVAL, f"unsupported map field type {desc!r}") from None
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields: list[tuple[Any, ...]] = []
    for m in members:
        if len(m) == 3 and isinstance(m[2], list):
            fields.append((m[0], ctype_from_desc(m[1]) * m[2][0]))
        elif len(m) == 3 and isinstance(m[2], int):
            fields.append((m[0], ctype_from_desc(m[1]), m[2]))
        elif len(m) == 3:  # a nested struct/union description
            fields.append((m[0] or f"__anon{len(fields)}", ctype_from_desc(m)))
        else:
            fields.append((m[0], ctype_from_desc(m[1])))
    attrs: dict[str, Any] = {"_fields_": fields}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(name), (ctypes.Union if kind == "union" else ctypes.Structure,), attrs)


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info, up to the fields read here (the kernel copies min(len, its size)).
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info, up to verified_insns (Linux 5.16; older kernels leave it 0).
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64), ("verified_insns", ctypes.c_uint32),
    ]
assert _ProgInfo.verified_insns.offset == 216, "struct bpf_prog_info"   # include/uapi/linux/bpf.h


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0   # map_flags (BPF_F_*)

    @property
    def percpu(self) -> bool:
        return self.type in _PERCPU_MAP_TYPES


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    tag: str
    xlated_len: int
    verified_insns: int = 0   # instructions the verifier walked to accept it (its bound: 1,000,000)


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "map info")
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(), info.map_flags)


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "program info")
    return ProgInfo(info.id, info.name.decode(), bytes(info.tag).hex(), info.xlated_prog_len, info.verified_insns)


BPF_MAP_TYPE_ARRAY = 2


def map_fd_by_id(map_id: int) -> int:
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


BPF_F_MMAPABLE = 1 << 10
BPF_F_INNER_MAP = 1 << 12


class _MapCreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts (libbpf >= 0.7)
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


def array_create(name: str, max_entries: int, value_size: int = 4, flags: int = 0) -> int:
    """A new u32-keyed array map; the caller owns the returned fd (e.g. an inner map to swap in).

    An inner map must have its template's flags: the kernel compares them when it is stored.
    """
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(lib().bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode()[:15], 4, value_size, max_entries,
                                       ctypes.byref(opts)),
                  f"create array map {name} of {max_entries} entries")


BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1


def lpm_trie_create(name: str, key_size: int, value_size: int, max_entries: int, flags: int) -> int:
    """A new LPM trie (e.g. an inner map to swap in; flags: its template's); the caller owns the fd."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(lib().bpf_map_create(BPF_MAP_TYPE_LPM_TRIE, name.encode()[:15], key_size, value_size,
                                       max_entries, ctypes.byref(opts)),
                  f"create LPM trie {name} of {max_entries} entries")


def array_fill(fd: int, values: "array.array[int]", *, mmapable: bool = False) -> None:
    """Write values[i] at index i of a u32 array map (created with at least len(values) entries).

    mmapable (the map was created BPF_F_MMAPABLE): through a shared mapping of the map's memory,
    a memory copy (0.4 ms for 65537 values). Otherwise one batch update: one system call, but the
    kernel updates entry by entry (13 ms for 65537 values on the machine of docs/benchmarks.md).
    """
    n = len(values)
    if not n:
        return
    if mmapable:
        # The kernel stores each array value in round_up(value_size, 8) bytes: a u32 array's
        # values lie 8 bytes apart, each in the first 4 bytes of its slot.
        with mmap.mmap(fd, 8 * n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            with memoryview(mm) as raw, raw.cast("I") as slots:
                slots[::2] = memoryview(values)
        return
    keys = array.array("I", range(n))
    count = ctypes.c_uint32(n)
    _check(lib().bpf_map_update_batch(fd, (ctypes.c_uint32 * n).from_buffer(keys),
                                      (ctypes.c_uint32 * n).from_buffer(values), ctypes.byref(count), None),
           f"fill array map of {n} entries")


def array_read(fd: int) -> "array.array[int]":
    """All values of a u32 array map, in index order (batched reads)."""
    m = Map(fd, ctypes.c_uint32, ctypes.c_uint32)
    out = array.array("I", bytes(4 * m.info.max_entries))
    base = out.buffer_info()[0]
    for keys, values, n in m.batches(chunk=min(m.info.max_entries, 65536)):
        # An array map's batches come in index order, without gaps.
        assert keys[n - 1] - keys[0] == n - 1, "array batch out of order"
        ctypes.memmove(base + 4 * keys[0], values, 4 * n)
    return out


def table_fill(fd: int, ids: "array.array[int]", *, mmapable: bool = False) -> None:
    """Write a VIP's selection table (bpf/abi.h LBX_TABLE_SLOTS_PER_WORD: four 16-bit backend ids
    per 8-byte value, slot s in bits (s % 4) * 16 of value s // 4) into a map of u64 values
    created with at least table_words(len(ids)) entries; the last value's unused slots are 0."""
    n = table_words(len(ids))
    if not n:
        return
    packed = array.array("H", ids)
    packed.extend([0] * (4 * n - len(ids)))
    if mmapable:
        with mmap.mmap(fd, 8 * n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[:] = packed.tobytes()
        return
    keys = array.array("I", range(n))
    count = ctypes.c_uint32(n)
    _check(lib().bpf_map_update_batch(fd, (ctypes.c_uint32 * n).from_buffer(keys),
                                      (ctypes.c_uint64 * n).from_buffer(packed), ctypes.byref(count), None),
           "batch update of a table")


def table_words(slots: int) -> int:
    """Values of a table of `slots` slots (bpf/abi.h LBX_TABLE_SLOTS_PER_WORD)."""
    return (slots + 3) // 4


def table_read(fd: int) -> "array.array[int]":
    """A VIP's table as slot -> backend id (table_fill's format), without the last value's unused
    slots (0: no backend id is 0)."""
    m = Map(fd, ctypes.c_uint32, ctypes.c_uint64)
    raw = bytearray(8 * m.info.max_entries)
    for keys, values, n in m.batches(chunk=min(m.info.max_entries, 65536)):
        assert keys[n - 1] - keys[0] == n - 1, "array batch out of order"
        ctypes.memmove((ctypes.c_char * (8 * n)).from_buffer(raw, 8 * keys[0]), values, 8 * n)
    out = array.array("I", array.array("H", bytes(raw)))
    while out and not out[-1]:
        out.pop()
    return out


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


class Map:
    """One BPF map, typed by the ctypes Key and Leaf that bcc derived from the compiled C.

    Per-CPU maps read as a list with one Leaf per possible CPU and are written the same way.
    The fd is closed by close() only if this object owns it.
    """

    def __init__(self, fd: int, key_type: type, leaf_type: type, *, owned: bool = False):
        self.fd, self.Key, self.Leaf, self._owned = fd, key_type, leaf_type, owned
        self.info = map_info(fd)
        if ctypes.sizeof(key_type) != self.info.key_size or ctypes.sizeof(leaf_type) != self.info.value_size:
            raise BpfError(errno.EINVAL, f"map {self.info.name}: layout of the compiled program "
                           f"({ctypes.sizeof(key_type)}/{ctypes.sizeof(leaf_type)} bytes) differs from the "
                           f"map in the kernel ({self.info.key_size}/{self.info.value_size} bytes)")
        self.percpu = self.info.percpu
        if self.percpu:
            # The kernel lays per-CPU values out at 8-byte strides.
            stride = (ctypes.sizeof(leaf_type) + 7) & ~7
            self._cpu_slot = type(f"{leaf_type.__name__}_slot", (ctypes.Structure,),
                                  {"_fields_": [("v", leaf_type), ("_pad", ctypes.c_uint8 * (stride - ctypes.sizeof(leaf_type)))]})
            self._value_type = self._cpu_slot * possible_cpus()
        else:
            self._value_type = leaf_type

    @classmethod
    def pinned(cls, path: str | os.PathLike, key_type: type, leaf_type: type) -> "Map":
        fd = obj_get(path)
        try:
            return cls(fd, key_type, leaf_type, owned=True)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.info.name

    def _key(self, key: Any) -> ctypes.Structure:
        return key if isinstance(key, self.Key) else self.Key(key)

    def lookup(self, key: Any) -> Any:
        """The value (a Leaf, or a list of Leafs for per-CPU maps), or None if there is none."""
        k, v = self._key(key), self._value_type()
        ret = lib().bpf_map_lookup_elem(self.fd, ctypes.byref(k), ctypes.byref(v))
        if ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT:
            return None
        _check(ret, f"lookup in {self.name}")
        return [slot.v for slot in v] if self.percpu else v

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        if self.percpu:
            v = self._value_type()
            values = value if isinstance(value, (list, tuple)) else [value] * len(v)
            for slot, leaf in zip(v, values):
                slot.v = leaf
        else:
            v = value
        _check(lib().bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), flags),
               f"update of {self.name}")

    def update_batch(self, keys: list[Any], values: list[Any]) -> None:
        """Write many entries in one system call (not for per-CPU maps)."""
        if not keys:
            return
        karr = (self.Key * len(keys))(*[self._key(k) for k in keys])
        varr = (self.Leaf * len(values))(*values)
        count = ctypes.c_uint32(len(keys))
        _check(lib().bpf_map_update_batch(self.fd, karr, varr, ctypes.byref(count), None),
               f"batch update of {self.name}")

    def delete(self, key: Any) -> bool:
        """Delete key; False if it was not there."""
        ret = lib().bpf_map_delete_elem(self.fd, ctypes.byref(self._key(key)))
        if ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT:
            return False
        _check(ret, f"delete from {self.name}")
        return True

    def keys(self) -> Iterator[Any]:
        prev, nxt = None, self.Key()
        while True:
            ret = lib().bpf_map_get_next_key(self.fd, ctypes.byref(prev) if prev is not None else None,
                                             ctypes.byref(nxt))
            if ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT:
                return
            _check(ret, f"iterate {self.name}")
            yield nxt
            prev, nxt = nxt, self.Key()

    def batches(self, chunk: int = 16384) -> Iterator[tuple[Any, Any, int]]:
        """(keys array, values array, n) per chunk: one system call per chunk, not per entry.

        For a map of tens of thousands of entries this is what makes a scrape cheap: walking
        keys one get_next_key call at a time costs about 1.7 us per entry.
        """
        keys, values = (self.Key * chunk)(), (self._value_type * chunk)()
        # The batch token is a kernel cursor (a bucket or an index); key_size bytes always hold it.
        token_size = max(ctypes.sizeof(self.Key), 8)
        tok_in, tok_out = ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size)
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = lib().bpf_map_lookup_batch(self.fd, None if first else tok_in, tok_out, keys, values,
                                             ctypes.byref(count), None)
            done = ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT
            if ret < 0 and not done:
                _check(ret, f"batch lookup in {self.name}")
            if count.value:
                yield keys, values, count.value
            if done:
                return
            ctypes.memmove(tok_in, tok_out, token_size)
            first = False

    def count(self) -> int:
        """Entries in the map, counted in batches."""
        return sum(n for _, _, n in self.batches())

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:  # deleted between the two calls
                yield k, v

    def zero(self, key: Any) -> None:
        """Reset one entry to all zero bytes (every CPU's copy for per-CPU maps)."""
        self.update(key, self.Leaf())


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf >= 0.8)
    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRun:
    retval: int       # the XDP verdict
    data: bytes       # the frame as the program left it
    duration_ns: int  # the kernel's average time per run


class TestRunner:
    """BPF_PROG_TEST_RUN on one program with reusable buffers (the benchmark calls it a lot)."""

    __test__ = False  # not a pytest class

    def __init__(self, prog_fd: int, max_frame: int = 4096):
        self.prog_fd = prog_fd
        self._out = ctypes.create_string_buffer(max_frame + 512)
        self._opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
        self._fn = lib().bpf_prog_test_run_opts

    def run(self, frame: bytes, repeat: int = 1) -> TestRun:
        o = self._opts
        o.data_in = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p)
        o.data_size_in = len(frame)
        o.data_out = ctypes.addressof(self._out)
        o.data_size_out = len(self._out)
        o.repeat = repeat
        _check(self._fn(self.prog_fd, ctypes.byref(o)), "BPF_PROG_TEST_RUN")
        return TestRun(o.retval, self._out.raw[: o.data_size_out], o.duration)


class _XdpAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


class _XdpQueryOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", ctypes.c_uint32), ("drv_prog_id", ctypes.c_uint32),
                ("hw_prog_id", ctypes.c_uint32), ("skb_prog_id", ctypes.c_uint32),
                ("attach_mode", ctypes.c_uint8)]


@dataclass(frozen=True)
class XdpState:
    drv_prog_id: int
    skb_prog_id: int

    @property
    def prog_id(self) -> int:
        return self.drv_prog_id or self.skb_prog_id

    @property
    def mode(self) -> str | None:
        return "native" if self.drv_prog_id else "generic" if self.skb_prog_id else None


def xdp_attach(ifindex: int, prog_fd: int, flags: int, old_prog_fd: int | None = None) -> None:
    opts = None
    if old_prog_fd is not None:
        opts = ctypes.byref(_XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts), old_prog_fd=old_prog_fd))
        flags |= XDP_FLAGS_REPLACE
    _check(lib().bpf_xdp_attach(ifindex, prog_fd, flags, opts), "attach XDP program")


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(lib().bpf_xdp_detach(ifindex, flags, None), "detach XDP program")


def xdp_query(ifindex: int) -> XdpState:
    q = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    _check(lib().bpf_xdp_query(ifindex, 0, ctypes.byref(q)), "query XDP state")
    return XdpState(q.drv_prog_id, q.skb_prog_id)
