"""`lbxdp decap`: the backend side of the routed modes. Attach, re-attach, detach and read
lbxdp_decap (bpf/decap.c), which opens IPIP, IP6IP6, 4-in-6 and GUE packets addressed to this
host and passes the inner packet, addressed to a VIP on this host's lo, to the stack.

Why XDP and not tc: XDP sees the frame before the kernel allocates an skb, so the stripped
packet enters the stack once, as if it had arrived unencapsulated, and no tunnel module is
needed. tc (cls_bpf with bpf_skb_adjust_room) would be needed on an interface whose driver
cannot run XDP at all, and generic XDP covers every interface the kernel can attach a program
to, so no tc fallback is built: `--mode generic` is the answer on such an interface.

An instance is one interface (in one namespace), kept apart from the balancer's instances: pins
under /sys/fs/bpf/lbxdp-decap/<ifname>/ (netns/<name>/<ifname> in a namespace), run state under
/run/lbxdp-decap/; both roots follow LBXDP_PIN_ROOT / LBXDP_RUN_ROOT with "-decap" appended.
The same rules as lbxdp.paths: names validated, directories root's and 0700, and an attach
that fails leaves what was there: everything is validated and compiled first, the address table
is written into the half the attached program does not read, and the program compiled for it
replaces the old one in one atomic swap, so a packet sees the old settings or the new, whole.

The program is specialised to its configuration (program_defines; bpf/decap_abi.h): the table
half it reads, the GUE port, strict or loose and, for up to CONST_ADDRS addresses of a family,
the host addresses and VIPs themselves are compile-time constants, so an opened packet reads no
map but its counter. Every attach compiles anyway; lbxd_ctl records what the program was
compiled with (status reads it). The host addresses are taken at attach, as before: after an
address change, attach again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import __version__, abi, bpfsys, loader, migrate
from .errors import LbxError
from .paths import Instance, atomic_write, pin_root, private_dirs, run_root

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_GUE_PORT = 6080
STAGING = "staging"


def decap_pin_root() -> Path:
    return Path(str(pin_root()) + "-decap")


def decap_run_root() -> Path:
    return Path(str(run_root()) + "-decap")


@dataclass(frozen=True)
class DecapInstance(Instance):
    """lbxdp_decap on one interface: an Instance (same name rules, same run-dir files) whose
    pins and run state live under the decap roots."""

    pin_base = staticmethod(decap_pin_root)
    run_base = staticmethod(decap_run_root)


# --- the address table (bpf/decap_abi.h) --------------------------------------------------------

def addr_bytes(a: IPAddress) -> bytes:
    return a.packed.ljust(16, b"\0")


def family(a: IPAddress) -> int:
    return abi.FAMILY_V4 if a.version == 4 else abi.FAMILY_V6


def home_slot(a: IPAddress) -> int:
    """What find_addr() (bpf/decap_table.h) hashes a to: the first slot it probes."""
    w = struct.unpack("=4I", addr_bytes(a))   # the words as the CPU loads them
    return (((w[0] ^ w[1] ^ w[2] ^ w[3]) * abi.VIP_FILTER_MUL) & 0xFFFFFFFF) >> (32 - abi.DECAP_SLOT_BITS)


@dataclass(frozen=True)
class Entry:
    addr: IPAddress
    flags: int
    vip_id: int = 0


def build_table(entries: Iterable[Entry]) -> dict[int, Entry]:
    """slot -> entry, placed the way find_addr() probes (home slot, then the next ones, at most
    LBX_DECAP_PROBES); too many entries, or one that does not fit its probes, is an error."""
    entries = list(entries)
    if len(entries) > abi.DECAP_MAX_ENTRIES:
        raise LbxError(f"{len(entries)} host addresses and VIPs: lbxdp decap holds at most "
                       f"{abi.DECAP_MAX_ENTRIES}", "configure fewer VIPs", exit_code=2)
    table: dict[int, Entry] = {}
    for e in entries:
        h = home_slot(e.addr)
        for i in range(abi.DECAP_PROBES):
            s = (h + i) & (abi.DECAP_SLOTS - 1)
            if s not in table:
                table[s] = e
                break
        else:   # practically impossible at <= 1/4 load; refused rather than half-found
            raise LbxError(f"{e.addr} collides with {abi.DECAP_PROBES} other addresses in the decap table",
                           "remove an address or VIP and try again", exit_code=2)
    return table


CONST_ADDRS = 8   # at most this many host addresses (VIPs) of a family are compiled into the program


def _words(a: IPAddress) -> list[str]:
    b = addr_bytes(a)
    return [f"{struct.unpack('=I', b[4 * i:4 * i + 4])[0]:#x}" for i in range(1 if a.version == 4 else 4)]


def program_defines(table: dict[int, Entry], gue_port: int, loose: bool, half: int,
                    const_addrs: int = CONST_ADDRS) -> tuple[str, ...]:
    """The -D switches that specialise lbxdp_decap to one configuration (bpf/decap_abi.h): the
    table half it reads, the GUE port (as the program loads it, network order), loose or strict,
    and each set (host addresses, VIPs; per family) of at most const_addrs addresses as constants
    compared in the code, so that the program reads no map to decide; a larger set is left to the
    table. Words as the CPU loads them, like the table's (addr_bytes)."""
    defs = [f"LBXD_HALF={half}", f"LBXD_GUE_PORT={struct.unpack('=H', struct.pack('!H', check_port(gue_port)))[0]:#x}",
            f"LBXD_LOOSE={int(loose)}"]
    entries = sorted(table.values(), key=lambda e: (e.addr.version, e.addr))
    for flag, name in ((abi.DECAP_F_HOST, "HOSTS"), (abi.DECAP_F_VIP, "VIPS")):
        for version in (4, 6):
            mine = [e for e in entries if e.flags & flag and e.addr.version == version]
            if len(mine) > const_addrs:
                continue   # the table
            items = [",".join(_words(e.addr) + ([str(e.vip_id)] if flag == abi.DECAP_F_VIP else [])) for e in mine]
            defs.append(f"LBXD_{name}{version}(X)=" + " ".join(f"X({i})" for i in items))
    return tuple(defs)


def host_addresses(exclude: Iterable[IPAddress] = ()) -> list[IPAddress]:
    """Every address of this network namespace, except loopback ones (127/8, ::1) and those in
    exclude (the VIPs: a VIP on lo is no tunnel endpoint)."""
    from pyroute2 import IPRoute
    skip = set(exclude)
    with IPRoute() as ipr:
        out = [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]
    return sorted({a for a in out if not a.is_loopback and a not in skip}, key=lambda a: (a.version, a))


def check_vips(vips: Iterable[Any]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for v in vips:
        try:
            a = ipaddress.ip_address(str(v).strip("[]"))
        except ValueError:
            raise LbxError(f"{v!r} is not an IP address", "give --vip as an IPv4 or IPv6 address, "
                           "e.g. --vip 10.0.0.10", exit_code=2) from None
        if a.is_unspecified or a.is_multicast or a.is_loopback:
            raise LbxError(f"--vip {a} cannot be a VIP (unspecified, multicast or loopback)",
                           "give the VIP address the balancer announces", exit_code=2)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
            raise LbxError(f"--vip {a} is an IPv4-mapped IPv6 address", f"give it as {a.ipv4_mapped}", exit_code=2)
        if a not in out:
            out.append(a)
    return out


def check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise LbxError(f"--gue-port {port} is not a UDP port", "give 1-65535 (0 turns GUE off)", exit_code=2)
    return port


# --- attach, detach ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AttachResult:
    mode: str
    prog_id: int
    upgraded: bool
    addresses: tuple[IPAddress, ...]
    vips: tuple[IPAddress, ...]
    counters_reset: bool = False   # the program changed: its maps were made anew


def _prog_id(inst: DecapInstance) -> int | None:
    try:
        fd = bpfsys.obj_get(inst.prog_pin)
    except OSError:
        return None
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


def attach(inst: DecapInstance, vips: Iterable[Any], gue_port: int = DEFAULT_GUE_PORT, mode: str = "auto",
           loose: bool = False, force: bool = False) -> AttachResult:
    """Compile lbxdp_decap, fill its table with this host's addresses and the VIPs, attach it to
    inst's interface and pin it. Again on an attached instance: addresses and settings refreshed
    (counters kept when the program is the same)."""
    vip_list = check_vips(vips)
    check_port(gue_port)
    if not vip_list and not loose:
        raise LbxError("no --vip given: strict mode would open no tunnel",
                       "give the VIPs this backend serves (--vip ADDR, repeatable) or pass --loose", exit_code=2)
    if mode not in loader.MODES:
        raise LbxError(f"unknown XDP mode {mode!r}", f"use one of {', '.join(loader.MODES)}", exit_code=2)
    private_dirs(inst)
    idx = loader.ifindex(inst.ifname)
    current = bpfsys.xdp_query(idx).prog_id
    if current and current != _prog_id(inst) and not force:
        raise LbxError(f"{inst.label} already has an XDP program (id {current}) that lbxdp decap did not attach "
                       "(the balancer's, or another one)",
                       f"detach it first (ip link set dev {inst.ifname} xdp off) or pass --force to replace it")
    addrs = host_addresses(exclude=vip_list)
    if not addrs:
        raise LbxError("this host (network namespace) has no address a tunnel could be sent to",
                       f"give {inst.ifname} an address first (ip addr add ADDR/LEN dev {inst.ifname})")
    vip_ids = _vip_ids(inst, vip_list)
    entries = [Entry(a, abi.DECAP_F_HOST) for a in addrs] + \
              [Entry(v, abi.DECAP_F_VIP, vip_ids[v]) for v in vip_list]
    table = build_table(entries)   # every check before anything is made
    loader.ensure_bpffs()
    private_dirs(inst, create=True)
    build = loader.BuildConfig(inst.pin_dir)
    upgraded = inst.exists()
    same = upgraded and migrate.pins_unchanged(inst, build, loader.read_schema(inst), loader.DECAP, abi.DecapReason)
    # The new program reads the table half the attached one does not (fresh maps: half 1); its
    # constants are not part of `build`, whose fingerprint says whether the pins can be kept.
    half = 1 - _active_half(inst) if same else 1
    staging = inst.pin_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    target = build if same or not upgraded else dataclasses.replace(build, pin_dir=staging)
    target = dataclasses.replace(target, defines=program_defines(table, gue_port, loose, half))
    try:
        prog = loader.compile_program(target, loader.DECAP)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not upgraded:
            _remove_files(inst)
        raise
    try:
        maps = prog.maps
        if same:
            known = _current_vips(maps)
            for v in vip_list:
                if v not in known:
                    maps[abi.DecapMap.VIP_STATS].zero(vip_ids[v])
        # The half the attached program does not read; the new program reads it from its
        # first packet (LBXD_HALF), and lbxd_ctl records it once that program is attached.
        new_ctl = stage(maps, table, gue_port, loose, half)
        used = loader.attach(inst.ifname, prog.fd, mode)   # the kernel swaps programs atomically
        flip(maps, new_ctl)
        if upgraded and not same:
            for name in prog.maps:   # bpffs renames atomically
                os.rename(staging / name, inst.pin_dir / name)
        if inst.prog_pin.exists():
            inst.prog_pin.unlink()
        bpfsys.obj_pin(prog.fd, inst.prog_pin)
        _save_schema(inst, prog, build)
        inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(inst.state_file, json.dumps({
            "ifname": inst.ifname, "netns": inst.netns, "mode": used, "prog_id": prog.info.id,
            "attached_at": time.time(), "version": __version__, "gue_port": gue_port, "loose": loose,
            "vips": [str(v) for v in vip_list]}, indent=2))
    except BaseException:
        if not upgraded:
            try:
                if bpfsys.xdp_query(idx).prog_id == prog.info.id:
                    loader.detach(inst.ifname)
            finally:
                _remove_files(inst)
        raise
    finally:
        prog.close()
        shutil.rmtree(staging, ignore_errors=True)
    return AttachResult(used, prog.info.id, upgraded, tuple(addrs), tuple(vip_list), upgraded and not same)


def _save_schema(inst: DecapInstance, prog: loader.Program, build: loader.BuildConfig) -> None:
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(inst.schema_file, json.dumps({
        "maps": prog.schema, "reasons": [r.name for r in abi.DecapReason],
        "source": loader.fingerprint(build, loader.DECAP), "layouts": prog.layouts}))


def _active_half(inst: DecapInstance) -> int:
    """The table half the attached program reads (lbxd_ctl.active), 0 if none can be read."""
    try:
        with opened(inst) as maps:
            return int(maps[abi.DecapMap.CTL].lookup(0).active)
    except (LbxError, OSError):
        return 0


def stage(maps: dict[str, bpfsys.Map], table: dict[int, Entry], gue_port: int, loose: bool, half: int) -> Any:
    """Write table into half `half` of lbxd_addrs (the one the attached program does not read);
    returns the lbxd_ctl value that records it with these settings (flip() writes it once a
    program compiled with program_defines(table, gue_port, loose, half) is attached)."""
    _write_table(maps[abi.DecapMap.ADDRS], half, table)
    ctl = maps[abi.DecapMap.CTL].Leaf()
    ctl.gue_port = struct.unpack("=H", struct.pack("!H", check_port(gue_port)))[0]   # network order
    ctl.flags = abi.DECAP_CTL_F_LOOSE if loose else 0
    ctl.active = half
    return ctl


def flip(maps: dict[str, bpfsys.Map], ctl: Any) -> None:
    """Record the half (and settings) the attached program uses: what status and the next attach read."""
    maps[abi.DecapMap.CTL].update(0, ctl)


def _write_table(m: bpfsys.Map, half: int, table: dict[int, Entry]) -> None:
    """Every slot of table half `half` (the one the program does not read), empty ones too."""
    keys, values = [], []
    for s in range(abi.DECAP_SLOTS):
        leaf = m.Leaf()
        e = table.get(s)
        if e is not None:
            ctypes_addr = addr_bytes(e.addr)
            for i in range(4):
                leaf.addr.w[i] = struct.unpack("=I", ctypes_addr[4 * i:4 * i + 4])[0]
            leaf.family, leaf.flags, leaf.vip_id = family(e.addr), e.flags, e.vip_id
        keys.append(half * abi.DECAP_SLOTS + s)
        values.append(leaf)
    m.update_batch(keys, values)


def read_table(m: bpfsys.Map, half: int) -> list[Entry]:
    out = []
    for s in range(abi.DECAP_SLOTS):
        leaf = m.lookup(half * abi.DECAP_SLOTS + s)
        if leaf is None or not leaf.family:
            continue
        raw = b"".join(struct.pack("=I", leaf.addr.w[i]) for i in range(4))
        a: IPAddress = ipaddress.IPv4Address(raw[:4]) if leaf.family == abi.FAMILY_V4 else ipaddress.IPv6Address(raw)
        out.append(Entry(a, leaf.flags, leaf.vip_id))
    return out


def _current_vips(maps: dict[str, bpfsys.Map]) -> dict[IPAddress, int]:
    m = maps[abi.DecapMap.ADDRS]
    ctl = maps[abi.DecapMap.CTL].lookup(0)
    return {e.addr: e.vip_id for e in read_table(m, ctl.active) if e.flags & abi.DECAP_F_VIP}


def _vip_ids(inst: DecapInstance, vips: list[IPAddress]) -> dict[IPAddress, int]:
    """A per-VIP counter slot for each VIP: the one it has if the instance has it already."""
    have: dict[IPAddress, int] = {}
    if inst.exists():
        try:
            with opened(inst) as maps:
                have = _current_vips(maps)
        except (LbxError, OSError):
            have = {}
    if len(vips) > abi.DECAP_MAX_VIPS:
        raise LbxError(f"{len(vips)} VIPs: lbxdp decap counts at most {abi.DECAP_MAX_VIPS}", "give fewer --vip",
                       exit_code=2)
    ids = {v: have[v] for v in vips if v in have}
    free = iter(sorted(set(range(abi.DECAP_MAX_VIPS)) - set(ids.values())))
    for v in vips:
        if v not in ids:
            ids[v] = next(free)
    return ids


def detach(inst: DecapInstance) -> bool:
    """Remove lbxdp_decap from the interface and its pins; False if it was not attached."""
    from .control import _removable
    _removable(inst)
    was = inst.exists()
    try:
        idx: int | None = loader.ifindex(inst.ifname)
    except LbxError:
        idx = None
    if idx is not None and was:
        ours = _prog_id(inst)
        if ours and bpfsys.xdp_query(idx).prog_id == ours:
            loader.detach(inst.ifname)
    _remove_files(inst)
    return was


def _remove_files(inst: DecapInstance) -> None:
    from .control import _remove_files as remove
    remove(inst)


# --- status -------------------------------------------------------------------------------------

class opened:
    """The pinned maps of an attached instance (typed from its saved schema), closed on exit."""

    def __init__(self, inst: DecapInstance):
        private_dirs(inst)
        if not inst.exists():
            raise LbxError(f"lbxdp decap is not attached to {inst.label}",
                           f"attach it: lbxdp decap attach {inst.ifname} --vip ADDR")
        self.maps = loader.open_pinned_maps(inst)

    def __enter__(self) -> dict[str, bpfsys.Map]:
        return self.maps

    def __exit__(self, *exc: Any) -> None:
        for m in self.maps.values():
            m.close()


@dataclass(frozen=True)
class DecapStatus:
    ifname: str
    netns: str | None
    mode: str | None
    prog_id: int | None
    gue_port: int
    loose: bool
    addresses: tuple[str, ...]
    vips: dict[str, tuple[int, int]] = field(default_factory=dict)      # VIP -> (packets, bytes)
    reasons: dict[str, tuple[int, int]] = field(default_factory=dict)   # reason name -> (packets, bytes)

    def to_json(self) -> dict[str, Any]:
        return {"ifname": self.ifname, "netns": self.netns, "mode": self.mode, "prog_id": self.prog_id,
                "gue_port": self.gue_port, "loose": self.loose, "addresses": list(self.addresses),
                "vips": {v: {"packets": p, "bytes": b} for v, (p, b) in self.vips.items()},
                "reasons": {r: {"packets": p, "bytes": b} for r, (p, b) in self.reasons.items()}}


def _sum(per_cpu: Any) -> tuple[int, int]:
    per_cpu = per_cpu or []
    return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)


def reason_counts(maps: dict[str, bpfsys.Map]) -> dict[abi.DecapReason, tuple[int, int]]:
    """reason -> (packets, bytes). A frame decapsulated to a VIP is counted in that VIP's row only
    (bpf/decap_table.h: vip_counter), so PASS_DECAP is its own row (loose mode's) plus every VIP row."""
    reasons, stats = maps[abi.DecapMap.REASONS], maps[abi.DecapMap.VIP_STATS]
    counts = {r: _sum(reasons.lookup(int(r))) for r in abi.DecapReason.exits()}
    p, b = counts[abi.DecapReason.PASS_DECAP]
    for _, values, n in stats.batches():   # one system call, not one per VIP id
        for i in range(n):
            vp, vb = _sum([slot.v for slot in values[i]])
            p, b = p + vp, b + vb
    counts[abi.DecapReason.PASS_DECAP] = (p, b)
    return counts


def status(inst: DecapInstance) -> DecapStatus:
    with opened(inst) as maps:
        ctl = maps[abi.DecapMap.CTL].lookup(0)
        entries = read_table(maps[abi.DecapMap.ADDRS], ctl.active)
        stats = maps[abi.DecapMap.VIP_STATS]
        vips = {str(e.addr): _sum(stats.lookup(e.vip_id)) for e in entries if e.flags & abi.DECAP_F_VIP}
        counts = {r.name.lower(): c for r, c in reason_counts(maps).items()}
        port = struct.unpack("!H", struct.pack("=H", ctl.gue_port))[0]
        loose = bool(ctl.flags & abi.DECAP_CTL_F_LOOSE)
    try:
        state = json.loads(inst.state_file.read_text())
    except (OSError, ValueError):
        state = {}
    addrs = tuple(str(e.addr) for e in entries if e.flags & abi.DECAP_F_HOST)
    return DecapStatus(inst.ifname, inst.netns, state.get("mode"), _prog_id(inst), port, loose, addrs, vips, counts)


def format_status(st: DecapStatus) -> str:
    lines = [f"{st.ifname}{f' (netns {st.netns})' if st.netns else ''}: lbxdp decap, {st.mode or '?'} mode, "
             f"program id {st.prog_id}, GUE port {st.gue_port or 'off'}, {'loose' if st.loose else 'strict'}",
             f"  host addresses: {', '.join(st.addresses) or '(none)'}"]
    lines.append("  VIPs:" + ("" if st.vips else " (none)"))
    for v, (p, b) in st.vips.items():
        lines.append(f"    {v:<40} {p:>12} packets {b:>14} bytes")
    lines.append("  reasons:")
    for r, (p, b) in st.reasons.items():
        lines.append(f"    {r:<28} {p:>12} packets {b:>14} bytes")
    return "\n".join(lines)
