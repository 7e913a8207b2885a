"""The only module that imports bcc: compile, load, pin, attach, detach.

bcc rewrites map calls (lbx_vips.lookup(...)) only in its main file, so render() inlines the
project's own headers into one text with #line markers: the C stays split by concern and
compiler and verifier messages still name the header and line.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import abi, bpfsys, veth
from .errors import LbxError
from .paths import BPFFS, Instance, atomic_write, private_dirs

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def bpf_dir() -> Path:
    """The C sources: packaged next to this module in a wheel, at the repo root in a checkout."""
    for d in (Path(__file__).parent / "bpf", Path(__file__).parent.parent / "bpf"):
        if (d / "lbxdp.c").is_file():
            return d
    raise LbxError("the BPF sources (lbxdp.c) are missing from this installation",
                   "reinstall lbxdp (scripts/install.sh)")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that changes the compiled program. Capacities default to bpf/abi.h's."""

    pin_dir: Path
    max_vips: int = abi.MAX_VIPS
    max_backends: int = abi.MAX_BACKENDS
    flow_capacity: int = abi.FLOW_CAPACITY
    half_open_capacity: int = abi.HALF_OPEN_CAPACITY
    defines: tuple[str, ...] = ()   # extra -D switches (tests: LBX_NO_HANDSHAKE_GATE)
    src_dir: Path | None = None   # other C sources (the scripts' --bpf-dir, to measure an older program)

    def cflags(self) -> list[str]:
        return [
            f'-DLBX_PIN_DIR="{self.pin_dir}"',
            f"-DLBX_MAX_VIPS={self.max_vips}",
            f"-DLBX_MAX_BACKENDS={self.max_backends}",
            f"-DLBX_FLOW_CAPACITY={self.flow_capacity}",
            f"-DLBX_HALF_OPEN_CAPACITY={self.half_open_capacity}",
            *(f"-D{d}" for d in self.defines),
            "-Wno-unused-function",
        ]


def render(entry: Path, _seen: set[Path] | None = None) -> str:
    """entry with every '#include "local.h"' replaced by that file's text (once per file)."""
    seen = set() if _seen is None else _seen
    seen.add(entry)
    out = [f'#line 1 "{entry.name}"']
    for n, line in enumerate(entry.read_text().splitlines(), start=1):
        m = _INCLUDE.match(line)
        if m and (entry.parent / m.group(1)).is_file():
            inc = entry.parent / m.group(1)
            if inc not in seen:
                out.append(render(inc, seen))
            out.append(f'#line {n + 1} "{entry.name}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf (mode 0700, as systemd does) if nothing is mounted there.

    A bpffs already mounted is left as it is, whatever its mode: lbxdp's own directories under
    it are made 0700 and checked to be root's (paths.private_dirs), which is what protects the pins.
    """
    if _is_bpffs(BPFFS):
        return
    try:
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(BPFFS)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise LbxError(f"bpffs is not mounted on {BPFFS} and mounting it failed",
                       f"mount it: mount -t bpf -o mode=0700 bpf {BPFFS}") from e
    log.warning("mounted bpffs on %s (mode 0700)", BPFFS)


def _is_bpffs(path: Path) -> bool:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]
    st = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def check_headers() -> None:
    """bcc compiles against the running kernel's headers; say how to get them before it fails."""
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not (build / "include").is_dir():
        raise LbxError(f"no kernel headers for {os.uname().release} ({build} is missing), so bcc cannot "
                       "compile the XDP program",
                       "run sudo scripts/install.sh (it installs Debian's linux-headers and links them there)")


def _import_bcc() -> Any:
    try:
        import bcc  # noqa: PLC0415 - the one place bcc is imported
    except ImportError as e:
        raise LbxError("bcc does not import in this Python",
                       "install Debian's python3-bpfcc and use a venv made with "
                       "/usr/bin/python3 -m venv --system-site-packages (scripts/install.sh does both)") from e
    return bcc


def decode_types(schema: dict[str, dict[str, Any]]) -> dict[str, tuple[type, type]]:
    """ctypes (Key, Leaf) per map, from the type descriptions bcc produced when it compiled."""
    return {name: (bpfsys.ctype_from_desc(d["key"]), bpfsys.ctype_from_desc(d["leaf"]))
            for name, d in schema.items()}


@dataclass
class Program:
    """A compiled, loaded lbxdp program and its maps. Keeps the bcc module (and fds) alive."""

    bpf: Any
    fd: int
    info: bpfsys.ProgInfo
    maps: dict[str, bpfsys.Map]
    schema: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""   # fingerprint() of what was compiled

    @property
    def layouts(self) -> dict[str, list[int]]:
        """map name -> layout() of the map the program uses."""
        return {n: list(layout(m.info)) for n, m in self.maps.items()}

    def close(self) -> None:
        self.bpf.cleanup()


def layout(info: bpfsys.MapInfo) -> tuple[int, int, int, int, int]:
    """What a map declaration fixes, and a reused pin must match: type, key and value size,
    entries, flags (bcc does not compare them: see lbxdp/migrate.py)."""
    return (info.type, info.key_size, info.value_size, info.max_entries, info.flags)


@dataclass(frozen=True)
class Source:
    """One XDP program lbxdp compiles: its C entry file under bpf/, function and map names."""

    entry: str
    function: str
    maps: tuple[str, ...]
    prog_type: str = "XDP"   # bcc.BPF's name of the program type (SCHED_CLS: tc)


BALANCER = Source("lbxdp.c", abi.PROGRAM, tuple(m.value for m in abi.Map) + (abi.LEGACY_VIP_STATS,))
# Maps only older programs declare (scripts' --baseline-dir builds, and upgrade tests): read when there.
_LEGACY_MAPS = frozenset({abi.LEGACY_VIP_STATS})
DECAP = Source("decap.c", abi.DECAP_PROGRAM, tuple(m.value for m in abi.DecapMap))   # lbxdp.decap
PROBE = Source("probe.c", abi.PROBE_PROGRAM, (abi.Map.BACKENDS.value, abi.Map.CTL.value), "SCHED_CLS")   # lbxdp.probe


def fingerprint(build: BuildConfig, source: Source = BALANCER) -> str:
    """A hash of the program build would compile (sources and flags): equal fingerprints declare
    equal maps."""
    text = render((build.src_dir or bpf_dir()) / source.entry) + "\0".join(build.cflags())
    return hashlib.sha256(text.encode()).hexdigest()


def compile_program(build: BuildConfig, source: Source = BALANCER) -> Program:
    """Compile and load source (lbxdp_ingress by default); its maps are created in, or reused
    from, build.pin_dir."""
    bcc = _import_bcc()
    check_headers()
    ensure_bpffs()
    build.pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = render((build.src_dir or bpf_dir()) / source.entry)
    precreate_templates(build.pin_dir, text)
    try:
        b = bcc.BPF(text=text.encode(), cflags=build.cflags())
        fn = b.load_func(source.function.encode(), getattr(bcc.BPF, source.prog_type))
    except Exception as e:  # bcc raises bare Exception for compile and verifier failures
        raise LbxError(f"the XDP program failed to compile or load: {e}",
                       "run `lbxdp doctor`; the compiler/verifier output is above") from e
    lib = bcc.libbcc.lib
    schema, maps = {}, {}
    for name in source.maps:
        key = lib.bpf_table_key_desc(b.module, name.encode())
        if key is None and (build.src_dir is not None or name in _LEGACY_MAPS):
            continue   # older sources lack newer maps, newer ones older maps
        leaf = lib.bpf_table_leaf_desc(b.module, name.encode())
        schema[name] = {"key": json.loads(key), "leaf": json.loads(leaf)}
    if abi.Map.MBT_TMPL.value in schema:
        schema[abi.Map.MBT_TMPL.value]["leaf"] = _blob_desc(schema[abi.Map.MBT_TMPL.value]["leaf"])
    # Typed the same way as in a CLI process that opens the pins (open_pinned_maps).
    for name, (key_t, leaf_t) in decode_types(schema).items():
        maps[name] = bpfsys.Map(b.get_table(name.encode()).map_fd, key_t, leaf_t)
    return Program(b, fn.fd, bpfsys.prog_info(fn.fd), maps, schema, fingerprint(build, source))


# Templates bcc is shown smaller than they are (bpf/maps.h says why): pin name -> value size. The
# loader creates each at its real size before bcc compiles, and bcc reuses a pin it finds.
ACL_BLOB_BYTES = 4 * (abi.ACL_MBT_WORDS + abi.ACL_MBT_PAD)
_SIZED_TEMPLATES = {abi.Map.MBT_TMPL.value: ACL_BLOB_BYTES}


def precreate_templates(pin_dir: Path, text: str) -> None:
    """Create (and pin) the templates of _SIZED_TEMPLATES that text declares and pin_dir lacks; a
    pin already there must have the size (an older program's, made by bcc from the full type)."""
    for name, value_size in _SIZED_TEMPLATES.items():
        if f", {name}," not in text:
            continue
        path = pin_dir / name
        try:
            fd = bpfsys.obj_get(path)
        except OSError:
            fd = bpfsys.array_create(name, 1, value_size)
            try:
                bpfsys.obj_pin(fd, path)
            finally:
                os.close(fd)
            continue
        try:
            got = bpfsys.map_info(fd).value_size
        finally:
            os.close(fd)
        if got != value_size:
            raise LbxError(f"the pinned map {path} holds {got}-byte values, this program needs {value_size}",
                           f"detach lbxdp and remove {path} (it holds no state), then attach again")


def _blob_desc(declared: Any) -> Any:
    """bcc's description of lbx_mbt_tmpl's declared one-word value, as the blob it really holds."""
    name, fields, kind = declared
    (field_name, ctype, _count), = fields
    return [name, [[field_name, ctype, [abi.ACL_MBT_WORDS + abi.ACL_MBT_PAD]]], kind]


def compile_stub() -> tuple[Any, int]:
    """The trivial XDP_PASS program (bpf/stub.c): (bcc module to keep alive, program fd)."""
    bcc = _import_bcc()
    b = bcc.BPF(src_file=str(bpf_dir() / "stub.c").encode())
    return b, b.load_func(abi.STUB_PROGRAM.encode(), bcc.BPF.XDP).fd


@dataclass(frozen=True)
class SavedSchema:
    """What schema.json says about the pinned maps: bcc's type description of each, and the
    reason names lbx_reasons is indexed by (None in files written before they were saved, which
    held the map descriptions only); lbxdp.migrate reads both to convert pins on an upgrade."""

    maps: dict[str, dict[str, Any]]
    reasons: list[str] | None = None
    source: str = ""                                   # Program.source
    layouts: dict[str, list[int]] = field(default_factory=dict)   # Program.layouts


def save_schema(inst: Instance, schema: dict[str, Any], source: str = "",
                layouts: dict[str, list[int]] | None = None) -> None:
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(inst.schema_file, json.dumps({"maps": schema, "reasons": [r.name for r in abi.Reason],
                                               "source": source, "layouts": layouts or {}}))


def read_schema(inst: Instance) -> SavedSchema | None:
    """The saved schema, or None if there is none readable."""
    try:
        raw = json.loads(inst.schema_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("maps"), dict):
        return SavedSchema(raw["maps"], raw.get("reasons"), raw.get("source", ""), raw.get("layouts", {}))
    return SavedSchema(raw)   # the older format: map name -> description


def open_pinned_maps(inst: Instance) -> dict[str, bpfsys.Map]:
    """The maps of an attached instance, typed from the schema its loader saved."""
    private_dirs(inst)
    if not inst.exists():
        raise LbxError(f"lbxdp is not attached to {inst.label}",
                       f"attach it: lbxdp attach {inst.ifname} --config FILE")
    saved = read_schema(inst)
    if saved is None:
        raise LbxError(f"the map schema of {inst.label} is missing ({inst.schema_file})",
                       f"re-attach to rebuild it: lbxdp attach {inst.ifname} --config FILE")
    types = decode_types(saved.maps)
    maps: dict[str, bpfsys.Map] = {}
    try:
        for name, (key, leaf) in types.items():
            maps[name] = bpfsys.Map.pinned(inst.pin_dir / name, key, leaf)
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return maps


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError as e:
        raise LbxError(f"no interface named {ifname!r} here",
                       "list interfaces with `ip -br link` (add --netns NAME for another namespace)",
                       exit_code=2) from e   # bad input, as the error contract says


def hwaddr(ifname: str) -> str:
    """ifname's MAC ('02:00:00:00:00:01'), asked of the kernel in this thread's netns (sysfs
    would show the namespace it was mounted in)."""
    siocgifhwaddr = 0x8927
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), siocgifhwaddr, struct.pack("256s", ifname.encode()[:15]))
        except OSError as e:
            raise LbxError(f"cannot read the MAC of {ifname!r}: {e.strerror}",
                           "list interfaces with `ip -br link`") from e
    return ":".join(f"{b:02x}" for b in res[18:24])


MODES = ("auto", "native", "generic")


def attach(ifname: str, prog_fd: int, mode: str, replace: bool = True) -> str:
    """Attach prog_fd to ifname; returns the mode used ('native' or 'generic').

    auto tries native and falls back to generic with a warning; on a veth whose peer has no XDP
    program it picks generic (lbxdp.veth says why), and native warns. An lbxdp program already there
    in the same mode is replaced atomically (the kernel swaps the pointer: no packet misses a
    program); one in the other mode is detached first.
    """
    idx = ifindex(ifname)
    current = bpfsys.xdp_query(idx)
    tries = {"auto": ["native", "generic"], "native": ["native"], "generic": ["generic"]}[mode]
    trap = veth.native_warning(ifname) if mode != "generic" else None
    if trap and mode == "auto":
        log.warning("%s; using generic mode (attach an XDP program to the peer to use native)", trap)
        tries = ["generic"]
    elif trap:
        log.warning("%s; attaching in native mode as asked (--mode native). Fix: %s", trap, veth.FIX)
    last: Exception | None = None
    for m in tries:
        flag = bpfsys.XDP_FLAGS_DRV_MODE if m == "native" else bpfsys.XDP_FLAGS_SKB_MODE
        if current.mode and current.mode != m:
            bpfsys.xdp_detach(idx, bpfsys.XDP_FLAGS_DRV_MODE if current.mode == "native" else bpfsys.XDP_FLAGS_SKB_MODE)
            current = bpfsys.xdp_query(idx)
        if not replace:
            flag |= bpfsys.XDP_FLAGS_UPDATE_IF_NOEXIST
        try:
            bpfsys.xdp_attach(idx, prog_fd, flag)
        except bpfsys.BpfError as e:
            last = e
            if mode == "auto" and m == "native":
                log.warning("native XDP is not available on %s (%s); using generic mode, which is slower "
                            "on physical NICs", ifname, e.strerror)
            continue
        return m
    raise LbxError(f"cannot attach XDP to {ifname} in {mode} mode: {last}",
                   "try --mode generic, or check `lbxdp doctor " + ifname + "`")


def detach(ifname: str) -> None:
    idx = ifindex(ifname)
    state = bpfsys.xdp_query(idx)
    if state.drv_prog_id:
        bpfsys.xdp_detach(idx, bpfsys.XDP_FLAGS_DRV_MODE)
    if state.skb_prog_id:
        bpfsys.xdp_detach(idx, bpfsys.XDP_FLAGS_SKB_MODE)


def replace(ifname: str, prog_fd: int, old_fd: int) -> str:
    """Swap the attached program old_fd for prog_fd in one step, in the mode old_fd is attached in
    (XDP_FLAGS_REPLACE: the kernel swaps only if old_fd is still the one attached, else EEXIST and
    nothing changes). `lbxdp trace` swaps its trace build in and the normal build back this way.
    Returns the mode."""
    idx = ifindex(ifname)
    state = bpfsys.xdp_query(idx)
    if not state.mode:
        raise bpfsys.BpfError(2, f"no XDP program is attached to {ifname}")
    flag = bpfsys.XDP_FLAGS_DRV_MODE if state.mode == "native" else bpfsys.XDP_FLAGS_SKB_MODE
    bpfsys.xdp_attach(idx, prog_fd, flag, old_prog_fd=old_fd)
    return state.mode
