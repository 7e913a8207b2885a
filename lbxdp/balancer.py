"""apply(desired config) -> the minimal set of map writes that makes the maps hold it.

Order matters, so that a packet never sees a half-made state:
  0. backend entries of VIP ids that no longer exist (left by an apply that was interrupted) are
     deactivated, and the VIP address filter gets the bits of every VIP address, old and new;
  1. new or changed backend entries are written (they are unreachable until a table names them);
  2. each VIP's new table is written into the idle half of its double buffer;
  3. one write of the VIP's meta makes that half live (new VIPs appear here);
  4. only then are VIPs deleted and backend entries that no table names any more deactivated,
     and the filter is cut down to the bits of the VIPs that remain.
Capacity is checked before the first write, so a config that does not fit changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import abi, model
from .errors import LbxError
from .maps import BackendEntry, Maps, VipMeta


@dataclass
class Diff:
    """What apply() changed, as lines for the user ('+ vip ...', '- backend ...')."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    @property
    def empty(self) -> bool:
        return not self.lines


class Balancer:
    def __init__(self, maps: Maps):
        self.maps = maps

    def apply(self, cfg: model.Config, macs: dict[model.IPAddress, str]) -> Diff:
        """Make the maps hold cfg. macs: next-hop MAC of every backend whose config has none."""
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

        diff, retired = Diff(), []
        for e in orphans:
            # An established flow finds its backend without a VIP lookup: an entry must not
            # outlive its VIP (an id's next owner gets a new generation, but this one is active).
            self.maps.deactivate_backend(e.id)
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
            have = by_vip.get(vip_id, {}) if meta is not None else {}
            ids = []
            for b in vip.backends:
                mac = b.mac or macs[b.address]
                old = have.get((b.address, b.port))
                if old is None:
                    bid = free_bes.pop()
                    self.maps.reset_backend_counters(bid)
                    self.maps.put_backend(bid, vip_id, b, mac)
                    diff.add(f"+ backend {b.name} ({mac}) on {vip.name}")
                else:
                    bid = old.id
                    if old.mac != mac:
                        self.maps.put_backend(bid, vip_id, b, mac)
                        diff.add(f"~ backend {b.name} mac {old.mac} -> {mac} on {vip.name}")
                ids.append(bid)
            kept = {(b.address, b.port) for b in vip.backends}
            for addr_port, e in have.items():
                if addr_port not in kept:
                    retired.append(e.id)
                    diff.add(f"- backend {e.name} from {vip.name}")
            self._switch_table(vip, vip_id, meta, ids, diff)
        for key, meta in current.items():
            if key not in desired:
                self.maps.delete_vip(key)
                retired.extend(e.id for e in by_vip.get(meta.id, {}).values())
                diff.add(f"- vip {key.name}")
        for bid in retired:
            self.maps.deactivate_backend(bid)
        self.maps.reset_vip_filter({v.address for v in cfg.vips})
        return diff

    def _switch_table(self, vip: model.Vip, vip_id: int, meta: VipMeta | None, ids: list[int],
                      diff: Diff) -> None:
        sched, mode = vip.scheduler.abi, vip.mode.abi
        if meta is not None:
            live = self.maps.ring(vip_id, meta.ring_half, meta.ring_size)
            if live == ids and meta.sched == sched and meta.mode == mode:
                return
            half = 1 - meta.ring_half
        else:
            half = 0
        self.maps.write_ring(vip_id, half, ids)
        self.maps.put_vip(vip.key, VipMeta(vip_id, len(ids), half, sched, mode))
        if meta is None:
            diff.add(f"+ vip {vip.name} ({vip.mode.value}, {vip.scheduler.value}, {len(ids)} backends)")
        elif meta.sched != sched or meta.mode != mode:
            diff.add(f"~ vip {vip.name} ({vip.mode.value}, {vip.scheduler.value})")

    def _check_capacity(self, cfg: model.Config, current: dict[model.VipKey, VipMeta],
                        by_vip: dict[int, dict[tuple[model.IPAddress, int], BackendEntry]],
                        free_vips: int, free_bes: int) -> None:
        need_vips = sum(1 for v in cfg.vips if v.key not in current)
        need_bes = 0
        for v in cfg.vips:
            have = by_vip.get(current[v.key].id, {}) if v.key in current else {}
            need_bes += sum(1 for b in v.backends if (b.address, b.port) not in have)
            if len(v.backends) > abi.RING_MAX:
                raise LbxError(f"{v.name}: {len(v.backends)} backends; at most {abi.RING_MAX} per VIP")
        if need_vips > free_vips or need_bes > free_bes:
            raise LbxError(f"the config needs {need_vips} new VIP and {need_bes} new backend entries; "
                           f"the maps have room for {free_vips} and {free_bes}",
                           "nothing was applied; remove VIPs/backends or reattach with larger capacities")
