"""What an instance looks like now: one typed read of its maps, attach record, applied state and
the daemon's last checks, shared by `lbxdp status`, `vip ls`, `backend ls`, `top` and the exporter.

read() is the only reader: it opens the pinned maps once (VIPs with their backends and counters,
exit reasons, connection-table size), and joins to each backend what lbxdp.applied says of its
health (overrides, verdicts) and what the daemon last wrote to checks.json. The values are frozen
dataclasses; InstanceStatus.to_json() is the `lbxdp status --json` document, key for key.

Cost (a scrape reads this for every instance): the maps as before, plus one netlink query (is
the program attached) and two small JSON files. The exporter reads the applied state with
told=applied.load_runtime (runtime.json only): parsing and validating applied.toml at every
scrape would cost more than the counters, and health needs none of it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import abi, applied, conntrack, model
from .conntrack import NatStatus
from .maps import BackendView, Conns, Stats, VipView
from .model import BackendId, HealthOverride
from .paths import Instance, private_dirs

UNCHECKED = "unchecked"


@dataclass(frozen=True)
class Health:
    """A backend's health as status shows it."""

    state: str = UNCHECKED               # 'up', 'down' (checked or forced) or 'unchecked'
    forced: HealthOverride | None = None  # set with `lbxdp backend set-health` (UP or DOWN)
    since: float | None = None           # epoch seconds of the last transition
    last_check: str | None = None        # the daemon's last check result ('connected', ...)
    latency: float | None = None         # of the last check, seconds
    last_check_at: float | None = None
    checks: int | None = None            # checks done since the daemon started
    passing: bool | None = None          # the checker's verdict (after rise/fall); None: not checked
    cause: str | None = None             # why it is down: 'active' (its check) or 'passive' (NAT passive health)
    detail: str | None = None            # what took it down (the check's result, or passive health's account)

    def to_json(self) -> dict[str, Any]:
        return {"health": self.state, "forced": self.forced.value if self.forced else None,
                "health_since": self.since, "last_check": self.last_check, "check_latency": self.latency,
                "last_check_at": self.last_check_at, "checks": self.checks, "down_cause": self.cause,
                "down_detail": self.detail}


@dataclass(frozen=True)
class Handshakes:
    """A NAT backend's handshakes as the program counts them (lbx_nat_be, bpf/nat.h): the
    passive-health signals."""

    consecutive: int = 0     # failed in a row since the last SYN-ACK
    syn_rst: int = 0         # RSTs answering a SYN, ever
    syn_retx: int = 0        # clients' SYNs retransmitted while waiting for a SYN-ACK, ever
    synack: int = 0          # SYN-ACKs (completed), ever

    def to_json(self) -> dict[str, Any]:
        return {"failed_in_a_row": self.consecutive, "syn_rst": self.syn_rst, "syn_retx": self.syn_retx,
                "synack": self.synack}


@dataclass(frozen=True)
class BackendStatus(BackendView):
    """A backend entry as the maps show it (lbxdp.maps.BackendView: name, counters, in_table, id,
    MAC) with its health."""

    health: Health = Health()
    handshakes: Handshakes | None = None   # NAT backends only
    conns: Conns | None = None   # counted backends only (leastconn, max_conns; bpf/sched.h)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.name, "id": self.id, "mac": self.mac, "in_table": self.in_table,
                **_stats(self.stats), **self.health.to_json(),
                "handshakes": self.handshakes.to_json() if self.handshakes else None,
                "connections": None if self.conns is None else
                {"open": self.conns.open, "max_conns": self.conns.max_conns, "cap_hits": self.conns.cap_hits}}


@dataclass(frozen=True)
class AdmissionStatus:
    """A scope's admission of new flows (bpf/admit.h) as the maps hold it: the ACL rules in the
    live trie (the implicit "not allowed" /0 of an allow list not counted) and the per-source limit
    (rate from the interval, exact up to ~20,000/s; burst without the clock's slack, limit.h)."""

    allow: int = 0
    deny: int = 0
    rate: int | None = None       # new flows per second per source (and CPU); None: no limit
    burst: int | None = None
    # Families (4, 6) whose rules the program looks up in the kernel LPM trie, not the multibit
    # blob (bpf/acl.h): the blob's budget had no room for them (lbxdp/acl_mbt.py).
    trie_only: tuple[int, ...] = ()

    @property
    def rules(self) -> int:
        return self.allow + self.deny

    def to_json(self) -> dict[str, Any]:
        return {"allow_rules": self.allow, "deny_rules": self.deny,
                "new_flow_limit": None if self.rate is None else {"rate": self.rate, "burst": self.burst},
                "acl_kernel_trie": [f"v{f}" for f in self.trie_only]}

    def text(self) -> str:
        lim = "no limit" if self.rate is None else f"limit {self.rate}/s, burst {self.burst}"
        slow = f" ({'/'.join(f'v{f}' for f in self.trie_only)} rules in the kernel trie: over the ACL blob's budget)" \
            if self.trie_only else ""
        return f"allow {self.allow} rules, deny {self.deny}, {lim}{slow}"


NO_ADMISSION = AdmissionStatus()


@dataclass(frozen=True)
class VipStatus(VipView):
    """A VIP as the maps show it (lbxdp.maps.VipView: name, counters, id, mode, scheduler, table
    size) with its backends' status."""

    backends: tuple[BackendStatus, ...] = ()
    admission: AdmissionStatus = NO_ADMISSION
    # issue 13: a QUIC VIP's packets by how they were routed (lbx_quic_vip, bpf/quic.h); None: no QUIC VIP
    quic: tuple[tuple[abi.QuicReason, int], ...] | None = None
    # issue 13: new flows sent to a backup because every primary was full (lbx_overflows); None: no backups
    backup_overflows: int | None = None

    def lines(self) -> list[str]:
        """The VIP's lines under its row in `status` (QUIC routing, backup overflows)."""
        out = []
        if self.quic is not None:
            out.append(quic_text(self.quic, "QUIC packets the connection table did not know: "))
        if self.backup_overflows is not None:
            out.append(f"backup overflows: {self.backup_overflows} new flows sent to a backup (every primary full)")
        return out

    @property
    def key(self) -> model.VipKey:
        return model.VipKey.parse(self.name)

    def backend_id(self, b: BackendStatus) -> BackendId:
        return BackendId(self.key, *model.parse_endpoint(b.name))

    def to_json(self) -> dict[str, Any]:
        return {"vip": self.name, "id": self.id, "mode": self.mode, "scheduler": self.scheduler,
                "table_size": self.table_size, **_stats(self.stats),
                "backends": [b.to_json() for b in self.backends], "admission": self.admission.to_json(),
                "quic": None if self.quic is None else {r.name.lower(): n for r, n in self.quic},
                "backup_overflows": self.backup_overflows}


@dataclass(frozen=True)
class ReasonCount:
    reason: abi.Reason
    packets: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason.label, "verdict": self.reason.verdict, "packets": self.packets,
                "bytes": self.bytes}


@dataclass(frozen=True)
class Xdp:
    """The interface's XDP program as the kernel reports it."""

    attached: bool = False
    prog_id: int | None = None
    mode: str | None = None
    error: str | None = None      # the interface could not be asked (e.g. it is gone)
    trace: Any = None             # lbxdp.trace.TraceState when the attached program is the trace build

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"attached": self.attached, "error": self.error}
        return {"attached": self.attached, "prog_id": self.prog_id, "mode": self.mode,
                **(self.trace.to_json() if self.trace else {})}


@dataclass(frozen=True)
class AttachRecord:
    """state.json, written by attach: kept whole (to_json is the file), read by its typed fields."""

    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.raw.get("version", ""))

    @property
    def mode(self) -> str:
        return str(self.raw.get("mode", ""))

    @property
    def prog_id(self) -> int:
        return int(self.raw.get("prog_id", 0) or 0)

    @property
    def config(self) -> str | None:
        return self.raw.get("config")

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass(frozen=True)
class GateStatus:
    """The handshake gate (bpf/select.h): the half-open table and the per-CPU new-flow flood
    state (maps.FloodState), as `status` and the exporter show them."""
    half_open_entries: int = 0
    half_open_capacity: int = 0
    threshold: int = abi.FLOOD_THRESHOLD   # new flows per second per CPU past which a CPU is flooded
    cpus_flooded: int = 0                  # CPUs over it in their current second
    inserts_skipped: int = 0               # records refused under flood, ever
    half_open_written: int = 0             # half-open entries written, ever

    def to_json(self) -> dict[str, Any]:
        return {"half_open": {"entries": self.half_open_entries, "capacity": self.half_open_capacity,
                              "written": self.half_open_written},
                "flood": {"threshold": self.threshold, "cpus_flooded": self.cpus_flooded,
                          "inserts_skipped": self.inserts_skipped}}

    def text(self) -> str:
        return (f"half-open: {self.half_open_entries} / {self.half_open_capacity} entries; new-flow flood: "
                f"{self.cpus_flooded} CPU(s) over {self.threshold}/s, {self.inserts_skipped} records skipped")


@dataclass(frozen=True)
class QuicStatus:
    """QUIC connection-ID routing (bpf/quic.h, issue 13): how many server ids the program knows
    (lbx_quic_ids, every QUIC VIP) and how QUIC VIPs' packets that the connection table did not
    know were routed, ever (lbx_quic_stats by abi.QuicReason: by_id, initial, unknown_id, down_id,
    short_cid, other; a packet routed by id is not recorded, so each packet of a migrated
    connection counts). Per VIP: VipStatus.quic."""
    ids: int = 0
    packets: tuple[tuple[abi.QuicReason, int], ...] = ()

    @property
    def active(self) -> bool:
        """Worth a line in `status`: a QUIC VIP is configured or packets were counted."""
        return bool(self.ids) or any(n for _, n in self.packets)

    def count(self, reason: abi.QuicReason) -> int:
        return dict(self.packets).get(reason, 0)

    def to_json(self) -> dict[str, Any]:
        return {"server_ids": self.ids, "packets": {r.name.lower(): n for r, n in self.packets}}

    def text(self) -> str:
        return quic_text(self.packets, f"QUIC: {self.ids} server id(s); packets the connection table did not know: ")


def quic_text(packets: tuple[tuple[abi.QuicReason, int], ...], head: str) -> str:
    """QUIC counts by abi.QuicReason as one line of `status` (program-wide or a VIP's)."""
    Q, c = abi.QuicReason, dict(packets)
    fell = sum(c.get(r, 0) for r in (Q.UNKNOWN_ID, Q.DOWN_ID, Q.SHORT_CID))
    return (f"{head}{c.get(Q.BY_ID, 0)} routed by id, {c.get(Q.INITIAL, 0)} initial/0-RTT by the table, "
            f"{fell} fell back (unknown id {c.get(Q.UNKNOWN_ID, 0)}, down id {c.get(Q.DOWN_ID, 0)}, "
            f"short CID {c.get(Q.SHORT_CID, 0)}), {c.get(Q.OTHER, 0)} other")


def read_quic(maps: Any) -> QuicStatus:
    """QuicStatus from the maps (an older program without the QUIC maps reads as zeros)."""
    return QuicStatus(len(maps.quic_ids()), tuple(maps.quic_stats().items()))


def read_vip_extras(maps: Any, views: Any) -> tuple[dict[int, Any], dict[int, int]]:
    """Per VIP id: QUIC counts (VIPs with server ids in lbx_quic_ids; 6 lookups each) and backup
    overflows (VIPs with backups in lbx_backups, or any overflow counted; one lookup each)."""
    quic_vids = {vid for vid, _ in maps.quic_ids()}
    quic = {vid: tuple(c.items()) for vid, c in maps.quic_vip_stats(sorted(quic_vids)).items()}
    counted = maps.backup_overflows()
    over = {v.id: counted.get(v.id, 0) for v in views if v.id in counted or maps.backups(v.id)}
    return quic, over


@dataclass(frozen=True)
class InstanceStatus:
    interface: str
    netns: str | None = None
    pin_dir: str = ""
    xdp: Xdp = Xdp()
    state: AttachRecord = AttachRecord()
    vips: tuple[VipStatus, ...] = ()
    reasons: tuple[ReasonCount, ...] = ()
    flow_entries: int = 0
    flow_capacity: int = 0
    read_seconds: float = 0.0     # what reading it took (not in the JSON: the exporter shows it)
    admission: AdmissionStatus = NO_ADMISSION   # the [balancer] scope's (each VIP's: VipStatus)
    gate: GateStatus = GateStatus()
    nat: NatStatus | None = None   # NAT conntrack and SNAT pool (None: no NAT VIP)
    quic: QuicStatus = QuicStatus()   # QUIC connection-ID routing (bpf/quic.h)
    config_source: dict[str, Any] | None = None   # the daemon's etcd source (lbxdp.etcdsrc), if any
    bgp: dict[str, Any] | None = None   # the daemon's announcements and BGP sessions (lbxdp.bgp), if [bgp]

    def vip(self, name: str) -> VipStatus | None:
        return next((v for v in self.vips if v.name == name), None)

    def reason_counts(self) -> dict[abi.Reason, tuple[int, int]]:
        return {r.reason: (r.packets, r.bytes) for r in self.reasons}

    def to_json(self) -> dict[str, Any]:
        """The `lbxdp status --json` document of this instance."""
        return {"interface": self.interface, "netns": self.netns, "pin_dir": self.pin_dir,
                "xdp": self.xdp.to_json(), "state": self.state.to_json(),
                "vips": [v.to_json() for v in self.vips], "reasons": [r.to_json() for r in self.reasons],
                "flows": {"entries": self.flow_entries, "capacity": self.flow_capacity},
                "admission": self.admission.to_json(), "gate": self.gate.to_json(),
                "nat": self.nat.to_json() if self.nat else None, "quic": self.quic.to_json(),
                "config_source": self.config_source, "bgp": self.bgp}


def _stats(s: Stats) -> dict[str, int]:
    return {"packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows}


# --------------------------------------------------------------------------------- the reader


def read(inst: Instance, told: Callable[[Instance], applied.State] = applied.load) -> InstanceStatus:
    """Read the instance once. told: where health overrides and verdicts come from (applied.load,
    which stops on an unreadable applied state as every command does; the exporter passes
    applied.load_runtime). Raises if the maps cannot be opened."""
    from . import bgp, control, etcdsrc   # the loader: kept out of `lbxdp --help`
    t0 = time.monotonic()
    private_dirs(inst)
    record = AttachRecord(control.read_state(inst))
    health = _Told(told(inst), _read_checks(inst))
    with control.open_maps(inst) as maps:
        views = maps.vip_views()
        reasons = tuple(ReasonCount(r, p, b) for r, (p, b) in maps.reasons().items())
        entries = maps.flow_count()   # batched: 16 system calls for a full table
        capacity = maps.flow_map.info.max_entries
        admission = read_admission(maps)
        glob = admission.get(maps.global_scope, NO_ADMISSION) if admission else NO_ADMISSION
        gate = read_gate(maps)
        nat_vips = [v for v in views if v.mode == "nat"]
        nat = conntrack.summarize(maps) if nat_vips else None
        hs = {b.id: _handshakes(maps, b.id) for v in nat_vips for b in v.backends}
        cs = maps.conns()
        quic = read_quic(maps)
        vquic, over = read_vip_extras(maps, views)
    return InstanceStatus(inst.ifname, inst.netns, str(inst.pin_dir), _xdp(inst), record,
                          tuple(_vip(v, health, admission, hs, cs, vquic, over) for v in views), reasons, entries, capacity,
                          time.monotonic() - t0, admission=glob, gate=gate, nat=nat, quic=quic,
                          config_source=etcdsrc.read_source(inst), bgp=bgp.read_status(inst))


def _handshakes(maps: Any, backend_id: int) -> Handshakes:
    s = maps.nat_backend(backend_id)
    return Handshakes(s.consecutive, s.syn_rst, s.syn_retx, s.synack)


def read_gate(maps: Any) -> GateStatus:
    """The half-open table's entries (a batched walk, at most 16k) and the flood state."""
    f = maps.flood()
    return GateStatus(maps.half_open_entries(), maps.half_open_capacity(),
                      f.threshold, f.cpus_flooded, f.skipped, f.half_open_written)


def read_admission(maps: Any) -> dict[int, AdmissionStatus]:
    """Scope (VIP id or maps.global_scope) -> its AdmissionStatus, for scopes with rules or a
    limit. The trie is walked only when some scope has rules (one syscall per entry)."""
    scopes = maps.admission()
    counts: dict[int, dict[abi.AclAction, int]] = {}
    slow: dict[int, tuple[int, ...]] = {}
    if any(flags for _, _, flags in scopes.values()):
        entries = maps.acl()
        for e in entries:
            per = counts.setdefault(e.scope, {})
            per[e.action] = per.get(e.action, 0) + 1
        placement = maps.acl_placement(entries) if hasattr(maps, "acl_placement") else {}
        for (scope, fam), in_blob in sorted(placement.items()):
            if not in_blob:
                slow[scope] = slow.get(scope, ()) + (fam,)
    out = {}
    for scope in set(scopes) | set(counts):
        interval, burst_ns, _ = scopes.get(scope, (0, 0, 0))
        c = counts.get(scope, {})
        out[scope] = AdmissionStatus(c.get(abi.AclAction.ALLOW, 0), c.get(abi.AclAction.DENY, 0),
                                     round(1e9 / interval) if interval else None,
                                     burst_ns // interval + 1 if interval else None, slow.get(scope, ()))
    return out


def _xdp(inst: Instance) -> Xdp:
    from . import bpfsys, loader
    from .errors import LbxError
    try:
        q = bpfsys.xdp_query(loader.ifindex(inst.ifname))
    except LbxError:
        return Xdp(error=f"interface {inst.ifname} not found")
    from .trace import attached_trace
    return Xdp(bool(q.prog_id), q.prog_id, q.mode, trace=attached_trace(inst, q.prog_id))


def _read_checks(inst: Instance) -> dict[str, Any]:
    """checks.json (backend key -> the daemon's last check); {} without a daemon."""
    try:
        data = json.loads(inst.checks_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _Told:
    """The applied state's health and overrides, and checks.json, by backend key string: the
    maps name backends by string, so a read looks each one up without parsing it."""

    def __init__(self, told: applied.State, checks: dict[str, Any]):
        self.forced = {k.key: o for k, o in told.overrides.items()}
        self.rec = {k.key: h for k, h in told.health.items()}
        self.down = {k.key for k in (*told.overrides, *told.health) if told.is_down(k)}
        self.checks = checks

    def health(self, key: str) -> Health:
        """A backend's health: up/down/unchecked, forced or not, since when, and the daemon's last
        check (result and latency)."""
        forced, rec, last = self.forced.get(key), self.rec.get(key), self.checks.get(key)
        if forced is None and rec is None and last is None:
            return UNCHECKED_HEALTH
        rec = rec or {}
        last = last if isinstance(last, dict) else {}
        if forced:
            state = forced.value
        else:
            state = "down" if key in self.down else "up"
        passing = last.get("healthy")
        down = state == "down" and not forced
        return Health(state, forced, rec.get("since", last.get("since")), last.get("last"), last.get("latency"),
                      last.get("at"), last.get("checks"), bool(passing) if passing is not None else None,
                      rec.get("cause", "active") if down and rec else None, rec.get("detail") if down else None)


UNCHECKED_HEALTH = Health()


def _vip(v: VipView, told: _Told, admission: dict[int, AdmissionStatus],
         handshakes: dict[int, Handshakes] | None = None,
         conns: dict[int, Conns] | None = None, quic: dict[int, Any] | None = None,
         overflows: dict[int, int] | None = None) -> VipStatus:
    hs, cs = handshakes or {}, conns or {}
    bes = tuple(BackendStatus(b.name, b.stats, b.in_table, b.id, b.mac, told.health(f"{v.name}|{b.name}"),
                              hs.get(b.id), cs.get(b.id)) for b in v.backends)
    return VipStatus(v.name, v.stats, bes, v.id, v.mode, v.scheduler, v.table_size,
                     admission=admission.get(v.id, NO_ADMISSION), quic=(quic or {}).get(v.id),
                     backup_overflows=(overflows or {}).get(v.id))
