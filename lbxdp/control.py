"""The control plane's verbs on one instance: attach, apply, detach, status.

Each verb validates everything it can before it changes anything, and a failed first attach
removes what it made (pins, run state), so a bad command leaves the machine as it was.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import __version__, abi, applied, bpfsys, edits, loader, migrate, model, neigh, nexthop
from .balancer import Balancer, Diff, encap_of
from .errors import LbxError
from .maps import Maps, OwnAddresses
from .model import BackendId, HealthOverride
from .paths import Instance, atomic_write, private_dirs

if TYPE_CHECKING:
    from .view import InstanceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttachResult:
    mode: str
    prog_id: int
    diff: Diff
    upgraded: bool
    recreated: tuple[str, ...] = ()   # maps pinned before this attach that it could not keep
    migrated: tuple[str, ...] = ()    # maps converted to a new layout: 'lbx_backends (12 entries)'


def pinned_map_ids(inst: Instance) -> dict[str, int]:
    """Id of every map pinned for the instance (to tell, after a compile, which were kept)."""
    ids = {}
    for name in (m.value for m in abi.Map):
        try:
            fd = bpfsys.obj_get(inst.pin_dir / name)
        except OSError:
            continue
        try:
            ids[name] = bpfsys.map_info(fd).id
        finally:
            os.close(fd)
    return ids


def resolve_macs(ifname: str, cfg: model.Config) -> dict[model.IPAddress, str]:
    """Next-hop MAC of every backend whose config has none: a dsr backend is a neighbour on the
    segment; an ipip/gue/nat backend's next hop is its route's gateway, or itself when on-link
    (lbxdp.nexthop). An unreachable backend is an LbxError before anything is applied."""
    idx = loader.ifindex(ifname)
    dsr = [b.address for v in cfg.vips if not v.mode.routed for b in v.backends if b.mac is None]
    enc = [b.address for v in cfg.vips if v.mode.routed for b in v.backends if b.mac is None]
    out = nexthop.resolve(ifname, idx, list(dict.fromkeys(enc))) if enc else {}
    if dsr:
        out |= neigh.resolve(ifname, idx, list(dict.fromkeys(dsr)))
    return out


def link_mtu(ifname: str) -> int:
    """The interface's MTU (the encap modes' default path MTU), asked in this thread's netns."""
    siocgifmtu = 0x8921
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), siocgifmtu, struct.pack("16si", ifname.encode()[:15], 0))
        except OSError as e:
            raise LbxError(f"cannot read the MTU of {ifname!r}: {e.strerror}", "list interfaces with `ip -br link`") from e
    return struct.unpack("16si", res)[1]


def own_addresses(ifname: str, cfg: model.Config) -> OwnAddresses:
    """The outer sources and flow prefixes lbx_ctl should hold; LbxError (exit 2) if an encap
    backend's family has no source address."""
    own = nexthop.own_addresses(loader.ifindex(ifname), cfg)
    missing = nexthop.missing_sources(cfg, own)
    if missing:
        raise LbxError(f"no outer source address for {missing[0]}: {ifname} has no address of its family",
                       "give the interface one, or set [balancer] ipv4_source / ipv6_source", exit_code=2)
    return own


def nat_sources(ifname: str, cfg: model.Config) -> tuple[model.IPAddress | None, model.IPAddress | None]:
    """The SNAT sources lbx_nat_cfg should hold (lbxdp.nexthop.nat_sources: LbxError naming
    balancer.snat_v4/snat_v6 if unusable); (None, None) without NAT VIPs or SNAT keys."""
    if not any(v.mode is model.Mode.NAT for v in cfg.vips) and cfg.balancer.snat_v4 is None \
            and cfg.balancer.snat_v6 is None:
        return None, None
    return nexthop.nat_sources(ifname, loader.ifindex(ifname), cfg)


def refresh_next_hops(inst: Instance) -> Diff | None:
    """The daemon's tick: re-resolve next hops (gateway or neighbour MACs), the interface's MTU and
    own addresses, and apply what changed (a moved gateway, a renumbered interface). None when
    nothing changed, so a quiet tick writes nothing."""
    st = applied.load(inst)
    if not any(v.mode.routed for v in st.cfg.vips):
        return None
    macs = resolve_macs(inst.ifname, st.cfg)
    own = own_addresses(inst.ifname, st.cfg)
    mtu = link_mtu(inst.ifname)
    with open_maps(inst) as m:
        have = {(e.vip_id, e.address, e.port): e for e in m.backends().values()}
        vip_ids = {k: meta.id for k, meta in m.vips().items()}
        stale = m.own_addresses() != own or any(
            (e := have.get((vip_ids.get(v.key), b.address, b.port))) is not None
            and (e.mac != (b.mac or macs[b.address]) or e.encap != encap_of(v, b, st.cfg.balancer, mtu))
            for v in st.cfg.vips if v.mode.routed for b in v.backends)
    return apply(inst) if stale else None


def _foreign_program(inst: Instance, state: bpfsys.XdpState) -> int | None:
    """Id of an XDP program on the interface that is not this instance's, if any."""
    if not state.prog_id:
        return None
    from .trace import attached_trace   # `lbxdp trace`'s build of this instance is ours too
    if attached_trace(inst, state.prog_id) is not None:
        return None
    if inst.exists():
        fd = bpfsys.obj_get(inst.prog_pin)
        try:
            if bpfsys.prog_info(fd).id == state.prog_id:
                return None
        finally:
            os.close(fd)
    return state.prog_id


def attach(inst: Instance, cfg: model.Config, mode: model.XdpMode = model.XdpMode.AUTO, force: bool = False,
           config_path: str | None = None, build: loader.BuildConfig | None = None,
           allow_empty: bool = False) -> AttachResult:
    """Compile, load, fill the maps with cfg, attach, pin. Re-attaching upgrades in place.
    A config with no VIP over an instance that has some is refused unless allow_empty."""
    private_dirs(inst)
    idx = loader.ifindex(inst.ifname)
    foreign = _foreign_program(inst, bpfsys.xdp_query(idx))
    if foreign and not force:
        raise LbxError(f"{inst.label} already has an XDP program (id {foreign}) that lbxdp did not attach",
                       f"detach it first (ip link set dev {inst.ifname} xdp off) or pass --force to replace it")
    resolve_macs(inst.ifname, cfg)   # fail on an unknown neighbour or route before compiling anything
    if any(v.mode.encap for v in cfg.vips):
        own_addresses(inst.ifname, cfg)
    nat_sources(inst.ifname, cfg)
    if not allow_empty and not cfg.vips and inst.exists():
        try:                           # refuse before compiling anything (apply checks again)
            with open_maps(inst) as m:
                n = len(m.vips())
        except (LbxError, OSError):
            n = 0
        refuse_empty(inst, cfg, n, config_path)
    loader.ensure_bpffs()
    private_dirs(inst, create=True)  # the roots and instance directories: root's, mode 0700
    upgraded = inst.exists()
    build = build or loader.BuildConfig(inst.pin_dir)
    prog = None
    try:
        # bcc pins each map as it creates it: a compile or verifier failure of a first attach
        # must not leave those pins behind (the except below removes them).
        adopted = migrate.upgrade(inst, build) if upgraded else {}   # pins of another layout converted
        before = pinned_map_ids(inst) if upgraded else {}
        prog = loader.compile_program(build)
        recreated = tuple(n for n, i in before.items() if n not in prog.maps or prog.maps[n].info.id != i)
        recreated += tuple(n for n in prog.maps if upgraded and n not in before)
        recreated += tuple(n for n, how in adopted.items() if how == migrate.RECREATED)
        migrated = tuple(f"{n} {how.removeprefix('migrated ')}" for n, how in adopted.items()
                         if how.startswith("migrated"))
        loader.save_schema(inst, prog.schema, prog.source, prog.layouts)
        maps = Maps(prog.maps)
        maps.set_own_mac(loader.hwaddr(inst.ifname))   # until then it forwards nothing
        diff = apply(inst, cfg, maps=maps, allow_empty=allow_empty, source=config_path)
        used = loader.attach(inst.ifname, prog.fd, mode)
        if inst.prog_pin.exists():
            inst.prog_pin.unlink()
        bpfsys.obj_pin(prog.fd, inst.prog_pin)
        _write_state(inst, {"ifname": inst.ifname, "netns": inst.netns, "mode": used,
                            "prog_id": prog.info.id, "attached_at": time.time(),
                            "config": config_path, "version": __version__})
    except BaseException:
        if not upgraded:
            _remove_files(inst)
        raise
    finally:
        if prog is not None:
            prog.close()
    return AttachResult(used, prog.info.id, diff, upgraded, recreated, migrated)


def sync_own_mac(inst: Instance) -> tuple[str | None, str] | None:
    """Give the program the interface's current MAC: (old, new) if it changed, else None."""
    mac = loader.hwaddr(inst.ifname)
    with open_maps(inst) as m:
        old = m.own_mac()
        return (old, mac) if m.set_own_mac(mac) else None


def apply(inst: Instance, cfg: model.Config | None = None, now: float | None = None,
          maps: Maps | None = None, allow_empty: bool = False, source: str | None = None) -> Diff:
    """Make the instance hold cfg (None: what it was last told, e.g. for a slow-start step).

    Drains past their deadline are finished here: the backend leaves its VIP and its
    connection-table entries are removed. A cfg replaces the applied state even if that is
    unreadable (logged); a cfg with no VIP is refused while the instance has VIPs, unless
    allow_empty (source: the config file, for the message).
    """
    private_dirs(inst)
    with applied.locked(inst):
        if cfg is None:
            return _apply_locked(inst, applied.load(inst), None, now, maps)
        st = applied.load_to_replace(inst)
        if not allow_empty and not cfg.vips:
            with (nullcontext(maps) if maps is not None else open_maps(inst)) as m:
                refuse_empty(inst, cfg, len(m.vips()), source)
        return _apply_locked(inst, st, cfg, now, maps)


def refuse_empty(inst: Instance, cfg: model.Config, n: int, source: str | None) -> None:
    """An empty (e.g. truncated) config would remove all n VIPs: refuse that unless asked."""
    if not cfg.vips and n:
        raise LbxError(f"{source or 'the config'} has no [[vip]]; it would remove all {n} VIPs of {inst.label}; "
                       "pass --allow-empty to do that", "nothing was changed", exit_code=2)


def edit(inst: Instance, change: Callable[[model.Config, float], edits.Change], what: str = "edit") -> Diff:
    """Read what the instance was told, change it, validate the result (edits.validated), apply.

    change(cfg, now) is one of lbxdp.edits (e.g. `lambda cfg, now: edits.vip_del(cfg, key)`);
    its drains and health overrides are recorded beside the config; `what` (e.g. "backend add")
    starts the message of an invalid result. A backend it forces down loses its flows on a VIP
    with on_backend_down = "migrate".
    """
    private_dirs(inst)
    with applied.locked(inst):
        st = applied.load(inst)
        if not st.cfg.vips and not inst.exists():
            raise LbxError(f"lbxdp is not attached to {inst.label}", f"attach it: lbxdp attach {inst.ifname} --config FILE")
        now = time.time()
        ch = change(st.cfg, now)
        cfg = edits.validated(ch.cfg, what)
        was_down = st.down()
        st.draining.update(ch.drain)
        for bid, forced in ch.health.items():
            if forced is HealthOverride.AUTO:
                st.overrides.pop(bid, None)
            else:
                st.overrides[bid] = forced
        return _apply_locked(inst, st, cfg, now, None, was_down)


def health_changed(inst: Instance, changes: dict[BackendId, dict[str, Any]] | None) -> Diff:
    """Record health transitions (backend -> {healthy, since, detail, latency}) and apply them;
    None forgets every recorded verdict (a new checker starts all backends healthy).

    Called by the daemon on its checker's transitions; a backend that went down on a VIP with
    on_backend_down = "migrate" also loses its connection-table entries.
    """
    private_dirs(inst)
    with applied.locked(inst):
        st = applied.load(inst)
        was_down = st.down()        # before the change: what it takes down is what migrates
        if changes is None:
            st.health.clear()
        else:
            known = st.cfg.backends()   # a late transition of a backend removed meanwhile is dropped
            st.health.update({k: v for k, v in changes.items() if k in known})
        return _apply_locked(inst, st, None, None, None, was_down)


def _apply_locked(inst: Instance, st: applied.State, cfg: model.Config | None, now: float | None,
                  maps: Maps | None, was_down: set[BackendId] | None = None) -> Diff:
    """was_down: the backends that were down before the caller changed st's health or overrides
    (default: those down in st); the ones down now and not then lose their flows on migrate VIPs."""
    now = time.time() if now is None else now
    was_down = st.down() if was_down is None else was_down
    st = st.moved_to(st.cfg if cfg is None else cfg, now)
    expired = st.expired_drains(now)
    if expired:
        st = st.moved_to(st.without(expired), now)
    macs = resolve_macs(inst.ifname, st.cfg)
    snat = nat_sources(inst.ifname, st.cfg)
    encap = any(v.mode.encap for v in st.cfg.vips)
    own = own_addresses(inst.ifname, st.cfg) if encap else None
    mtu = link_mtu(inst.ifname) if encap else 1500
    with (nullcontext(maps) if maps is not None else open_maps(inst)) as m:
        if own is not None:
            m.set_own_addresses(own)   # before any entry that needs them
        diff = Balancer(m).apply(st.cfg, macs, st.runtime(now), mtu, snat)
        doomed = list(diff.retired)
        newly_down = st.down() - was_down
        if newly_down:
            doomed += _migrating_entries(m, st.cfg, newly_down)
        if doomed:
            purged = m.purge_flows(doomed)
            if purged:
                diff.add(f"- {purged} connection-table entries of removed or failed backends")
    applied.save(inst, st)
    return diff


def _migrating_entries(m: Maps, cfg: model.Config, ids: set[BackendId]) -> list[int]:
    """Entry ids of these backends on VIPs whose flows leave a failed backend (migrate)."""
    vip_ids = {k: meta.id for k, meta in m.vips().items()}
    entries = {(e.vip_id, e.address, e.port): e.id for e in m.backends().values()}
    out = []
    for bid, (v, _) in cfg.backends().items():
        if bid in ids and v.on_backend_down is model.OnBackendDown.MIGRATE and v.key in vip_ids:
            eid = entries.get((vip_ids[v.key], bid.address, bid.port))
            if eid is not None:
                out.append(eid)
    return out


def detach(inst: Instance) -> bool:
    """Remove the program from the interface and the pins; False if nothing was attached."""
    _removable(inst)   # before anything: a symlinked or escaping directory stops it here
    was = inst.exists()
    try:
        idx = loader.ifindex(inst.ifname)
    except LbxError:
        idx = None  # the interface is gone (e.g. its namespace was deleted): just remove the pins
    if idx is not None:
        from . import probe   # the health probes' tc program goes first: it reads the pins
        probe.detach(inst.ifname)
    if idx is not None and was and _foreign_program(inst, bpfsys.xdp_query(idx)) is None:
        loader.detach(inst.ifname)
    _remove_files(inst)
    return was


def _removable(inst: Instance) -> list[tuple[Path, Path]]:
    """(root, instance directory) pairs that may be removed: each directory must lie inside its
    root once every symlink is resolved, strictly below it, and not be a symlink itself (paths.
    Instance already refused names like '..' or ''; this holds even if a directory was swapped)."""
    for root, d in inst.dirs():
        real_root = root.resolve()
        if not d.exists() and not d.is_symlink():
            continue
        if d.is_symlink() or not d.resolve().is_relative_to(real_root) or d.resolve() == real_root \
                or d.resolve() != real_root / d.relative_to(root):
            raise LbxError(f"{d} is a symlink or leads outside {root}: lbxdp will not remove it",
                           f"look at it (ls -la {d.parent}) and remove it by hand if it is not yours", exit_code=2)
    return inst.dirs()


def _remove_files(inst: Instance) -> None:
    pairs = _removable(inst)
    for _, d in pairs:
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
    # Remove now-empty parents (netns/<name>/, then the root itself), never above the roots.
    for root, d in pairs:
        d = d.parent
        while d.is_relative_to(root) and d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def _write_state(inst: Instance, state: dict[str, Any]) -> None:
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(inst.state_file, json.dumps(state, indent=2))


def read_state(inst: Instance) -> dict[str, Any]:
    try:
        return json.loads(inst.state_file.read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def open_maps(inst: Instance) -> Iterator[Maps]:
    maps = Maps(loader.open_pinned_maps(inst))
    try:
        yield maps
    finally:
        maps.close()


def status(inst: Instance) -> InstanceStatus:
    """Everything `lbxdp status` shows, typed (lbxdp.view; .to_json() is its --json output)."""
    from . import view
    return view.read(inst)
