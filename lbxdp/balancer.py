"""apply(desired config) -> the minimal set of map writes that makes the maps hold it.

Order matters, so that a packet never sees a half-made state:
  0. backend entries of VIP ids that no longer exist (left by an apply that was interrupted) are
     deactivated, and the VIP address filter gets the bits of every VIP address, old and new;
  1. new or changed backend entries are written (they are unreachable until a table names them);
  2. each changed VIP's new table is built aside (a new inner map) and swapped in, atomically
     for the VIP (many VIPs share one map write: each write waits an RCU grace period); its
     meta (size, scheduler) is written after the swap when the table grows and before it when
     it shrinks, so a packet's slot is always inside the table it reads (new VIPs appear with
     their meta, after their table);
  4. only then are VIPs deleted and backend entries that no table names any more deactivated,
     and the filter is cut down to the bits of the VIPs that remain.
Capacity is checked before the first write, so a config that does not fit changes nothing.
"""

from __future__ import annotations

import array
import bisect
import itertools
import math
import random
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from . import abi, model, ring
from .errors import LbxError
from .maps import BackendEntry, Encap, Maps, NatCfg, SchedFields, VipMeta, now_units

WEIGHT_SCALE = 100   # weights are scaled so that a slow start can ramp in small steps

STEP = 1.0
"""Seconds. Slow starts step and drains end on wall-clock multiples of STEP (since the Unix epoch),
not on instants of each daemon's own clock: a backend joins at the first boundary after its
config was applied, its ramp moves on at each boundary, a drain ends at a boundary, and every
daemon ticks just after each boundary (lbxdp.daemon). Nodes sharing a config (issue 14) that got
it within the same STEP thus hold the same weights, and the same tables, at the same instant."""


def epoch_floor(t: float) -> float:
    """The last STEP boundary at or before t."""
    return math.floor(t / STEP) * STEP


def epoch_ceil(t: float) -> float:
    """The first STEP boundary at or after t."""
    return math.ceil(t / STEP) * STEP


@dataclass(frozen=True)
class Runtime:
    """What the config file does not say: backends being drained, and when each backend joined
    its VIP (for slow start). Kept by lbxdp.control next to the applied config."""

    draining: frozenset[model.BackendId] = frozenset()
    joined: Mapping[model.BackendId, float] = field(default_factory=dict)
    now: float = 0.0
    down: frozenset[model.BackendId] = frozenset()   # failed their health check (or forced down)

    def weight(self, vip: model.Vip, b: model.Backend) -> int:
        """The backend's share of new flows now, scaled by WEIGHT_SCALE: 0 while draining, and
        ramping from 0 to its weight over the VIP's slow_start after it joined, in STEPs: the
        ramp is read at the last boundary (epoch_floor), so it is the same all through a step."""
        ref = vip.id_of(b)
        if ref in self.draining or ref in self.down:
            return 0
        w = b.weight * WEIGHT_SCALE
        if vip.slow_start > 0 and ref in self.joined:
            frac = (epoch_floor(self.now) - self.joined[ref]) / vip.slow_start
            if frac < 1:
                return int(w * max(frac, 0.0))
        return w

    def ramping(self, vip: model.Vip) -> bool:
        return vip.slow_start > 0 and any(
            self.now - t < vip.slow_start for (k, _, _), t in self.joined.items() if k == vip.key)


def usable(vip: model.Vip, rt: Runtime) -> list[tuple[int, int]]:
    """(index into vip.backends, weight) of the backends that take new flows: the primaries with
    a weight, or, while there is none, the backups with a weight."""
    weighted = [(i, rt.weight(vip, b)) for i, b in enumerate(vip.backends)]
    primaries = [(i, w) for i, w in weighted if w > 0 and not vip.backends[i].backup]
    return primaries or [(i, w) for i, w in weighted if w > 0 and vip.backends[i].backup]


def backups_of(vip: model.Vip, ids: list[int], rt: Runtime) -> list[int]:
    """lbx_backups of a VIP (bpf/sched.h: backup_choice): where a capped VIP's new flows go when
    every primary candidate is at its cap. Its backups with a weight, at most abi.BACKUP_MAX in
    config order, while its table holds primaries (a table of backups already has them)."""
    if not any(b.max_conns for b in vip.backends):
        return []
    use = usable(vip, rt)
    if not use or vip.backends[use[0][0]].backup:
        return []
    return [ids[i] for i, b in enumerate(vip.backends) if b.backup and rt.weight(vip, b) > 0][:abi.BACKUP_MAX]


def lc_peers(vip: model.Vip, ids: list[int], rt: Runtime) -> dict[int, tuple[int, ...]]:
    """struct backend.lc_peer of a leastconn VIP's entries (bpf/sched.h: a flow's second
    candidate is one of the peers of the backend its slot names): for each backend that takes new
    flows, other such backends, never itself, all different. With up to abi.LC_PEERS others, all of
    them (two: the third word 0, and the program picks between the first two); with more, that
    many drawn by weight without replacement (a backend with more weight is more often a peer, as
    it is more often a slot), seeded by the VIP's and the backend's names: the same on every node
    and every apply. One backend alone: zeros."""
    use = usable(vip, rt)
    cum = list(itertools.accumulate(w for _, w in use))   # once per VIP: O(n log n) for n backends
    out = {}
    for pos, (i, _) in enumerate(use):
        if len(use) - 1 <= abi.LC_PEERS:
            peers = [ids[j] for j, _ in use if j != i]
            if len(peers) == 1:
                peers *= 2
        else:
            # Draws by weight, a repeat or itself drawn again (the law of drawing without
            # replacement); bounded, then the next ones in order (a backend with nearly all the weight).
            rnd = random.Random(zlib.crc32(f"{vip.name}/{vip.backends[i].name}".encode()))
            picked: list[int] = []
            for _ in range(64 * abi.LC_PEERS):
                k = min(bisect.bisect_right(cum, rnd.random() * cum[-1]), len(use) - 1)
                if k != pos and k not in picked:
                    picked.append(k)
                    if len(picked) == abi.LC_PEERS:
                        break
            k = pos
            while len(picked) < abi.LC_PEERS:
                k = (k + 1) % len(use)
                if k != pos and k not in picked:
                    picked.append(k)
            peers = [ids[use[k][0]] for k in picked]
        out[ids[i]] = tuple(peers + [0] * (abi.LC_PEERS - len(peers)))
    return out


def encap_of(vip: model.Vip, b: model.Backend, opts: model.BalancerOptions, link_mtu: int) -> Encap:
    """The encap fields of a backend entry: GUE port, flags, the path MTU (the VIP's, else
    [balancer]'s, else the interface's) and the MSS a SYN is clamped to (mss_clamp: what fits
    that MTU after the outer headers, the inner IP header and a TCP header without options)."""
    if not vip.mode.encap:
        return Encap()
    mtu = vip.mtu or opts.mtu or link_mtu
    inner = 20 if vip.address.version == 4 else 40
    mss = mtu - model.encap_overhead(vip.mode, b.address) - inner - 20 \
        if vip.mss_clamp and vip.protocol is model.Protocol.TCP else 0
    flags = abi.ENC_F_FLOW_SOURCE if vip.mode is model.Mode.IPIP and vip.ipip_source is model.EncapSource.FLOW else 0
    return Encap(vip.gue_port if vip.mode is model.Mode.GUE else 0, flags, mtu, mss)


def nat_flags_of(vip: model.Vip) -> int:
    """struct backend.nat_flags of the VIP's entries."""
    return abi.NAT_F_SNAT if vip.mode is model.Mode.NAT and vip.snat else 0


def sched_of(vip: model.Vip, b: model.Backend) -> SchedFields:
    """The scheduling fields of a backend entry (bpf/sched.h): leastconn's weight scaled to 16
    bits (the VIP's largest weight to 65535 when any is larger), the cap, whether it is counted."""
    if not vip.counted:
        return SchedFields()
    top = max((x.weight for x in vip.backends), default=1)
    w = b.weight if top <= 0xFFFF else max(1, b.weight * 0xFFFF // top) if b.weight else 0
    return SchedFields(w if vip.scheduler is model.Scheduler.LEASTCONN else 0, b.max_conns, True)


def nat_cfg_of(opts: model.BalancerOptions, sources: tuple[model.IPAddress | None, model.IPAddress | None]) -> NatCfg:
    """lbx_nat_cfg: [balancer] snat_v4/snat_v6, else `sources` (the interface's addresses,
    lbxdp.nexthop.nat_sources), the port pool and the timeouts."""
    return NatCfg(opts.snat_v4 or sources[0], opts.snat_v6 or sources[1], opts.snat_pool,  # type: ignore[arg-type]
                  opts.nat_timeouts)


def nat_addresses(cfg: model.Config) -> set[model.IPAddress]:
    """The addresses whose bit lbx_nat_filter needs: every NAT VIP's and every NAT backend's."""
    return {a for v in cfg.vips if v.mode is model.Mode.NAT for a in [v.address, *(b.address for b in v.backends)]}


@dataclass(frozen=True)
class TablePlan:
    """A VIP's next table: its size and tag now, its slots (backend entry ids) from build()."""

    size: int
    tag: int
    build: Callable[[], "array.array[int]"]
    members: frozenset[int] = frozenset()   # backend entry ids the table names


def plan_table(vip: model.Vip, ids: list[int], rt: Runtime) -> TablePlan:
    """What the VIP's table is to be, built only when build() is called.

    ids: the entry id of each of vip.backends. The tag fingerprints the inputs, so apply() skips
    a table whose inputs did not change without building it (a 65537-slot Maglev table costs a
    millisecond with the C helper, 13 in Python). A Maglev table is built when it is written, so
    that a load of many VIPs holds one (256 KiB) at a time; a round-robin sequence is short.
    """
    use = usable(vip, rt)
    keyed = [(vip.backends[i].name, w) for i, w in use]
    lut = [ids[i] for i, _ in use]
    tag = zlib.crc32(repr((vip.scheduler.value, vip.table_size, [(k, w, bid) for (k, w), bid in
                                                                  zip(keyed, lut)])).encode())
    if not use:
        return TablePlan(0, tag, lambda: array.array("I"))
    if vip.scheduler.maglev:
        return TablePlan(vip.table_size, tag, lambda: ring.maglev(keyed, vip.table_size, values=lut), frozenset(lut))
    table = array.array("I", map(lut.__getitem__, ring.weighted_rr(keyed)))
    return TablePlan(len(table), tag, lambda: table, frozenset(lut))


def build_table(vip: model.Vip, ids: list[int], rt: Runtime) -> tuple["array.array[int]", int]:
    """The VIP's table of backend entry ids, and its tag (see plan_table)."""
    plan = plan_table(vip, ids, rt)
    return plan.build(), plan.tag


@dataclass(frozen=True)
class _Switch:
    key: model.VipKey
    old: VipMeta | None
    new: VipMeta
    plan: TablePlan
    ids: tuple[int, ...] = ()   # the VIP's backend entry ids
    rebuild: bool = True        # False: only vip_meta's LBX_VIP_F_ADMIT changed, the table stays

    @property
    def shrinks(self) -> bool:
        return self.old is not None and self.new.table_size < self.old.table_size


@dataclass
class Diff:
    """What apply() changed, as lines for the user ('+ vip ...', '- backend ...')."""

    lines: list[str] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)   # backend entry ids deactivated

    def add(self, line: str) -> None:
        self.lines.append(line)

    @property
    def empty(self) -> bool:
        return not self.lines


class Balancer:
    def __init__(self, maps: Maps):
        self.maps = maps

    def apply(self, cfg: model.Config, macs: dict[model.IPAddress, str], rt: Runtime = Runtime(),
              link_mtu: int = 1500,
              nat_sources: tuple[model.IPAddress | None, model.IPAddress | None] = (None, None)) -> Diff:
        """Make the maps hold cfg. macs: next-hop MAC of every backend whose config has none;
        rt: drains and slow starts in progress; link_mtu: the interface's MTU (the encap modes'
        default path MTU); nat_sources: the interface's IPv4 and IPv6 address, the SNAT sources
        where [balancer] names none (lbxdp.nexthop.nat_sources checked them)."""
        current = self.maps.vips()
        entries = self.maps.backends()
        live_ids = {m.id for m in current.values()}
        orphans = [e for e in entries.values() if e.vip_id not in live_ids]
        by_vip: dict[int, dict[tuple[model.IPAddress, int], BackendEntry]] = {}
        for e in entries.values():
            by_vip.setdefault(e.vip_id, {})[(e.address, e.port)] = e

        free_vips = sorted(set(range(self.maps.max_vips)) - live_ids)
        free_bes = sorted(set(range(1, self.maps.max_backends)) - set(entries) | {e.id for e in orphans})
        self._check_capacity(cfg, current, by_vip, len(free_vips), len(free_bes))
        free_vips.reverse()
        free_bes.reverse()

        self.maps.set_flood_threshold(cfg.balancer.flood_threshold or 0)
        # NAT: settings and filter bits before any entry that needs them (bpf/nat.h)
        self.maps.set_nat_cfg(nat_cfg_of(cfg.balancer, nat_sources))
        self.maps.add_to_nat_filter(nat_addresses(cfg))
        diff, retired, switches = Diff(), [], []
        retired_from: dict[int, int | None] = {}   # retired entry -> its VIP's id, None when the VIP goes too
        quic_ids: dict[int, dict[int, tuple[int, bool]]] = {}
        backups: dict[int, list[int]] = {}   # VIP id -> lbx_backups
        peers: dict[int, tuple[int, ...]] = {}   # backend entry id -> lc_peer (leastconn VIPs)
        admit: dict[int, model.Admission] = {}   # scope (vip id, or the global one) -> its rules
        for e in orphans:
            # An established flow finds its backend without a VIP lookup: an entry must not
            # outlive its VIP (an id's next owner gets a new generation, but this one is active).
            self.maps.deactivate_backend(e.id)
            self.maps.retire_backend_counters(e.id, None)
            diff.add(f"- backend {e.name} of a VIP that no longer exists (id {e.vip_id})")
        self.maps.add_to_vip_filter({k.address for k in current} | {v.address for v in cfg.vips})
        desired = {v.key for v in cfg.vips}
        for vip in cfg.vips:
            meta = current.get(vip.key)
            if meta is None:
                vip_id = free_vips.pop()
                self.maps.reset_vip_counters(vip_id)
            else:
                vip_id = meta.id
            admit[vip_id] = vip.admission
            have = by_vip.get(vip_id, {}) if meta is not None else {}
            ids = []
            mode = vip.mode.abi   # every entry carries its VIP's mode: established flows read it there
            nat = nat_flags_of(vip)
            for b in vip.backends:
                sch = sched_of(vip, b)
                mac = b.mac or macs[b.address]
                enc = encap_of(vip, b, cfg.balancer, link_mtu)
                old = have.get((b.address, b.port))
                if old is None:
                    bid = free_bes.pop()
                    self.maps.reset_backend_counters(bid)
                    self.maps.put_backend(bid, vip_id, b, mac, mode, enc, nat, sch, b.server_id)
                    diff.add(f"+ backend {b.name} ({mac}) on {vip.name}")
                else:
                    bid = old.id
                    if old.mac != mac or old.mode != mode or old.encap != enc or old.nat_flags != nat or old.sched != sch \
                            or old.server_id != b.server_id:
                        self.maps.put_backend(bid, vip_id, b, mac, mode, enc, nat, sch, b.server_id)
                    if old.sched.max_conns != sch.max_conns:
                        diff.add(f"~ backend {b.name} max_conns {old.sched.max_conns} -> {sch.max_conns} on {vip.name}")
                    if old.mac != mac:
                        diff.add(f"~ backend {b.name} mac {old.mac} -> {mac} on {vip.name}")
                ids.append(bid)
                if vip.quic and b.server_id:   # bpf/quic.h: (VIP, server id) -> this entry
                    quic_ids.setdefault(vip_id, {})[b.server_id] = (bid, vip.id_of(b) in rt.down)
            kept = {(b.address, b.port) for b in vip.backends}
            for addr_port, e in have.items():
                if addr_port not in kept:
                    retired.append(e.id)
                    retired_from[e.id] = vip_id
                    diff.add(f"- backend {e.name} from {vip.name}")
            # LBX_VIP_F_ADMIT: admit() reads lbx_admit only for a VIP whose flag says either
            # scope has rules. Written with the meta in _switch_tables, after _apply_admission:
            # rules take effect when the flag is set (a flag without entries is no rule).
            has_rules = vip.admission != model.Admission() or cfg.balancer.admission != model.Admission()
            backups[vip_id] = backups_of(vip, ids, rt)
            if vip.scheduler is model.Scheduler.LEASTCONN:
                peers.update(lc_peers(vip, ids, rt))
            switch = self._plan_switch(vip, vip_id, meta, ids, rt, diff, has_rules)
            if switch is not None:
                switches.append(switch)
        self._apply_admission(cfg, admit, diff)   # before _switch_tables inserts new VIPs
        self._switch_tables(switches)
        self.maps.write_quic_ids(quic_ids)   # after the entries it names; drops deleted VIPs' ids
        self.maps.write_backups(backups)     # after the entries it names (bpf/sched.h: backup_choice)
        for bid, p in peers.items():         # written where they changed (an upgrade: every one)
            self.maps.set_lc_peers(bid, p)
        for key, meta in current.items():
            if key not in desired:
                self.maps.delete_vip(key)
                self.maps.delete_table(meta.id)
                retired.extend(e.id for e in by_vip.get(meta.id, {}).values())
                diff.add(f"- vip {key.name}")
        for bid in retired:
            self.maps.deactivate_backend(bid)
            self.maps.retire_backend_counters(bid, retired_from.get(bid))
        diff.retired = retired
        self.maps.reset_vip_filter({v.address for v in cfg.vips})
        self.maps.reset_nat_filter(nat_addresses(cfg))
        return diff

    def _apply_admission(self, cfg: model.Config, admit: dict[int, model.Admission], diff: Diff) -> None:
        """ACL and new-flow limits (bpf/admit.h). A changed rule set also purges the established
        flows it refuses: their next packet is a new flow again, and is dropped (README: allow/deny)."""
        if self.maps.admit_map is None:
            self.maps.write_admission(admit | {-1: cfg.balancer.admission})   # refuses rules it cannot hold
            return
        admit[self.maps.global_scope] = cfg.balancer.admission
        if self.maps.write_admission(admit):
            rules = sum(a.rules for a in admit.values())
            purged = self.maps.purge_refused(admit)
            diff.add(f"~ allow/deny: {rules} rules; {purged} established flows they refuse purged")

    def _plan_switch(self, vip: model.Vip, vip_id: int, meta: VipMeta | None, ids: list[int],
                     rt: Runtime, diff: Diff, has_rules: bool = False) -> _Switch | None:
        sched, mode = vip.scheduler.abi, vip.mode.abi
        plan = plan_table(vip, ids, rt)
        flags = abi.VIP_F_PASS_NO_BACKEND if vip.on_all_down is model.OnAllDown.PASS else 0
        if any(b.max_conns for b in vip.backends):
            flags |= abi.VIP_F_CAPS
        if vip.quic:
            flags |= abi.VIP_F_QUIC
        if vip.passive_health is not None and vip.mode is not model.Mode.NAT:
            flags |= abi.VIP_F_PASSIVE     # bpf/select.h: SYNs half-open, handshakes counted
        if has_rules:
            flags |= abi.VIP_F_ADMIT
        src_prefix = vip.src_prefix if vip.scheduler is model.Scheduler.SOURCE else 0
        if meta is not None and (meta.table_tag, meta.sched, meta.mode, meta.flags, meta.src_prefix) == \
                (plan.tag, sched, mode, flags, src_prefix):
            return None
        if meta is not None and (meta.table_tag, meta.sched, meta.mode, meta.flags | abi.VIP_F_ADMIT,
                                 meta.src_prefix) == (plan.tag, sched, mode, flags | abi.VIP_F_ADMIT, src_prefix):
            # only the admission flag: the same table, the meta rewritten in one map write
            return _Switch(vip.key, meta, replace(meta, flags=flags), plan, tuple(ids), rebuild=False)
        # A changed table unsettles the VIP's SYNs for a while (bpf/select.h: reproducible());
        # a new VIP's first table is settled: no packet used another one.
        changed_at = 0 if meta is None else meta.changed_at if meta.table_tag == plan.tag else now_units()
        new_meta = VipMeta(vip_id, plan.size, sched, mode, plan.tag, flags, changed_at, src_prefix)
        if meta is None:
            diff.add(f"+ vip {vip.name} ({vip.mode.value}, {vip.scheduler.value}, {len(vip.backends)} backends)")
        elif meta.sched != sched or meta.mode != mode:
            diff.add(f"~ vip {vip.name} ({vip.mode.value}, {vip.scheduler.value})")
        else:
            diff.add(f"~ vip {vip.name}: table rebuilt ({plan.size} slots)")
        return _Switch(vip.key, meta, new_meta, plan, tuple(ids))

    def _switch_tables(self, switches: list[_Switch]) -> None:
        """Step 2: swap in the new tables, many per map write (Maps.write_tables: each write
        waits an RCU grace period). A VIP's meta is written before its table swap when the table
        shrinks and after it when it grows (or is new), so a packet's slot is always inside the
        table it reads, whichever swap it sees. Tables are built one at a time as they are written."""
        for s in switches:
            if s.shrinks:
                self.maps.put_vip(s.key, s.new)
        self.maps.write_tables((s.new.id, s.plan.build()) for s in switches if s.rebuild)
        for s in switches:
            if not s.shrinks:
                self.maps.put_vip(s.key, s.new)
        for s in switches:
            for bid in s.ids:
                self.maps.mark_in_table(bid, bid in s.plan.members)

    def _check_capacity(self, cfg: model.Config, current: dict[model.VipKey, VipMeta],
                        by_vip: dict[int, dict[tuple[model.IPAddress, int], BackendEntry]],
                        free_vips: int, free_bes: int) -> None:
        need_vips = sum(1 for v in cfg.vips if v.key not in current)
        need_bes = 0
        for v in cfg.vips:
            have = by_vip.get(current[v.key].id, {}) if v.key in current else {}
            need_bes += sum(1 for b in v.backends if (b.address, b.port) not in have)
            if len(v.backends) > abi.VIP_BACKENDS_MAX:
                raise LbxError(f"{v.name}: {len(v.backends)} backends; at most {abi.VIP_BACKENDS_MAX} per VIP")
        if need_vips > free_vips or need_bes > free_bes:
            raise LbxError(f"the config needs {need_vips} new VIP and {need_bes} new backend entries; "
                           f"the maps have room for {free_vips} and {free_bes}",
                           "nothing was applied; remove VIPs/backends or reattach with larger capacities")
