"""Upgrades that keep the pins: before a new program version is compiled against an instance's
pinned maps, every pinned map whose layout the new version declares differently is converted.

Why this is needed: bcc's BPF_TABLE_PINNED reuses a pinned map by its path without comparing it
with the declaration (src/cc/frontends/clang/b_frontend_action.cc opens the pin and keeps its map
id; src/cc/bpf_module.cc create_maps then uses that map as it is: no check of type, key or value
size, max_entries or flags). What happens next depends on what differs, measured on this kernel:
  - a value larger than the pinned one (struct backend grew from 32 to 64 bytes in issue 9): the
    verifier refuses the program ("invalid access to map value, value_size=32 off=32"), so attach
    fails;
  - more entries declared than pinned (lbx_reasons grew from 14 reasons to 21 in issue 8): the
    program loads and every lookup past the old size fails, so the new reasons were never counted
    after an upgrade;
  - a smaller value, another key, type or flags: the program may load while the control plane
    reads and writes the map with a layout it does not have.

What upgrade() does, per map the new program declares (its expectation comes from one source:
the new program itself, compiled into a staging pin directory, where bcc creates every map
fresh with the new layout):
  - no pin: nothing to keep ("created" by the compile that follows);
  - same type, key size, value size, max_entries and flags, and the same field names as the
    schema the instance saved (and, for lbx_reasons, the same reason names): "kept";
  - otherwise the staged map is filled from the pinned one, converting keys and values field by
    field by name (old layouts from the instance's saved schema.json; a field the old layout
    lacks starts at 0, which for backend.mode means DSR; reason counters by reason name; inner
    tables re-inserted into a new outer map; a release's u32-per-slot tables rewritten as the packed
    tables of bpf/abi.h, slot for slot), and then renamed over the pin (bpffs renames
    atomically: a reader opens the old map or the new one, never a half state): "migrated (N
    entries)". A map that cannot be converted (no saved schema and other sizes; inner tables the
    new template refuses) starts empty: "recreated".
The program that is running keeps its own references to the old maps until the new program
replaces it, so it never sees a converted map half-filled. What it writes meanwhile into a
converted map (new flows, counters, in the few milliseconds between the copy and the program
swap) is not carried over; maps whose layout did not change (the connection table so far) are
shared by both programs and lose nothing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import os
import shutil
from typing import Any, Iterable

from . import abi, bpfsys, loader
from .maps import Stats, new_table, per_cpu_total, stats_total
from .paths import Instance

STAGING = "staging"   # under the instance's pin directory: same bpffs, so rename works (bpffs refuses dots in names)
MAP_OF_MAPS = {12, 13}   # BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS
ARRAYS = {2, 6}          # BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY: every key exists

KEPT, RECREATED = "kept", "recreated"

# Reason names of the releases that did not save them beside the schema, by their LBX_R_MAX:
# ea8d660 (the first release, 14 reasons) and the hardening release (21). Written out, not
# derived from abi.Reason: a later renumbering must not change what those pins meant.
_LEGACY_REASONS = [
    "OK", "TX_FORWARD", "PASS_NOT_IP", "PASS_NOT_VIP", "PASS_NOT_L4", "PASS_TRUNCATED",
    "PASS_BAD_HEADER", "PASS_FRAGMENT", "PASS_IP_OPTIONS", "PASS_IPV6_EXT", "PASS_NO_BACKEND",
    "DROP_NO_BACKEND", "DROP_BACKEND_GONE", "ABORT_REWRITE", "PASS_NOT_FOR_US", "PASS_NO_OWN_MAC",
    "PASS_BAD_IP_LEN", "PASS_BAD_TCP_LEN", "PASS_BAD_UDP_LEN", "PASS_TTL_ZERO", "DROP_BAD_SOURCE",
]
LEGACY_REASONS = {14: _LEGACY_REASONS[:14], 21: _LEGACY_REASONS}


def convert(value: Any, new_type: type) -> Any:
    """value (a ctypes struct, array or scalar of an old layout) as new_type, field by field by
    name: fields new_type lacks are dropped, fields value lacks stay 0, arrays are cut or padded."""
    if isinstance(value, ctypes._SimpleCData):
        value = value.value
    if isinstance(value, (int, bytes, float)):
        return value
    if issubclass(new_type, ctypes.Array):
        out = new_type()
        for i in range(min(len(value), len(out))):
            out[i] = convert(value[i], new_type._type_)
        return out
    out = new_type()
    have = {f[0] for f in type(value)._fields_}
    for f in new_type._fields_:
        if f[0] in have:
            setattr(out, f[0], convert(getattr(value, f[0]), f[1]))
    return out


def _nonzero(v: Any) -> bool:
    return any(bytes(x).strip(b"\0") for x in (v if isinstance(v, list) else [v]))


@dataclasses.dataclass
class _Old:
    """A pinned map as the instance's previous program declared it."""

    fd: int
    info: bpfsys.MapInfo
    desc: dict[str, Any] | None   # its entry in the saved schema, if there is one


def upgrade(inst: Instance, build: loader.BuildConfig) -> dict[str, str]:
    """Make every pinned map of inst fit the program `build` compiles; returns map name ->
    "kept" | "migrated (N entries)" | "recreated" | "created" (no pin was there)."""
    staging = inst.pin_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    saved = loader.read_schema(inst)
    if saved is not None and pins_unchanged(inst, build, saved):
        return {name: KEPT for name in saved.layouts}
    staged = loader.compile_program(dataclasses.replace(build, pin_dir=staging))
    out: dict[str, str] = {}
    try:
        for name in staged.maps:   # abi.Map order: the table template before the tables
            try:
                fd = bpfsys.obj_get(inst.pin_dir / name)
            except OSError:
                out[name] = "created"
                continue
            try:
                old = _Old(fd, bpfsys.map_info(fd), saved.maps.get(name) if saved else None)
                out[name] = _adopt(name, old, staged, saved, out)
            finally:
                os.close(fd)
            if out[name] != KEPT:
                os.rename(staging / name, inst.pin_dir / name)   # atomic on bpffs
        if out.get(abi.Map.TABLES) == RECREATED:
            _forget_table_tags(inst, staged)
        if out.get(abi.Map.VIP_RETIRED) == "created" and (inst.pin_dir / abi.LEGACY_VIP_STATS).exists():
            n = _retire_legacy_vip_stats(inst, staged)
            os.rename(staging / abi.Map.VIP_RETIRED.value, inst.pin_dir / abi.Map.VIP_RETIRED.value)
            os.unlink(inst.pin_dir / abi.LEGACY_VIP_STATS)   # the running program keeps its own reference
            out[abi.Map.VIP_RETIRED] = f"migrated ({n} entries, from {abi.LEGACY_VIP_STATS})"
    finally:
        staged.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out


def pins_unchanged(inst: Instance, build: loader.BuildConfig, saved: loader.SavedSchema | None,
                   source: loader.Source = loader.BALANCER, reasons: Iterable[enum.Enum] = abi.Reason) -> bool:
    """The same sources and flags as the pins were made by, and every pin still the layout they
    declared: nothing to compare map by map (a same-version re-attach compiles once, not twice).
    Also lbxdp.decap's test (source=loader.DECAP, reasons=abi.DecapReason)."""
    if saved is None or not saved.source or saved.source != loader.fingerprint(build, source) or \
            saved.reasons != [r.name for r in reasons]:
        return False
    for name, want in saved.layouts.items():
        try:
            fd = bpfsys.obj_get(inst.pin_dir / name)
        except OSError:
            return False
        try:
            if list(loader.layout(bpfsys.map_info(fd))) != want:
                return False
        finally:
            os.close(fd)
    return bool(saved.layouts)


def _reason_names(saved: loader.SavedSchema | None, old: _Old) -> list[str] | None:
    if saved is not None and saved.reasons is not None:
        return saved.reasons
    return LEGACY_REASONS.get(old.info.max_entries)


def _adopt(name: str, old: _Old, staged: loader.Program, saved: loader.SavedSchema | None,
           done: dict[str, str]) -> str:
    new = staged.maps[name]
    same = loader.layout(old.info) == loader.layout(new.info) and (old.desc is None or old.desc == staged.schema[name])
    if name == abi.Map.REASONS:
        same = same and _reason_names(saved, old) == [r.name for r in abi.Reason]
    if name == abi.Map.TABLES:
        # Inner tables must have the template's flags: a new template means new tables.
        same = same and done.get(abi.Map.TABLE_TMPL) == KEPT
    if same:
        return KEPT
    tmpl = staged.maps[abi.Map.TABLE_TMPL].info if name == abi.Map.TABLES else None
    n = _copy(name, old, new, saved, tmpl)
    return RECREATED if n is None else f"migrated ({n} entries)"


def _copy(name: str, old: _Old, new: bpfsys.Map, saved: loader.SavedSchema | None,
          tmpl: bpfsys.MapInfo | None = None) -> int | None:
    """Fill new from old; the number of entries copied, or None if old cannot be read as new.
    tmpl: for lbx_tables, the new template (tables of another value size are rewritten to it)."""
    if name == abi.Map.TABLE_TMPL:
        return 0   # never holds anything
    if old.info.type in MAP_OF_MAPS:
        return _copy_inner_maps(old, new, tmpl)
    if old.info.type != new.info.type and (old.info.type in ARRAYS or new.info.type in ARRAYS):
        # A hash's keys are no array's indexes: lbx_half_open became an array of buckets (its
        # handshakes in flight then get their table's choice for the ACK, as after an eviction),
        # and so did lbx_nat_new (NAT handshakes in flight lose their entries, as after an
        # eviction: the client's retransmitted SYN opens the connection again).
        return None
    if old.desc is not None:
        key_t, leaf_t = bpfsys.ctype_from_desc(old.desc["key"]), bpfsys.ctype_from_desc(old.desc["leaf"])
    elif (old.info.key_size, old.info.value_size) == (new.info.key_size, new.info.value_size):
        key_t, leaf_t = new.Key, new.Leaf   # no saved schema, but only the entry count changed
    else:
        return None
    src = bpfsys.Map(old.fd, key_t, leaf_t)
    names = _reason_names(saved, old) if name == abi.Map.REASONS else None
    if name == abi.Map.REASONS and names is None:
        return None   # counters whose reasons nobody recorded cannot be told apart
    n = 0
    for k, v in src.items():
        if old.info.type in ARRAYS and not _nonzero(v):
            continue
        key = convert(k, new.Key)
        if names is not None:
            reason = names[key] if key < len(names) else None
            if reason not in abi.Reason.__members__:
                continue   # a reason this version no longer has
            key = int(abi.Reason[reason])
        if old.info.type in ARRAYS and key >= new.info.max_entries:
            continue
        new.update(key, [convert(x, new.Leaf) for x in v] if isinstance(v, list) else convert(v, new.Leaf))
        n += 1
    return n


def _copy_inner_maps(old: _Old, new: bpfsys.Map, tmpl: bpfsys.MapInfo | None = None) -> int | None:
    """Put the old outer map's inner maps (by id) into the new one; None if it refuses one.
    tmpl (lbx_tables): an old table whose value size is not the template's (a u32 per slot, before
    the packed tables of bpf/abi.h) is rewritten as a new table with the same slots."""
    src = bpfsys.Map(old.fd, new.Key, new.Leaf)
    n = 0
    for k, inner_id in src.items():
        if not inner_id.value:
            continue
        fd = bpfsys.map_fd_by_id(inner_id.value)
        try:
            if tmpl is not None and bpfsys.map_info(fd).value_size == 4 and tmpl.value_size == 8:
                ids = bpfsys.array_read(fd)
                os.close(fd)
                fd = -1
                fd = new_table(f"lbx_t{int.from_bytes(bytes(k), 'little')}", ids, tmpl.flags)
            new.update(k, new.Leaf(fd))
        except bpfsys.BpfError:
            return None
        finally:
            if fd >= 0:
                os.close(fd)
        n += 1
    return n


def _retire_legacy_vip_stats(inst: Instance, staged: loader.Program) -> int:
    """Fill the staged lbx_vip_retired from an older program's lbx_vip_stats (per-CPU VIP counters
    it wrote per packet, as it wrote lbx_be_stats and the tx_forward reason): a VIP's retired
    counters are its old ones less its active entries' (which go on counting), and
    LBX_RETIRED_ALL's are every packet forwarded so far (tx_forward and the ICMP errors steered)
    less every entry's. Neither a VIP's counters nor tx_forward move at the upgrade. The entries'
    counters are read first: a packet the running program counts meanwhile may be counted twice,
    never lost (a counter that went down would read as a reset). Returns the entries written."""
    new, st, bt, rt = (staged.maps[m] for m in (abi.Map.VIP_RETIRED, abi.Map.BE_STATS, abi.Map.BACKENDS, abi.Map.REASONS))
    pin = inst.pin_dir
    with bpfsys.Map.pinned(pin / abi.Map.BE_STATS.value, st.Key, st.Leaf) as be_stats, \
            bpfsys.Map.pinned(pin / abi.Map.BACKENDS.value, bt.Key, bt.Leaf) as backends:
        active = {int(k.value if hasattr(k, "value") else k): e.vip_id for k, e in backends.items()
                  if e.flags & abi.BE_F_ACTIVE}
        active.pop(0, None)
        live = {bid: per_cpu_total(be_stats.lookup(bid)) for bid in active}
        every = stats_total(be_stats)   # tx_forward sums every entry (maps.Maps.reasons)
    with bpfsys.Map.pinned(pin / abi.LEGACY_VIP_STATS, st.Key, st.Leaf) as legacy, \
            bpfsys.Map.pinned(pin / abi.Map.REASONS.value, rt.Key, rt.Leaf) as reasons:
        old = {int(k.value if hasattr(k, "value") else k): per_cpu_total(v) for k, v in legacy.items()}
        fwd = per_cpu_total(reasons.lookup(int(abi.Reason.TX_FORWARD)))
        steered = per_cpu_total(reasons.lookup(int(abi.Reason.TX_ICMP_STEERED)))
    rows = {}
    for vip, o in old.items():
        if vip < new.info.max_entries - 1 and o != Stats():
            mine = [live[b] for b, v in active.items() if v == vip]
            rows[vip] = Stats(*(max(0, getattr(o, f) - sum(getattr(m, f) for m in mine))
                                for f in ("packets", "bytes", "new_flows")))
    rows[new.info.max_entries - 1] = Stats(max(0, fwd.packets + steered.packets - every.packets),
                                           max(0, fwd.bytes + steered.bytes - every.bytes), 0)
    for index, r in rows.items():
        new.update(index, new.Leaf(packets=r.packets, bytes=r.bytes, new_flows=r.new_flows))
    return len(rows)


def _forget_table_tags(inst: Instance, staged: loader.Program) -> None:
    """The tables were recreated empty: make the next apply rebuild every VIP's table (a VIP whose
    tag still matched its config would be skipped)."""
    vips = staged.maps[abi.Map.VIPS]
    with bpfsys.Map.pinned(inst.pin_dir / abi.Map.VIPS.value, vips.Key, vips.Leaf) as pinned:
        for k, v in list(pinned.items()):
            v.table_tag = 0
            pinned.update(k, v)
