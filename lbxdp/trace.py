"""`lbxdp trace`: live per-packet events, only while someone is tracing.

The normal build has no trace code at all (bpf/trace.h: its hooks are empty macros without
-DLBX_TRACE, and the program's tag is that of a build without them). `lbxdp trace` compiles the
trace build over the instance's pinned maps (the same maps: flows, counters and tables carry on),
swaps it in for the attached program atomically (XDP_FLAGS_REPLACE: only if the attached one is
still the instance's), reads events from its ring buffer, and swaps the pinned normal program
back when it stops: at -n N events, Ctrl-C, SIGTERM or SIGHUP.

A tracer killed with SIGKILL cannot restore anything: the trace build stays attached and keeps
forwarding (every packet also pays for an event nobody reads, ~+45% per packet, docs/benchmarks.md).
`lbxdp status` then says "trace build attached (left by a stopped `lbxdp trace`)", and the normal
build comes back with `lbxdp trace --restore`, `lbxdp attach`, or the daemon's next reload.
Which program is the trace build is recorded in <run dir>/trace.json (its program id and the
tracer's pid and start time).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from . import abi, bpfsys, loader, model
from .errors import LbxError
from .maps import Maps, addr_from
from .paths import Instance, atomic_write

log = logging.getLogger(__name__)

DEFINE = "LBX_TRACE"
NONE = 0xFFFFFFFF          # LBX_TRACE_NONE: no VIP / backend selected
SNAP = 128                 # LBX_TRACE_SNAP
RING = "lbx_trace_ring"
BUF = "lbx_trace_buf"
LOST = "lbx_trace_lost"
VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


def record_file(inst: Instance) -> Path:
    return inst.run_dir / "trace.json"


# --- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    ts_ns: int                  # CLOCK_MONOTONIC
    verdict: str
    reason: abi.Reason | int
    protocol: str               # 'tcp', 'udp', 'icmp', or the number; '' if the packet was not parsed
    src: model.IPAddress | None
    sport: int
    dst: model.IPAddress | None
    dport: int
    vip: str | None             # the VIP's name when the packet was forwarded for one
    backend: str | None
    frame_len: int
    head: bytes                 # the frame's first bytes as it arrived

    @property
    def reason_name(self) -> str:
        return self.reason.name.lower() if isinstance(self.reason, abi.Reason) else str(self.reason)

    @property
    def tuple(self) -> str:
        if self.src is None or self.dst is None:
            return "-"
        return f"{model.endpoint(self.src, self.sport)} -> {model.endpoint(self.dst, self.dport)}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        return {"ts_ns": self.ts_ns, "verdict": self.verdict, "reason": self.reason_name,
                "protocol": self.protocol, "src": str(self.src) if self.src else None, "sport": self.sport,
                "dst": str(self.dst) if self.dst else None, "dport": self.dport, "vip": self.vip,
                "backend": self.backend, "frame_len": self.frame_len}

    def text(self) -> str:
        where = f" vip {self.vip} -> {self.backend}" if self.backend else ""
        return f"{self.ts_ns / 1e9:.6f} {self.verdict.upper():<7} {self.reason_name:<24} {self.tuple}{where} ({self.frame_len} B)"


@dataclass(frozen=True)
class Filter:
    """Which events to keep (all given conditions must hold)."""
    vip: model.VipKey | None = None            # the VIP's key, or an address alone (port 0: any)
    vip_address: model.IPAddress | None = None
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    reasons: frozenset[abi.Reason] | None = None

    def match(self, e: Event) -> bool:
        if self.reasons is not None and e.reason not in self.reasons:
            return False
        if self.src is not None and (e.src is None or e.src.version != self.src.version or e.src not in self.src):
            return False
        if self.vip is not None:
            if e.dst != self.vip.address or e.protocol != self.vip.protocol.value:
                return False
            if self.vip.port and e.dport != self.vip.port:
                return False
        if self.vip_address is not None and e.dst != self.vip_address:
            return False
        return True


def parse_reason(text: str) -> abi.Reason:
    """'not_vip', 'PASS_NOT_VIP' or 'pass_not_vip' -> the reason; ValueError listing them."""
    t = text.strip().upper()
    for r in abi.Reason:
        if r.name == t or r.name.split("_", 1)[-1] == t:
            return r
    raise ValueError(f"{text!r} is no reason; one of: {', '.join(r.label for r in abi.Reason.exits())}")


class Names:
    """VIP and backend names by id, read from the maps and re-read when an id is unknown."""

    def __init__(self, maps: Maps):
        self.maps = maps
        self.vips: dict[int, str] = {}
        self.backends: dict[int, str] = {}

    def _refresh(self) -> None:
        self.vips = {m.id: k.name for k, m in self.maps.vips().items()}
        self.backends = {i: e.name for i, e in self.maps.backends().items()}

    def vip(self, i: int) -> str | None:
        if i == NONE:
            return None
        if i not in self.vips:
            self._refresh()
        return self.vips.get(i, f"id {i}")

    def backend(self, i: int) -> str | None:
        if i == NONE:
            return None
        if i not in self.backends:
            self._refresh()
        return self.backends.get(i, f"id {i}")


def decode(ev: Any, names: Names) -> Event:
    f = ev.flow
    parsed = f.family in (abi.FAMILY_V4, abi.FAMILY_V6)
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}.get(f.proto, str(f.proto)) if parsed else ""
    try:
        reason: abi.Reason | int = abi.Reason(ev.reason)
    except ValueError:
        reason = ev.reason
    return Event(ev.ts, VERDICTS.get(ev.verdict, str(ev.verdict)), reason, proto,
                 addr_from(f.src, f.family) if parsed else None, socket_port(f.sport),
                 addr_from(f.dst, f.family) if parsed else None, socket_port(f.dport),
                 names.vip(ev.vip_id), names.backend(ev.backend_id), ev.frame_len,
                 bytes(ev.head[:min(ev.cap_len, SNAP)]))


def socket_port(be16: int) -> int:
    return struct.unpack("!H", struct.pack("=H", be16))[0]


# --- pcap ---------------------------------------------------------------------------------------------

class PcapWriter:
    """Classic pcap (Ethernet, snaplen SNAP): what Wireshark, tcpdump -r and scapy's rdpcap read.
    Event times are CLOCK_MONOTONIC; the writer maps them to the wall clock once."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAP, 1))

    def write(self, e: Event) -> None:
        t = e.ts_ns + self.offset
        self.f.write(struct.pack("<IIII", t // 1_000_000_000, t % 1_000_000_000 // 1000, len(e.head), e.frame_len))
        self.f.write(e.head)
        self.f.flush()


# --- the trace build and its swap -------------------------------------------------------------------------

def build_of(inst: Instance) -> loader.BuildConfig:
    """The instance's build with the trace hooks: its capacities read from its pins (the C's
    LBX_ADMIT_GLOBAL is LBX_MAX_VIPS, so a build for other capacities would read other scopes)."""
    def entries(name: str) -> int:
        fd = bpfsys.obj_get(inst.pin_dir / name)
        try:
            return bpfsys.map_info(fd).max_entries
        finally:
            os.close(fd)
    return loader.BuildConfig(inst.pin_dir, max_vips=entries(abi.Map.VIPS.value),
                              max_backends=entries(abi.Map.BACKENDS.value), defines=(DEFINE,))


def _alive(pid: int, started: str | None) -> bool:
    from .daemon import _start_time
    return started is not None and _start_time(pid) == started


def read_record(inst: Instance) -> dict[str, Any] | None:
    try:
        rec = json.loads(record_file(inst).read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("prog_id"), int) else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class TraceState:
    """What `lbxdp status` says when the attached program is a trace build."""
    pid: int
    alive: bool          # its `lbxdp trace` still runs (it restores the normal build when it stops)

    def text(self) -> str:
        if self.alive:
            return f"trace build attached (`lbxdp trace`, pid {self.pid}; the normal build comes back when it stops)"
        return ("trace build attached (left by a stopped `lbxdp trace`); put the normal build back with "
                "`lbxdp trace --restore`, `lbxdp attach` or a daemon reload")

    def to_json(self) -> dict[str, Any]:
        return {"build": "trace", "tracer_pid": self.pid, "tracer_alive": self.alive}


def attached_trace(inst: Instance, prog_id: int | None) -> TraceState | None:
    """A TraceState if prog_id (the attached program) is the trace build `lbxdp trace` recorded."""
    rec = read_record(inst)
    if not prog_id or rec is None or rec["prog_id"] != prog_id:
        return None
    return TraceState(int(rec.get("pid", 0)), _alive(int(rec.get("pid", 0)), rec.get("started")))


def restore(inst: Instance, only_if_stopped: bool = True) -> bool:
    """Put the pinned normal build back if a trace build is attached (by default only one whose
    tracer is gone); True if it did. Used by `lbxdp trace --restore` and the daemon's reload."""
    idx = loader.ifindex(inst.ifname)
    state = attached_trace(inst, bpfsys.xdp_query(idx).prog_id)
    if state is None or (only_if_stopped and state.alive):
        return False
    rec = read_record(inst) or {}
    old = bpfsys.prog_fd_by_id(rec["prog_id"])
    try:
        normal = bpfsys.obj_get(inst.prog_pin)
        try:
            loader.replace(inst.ifname, normal, old)
        finally:
            os.close(normal)
    finally:
        os.close(old)
    record_file(inst).unlink(missing_ok=True)
    log.warning("the trace build left attached on %s was replaced by the normal build", inst.label)
    return True


class Ring:
    """The events of a loaded trace build (its ring buffer), decoded with names from its maps."""

    def __init__(self, prog: loader.Program):
        self.prog = prog
        self.names = Names(Maps(prog.maps))
        leaf = prog.bpf[BUF.encode()].Leaf   # a per-CPU map's Leaf is an array of the struct
        self.leaf = leaf._type_ if issubclass(leaf, ctypes.Array) else leaf
        self._pending: list[Any] = []
        prog.bpf[RING.encode()].open_ring_buffer(self._on_event)

    def _on_event(self, ctx: Any, data: Any, size: int) -> int:
        self._pending.append(self.leaf.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(self.leaf))))
        return 0

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        self.prog.bpf.ring_buffer_poll(timeout_ms)
        raw, self._pending = self._pending, []
        return [decode(ev, self.names) for ev in raw]

    def lost(self) -> int:
        """Events the program could not put in the ring (it was full), ever."""
        return sum(int(x) for x in self.prog.bpf[LOST.encode()][0])


class Tracer:
    """The trace build attached in place of the instance's program, for as long as it is open.

    with Tracer(inst) as t: for e in t.events(...): ...   (the normal build is back after the block)
    """

    def __init__(self, inst: Instance):
        self.inst = inst
        self.prog: loader.Program | None = None
        self.normal_id = 0
        self.swapped = False
        self.ring: Ring | None = None

    def __enter__(self) -> "Tracer":
        inst = self.inst
        if not inst.exists():
            raise LbxError(f"lbxdp is not attached to {inst.label}", f"attach it: lbxdp attach {inst.ifname} --config FILE")
        idx = loader.ifindex(inst.ifname)
        attached = bpfsys.xdp_query(idx).prog_id
        left = attached_trace(inst, attached)
        if left is not None and left.alive:
            raise LbxError(f"another `lbxdp trace` (pid {left.pid}) is tracing {inst.label}",
                           "one tracer at a time: stop that one first")
        normal_fd = bpfsys.obj_get(inst.prog_pin)
        try:
            self.normal_id = bpfsys.prog_info(normal_fd).id
        finally:
            os.close(normal_fd)
        if left is None and attached != self.normal_id:
            raise LbxError(f"the program attached to {inst.label} (id {attached}) is not the instance's "
                           f"(id {self.normal_id})", f"re-attach it: lbxdp attach {inst.ifname} --config FILE")
        saved = loader.read_schema(inst)
        build = build_of(inst)
        plain = loader.fingerprint(loader.BuildConfig(inst.pin_dir, max_vips=build.max_vips, max_backends=build.max_backends))
        if saved is not None and saved.source and saved.source != plain:
            log.warning("the attached program was compiled from other sources or flags than this lbxdp's; "
                        "the trace build is this lbxdp's program with trace hooks")
        self.prog = loader.compile_program(build)
        try:
            self.ring = Ring(self.prog)
            old = bpfsys.prog_fd_by_id(attached)
            try:
                atomic_write(record_file(inst), json.dumps({"prog_id": self.prog.info.id, "pid": os.getpid(),
                                                            "started": _own_start(), "normal_prog_id": self.normal_id,
                                                            "at": time.time()}))
                loader.replace(inst.ifname, self.prog.fd, old)
            finally:
                os.close(old)
            self.swapped = True
        except BaseException:
            self.close()
            raise
        return self

    def still_attached(self) -> bool:
        assert self.prog is not None
        return bpfsys.xdp_query(loader.ifindex(self.inst.ifname)).prog_id == self.prog.info.id

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        assert self.ring is not None
        return self.ring.poll(timeout_ms)

    def events(self, flt: Filter = Filter(), count: int | None = None, duration: float | None = None,
               stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """Matching events until count of them, duration seconds, stop(), or the trace build
        was replaced by someone else (an attach, a reload)."""
        deadline = None if duration is None else time.monotonic() + duration
        n, checked = 0, time.monotonic()
        while not stop():
            for e in self.poll(100):
                if flt.match(e):
                    yield e
                    n += 1
                    if count is not None and n >= count:
                        return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if now - checked > 1.0:
                checked = now
                if not self.still_attached():
                    log.warning("the trace build was replaced on %s (an attach or reload?); stopping",
                                self.inst.label)
                    self.swapped = False
                    return

    def close(self) -> None:
        """Put the normal build back (only over our own trace build) and unload the trace build."""
        if self.prog is None:
            return
        if self.swapped:
            try:
                normal = bpfsys.obj_get(self.inst.prog_pin)
                try:
                    loader.replace(self.inst.ifname, normal, self.prog.fd)
                finally:
                    os.close(normal)
            except (bpfsys.BpfError, LbxError, OSError) as e:
                # EEXIST/ENOENT: something else is attached now (a new attach replaced us): leave it
                log.warning("did not put the normal build back on %s: %s", self.inst.label, e)
            self.swapped = False
        rec = read_record(self.inst)
        if rec is not None and rec.get("prog_id") == self.prog.info.id:
            record_file(self.inst).unlink(missing_ok=True)
        self.prog.close()
        self.prog = None

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _own_start() -> str | None:
    from .daemon import _start_time
    return _start_time(os.getpid())


__all__ = ["Event", "Filter", "PcapWriter", "Tracer", "TraceState", "attached_trace", "parse_reason", "restore"]
