"""Edits of the desired state: pure functions over the model, one per verb.

Each takes the config an instance was last told and returns a Change: the new config and, for
drains and health overrides, what changes beside it (lbxdp.applied keeps that in runtime.json).
Nothing here reads a file or a map: the CLI's `lbxdp vip|backend ...` verbs and the daemon call
them through control.edit(), which validates the result (validated(): the model's own rules,
named in the verb's words) and applies it as a minimal diff. An edit of something that does not
exist raises LbxError (exit code 2) and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from . import model
from .errors import LbxError
from .model import BackendId, HealthOverride


@dataclass(frozen=True)
class Change:
    cfg: model.Config
    drain: Mapping[BackendId, float] = field(default_factory=dict)    # -> deadline (epoch seconds)
    health: Mapping[BackendId, HealthOverride] = field(default_factory=dict)   # AUTO: the check decides


def validated(cfg: model.Config, what: str) -> model.Config:
    """cfg if the model finds no problem; else LbxError naming the verb and the VIP/backend
    ('backend set-weight: VIP 10.0.0.1:80/tcp backend 10.0.1.1:80 weight: -1 is out of range (0-1000)')."""
    for p in cfg.problems()[:1]:
        raise LbxError(f"{what}: {cfg.describe(p.path)}: {p.message}", "nothing was applied", exit_code=2)
    return cfg


def vip_index(cfg: model.Config, key: model.VipKey) -> int:
    for i, v in enumerate(cfg.vips):
        if v.key == key:
            return i
    raise LbxError(f"no VIP {key.name} on this balancer", "list them: lbxdp vip ls", exit_code=2)


def backend_index(vip: model.Vip, address: model.IPAddress, port: int) -> int:
    for i, b in enumerate(vip.backends):
        if (b.address, b.port) == (address, port):
            return i
    raise LbxError(f"{vip.name} has no backend {model.endpoint(address, port)}",
                   f"list them: lbxdp backend ls {vip.name}", exit_code=2)


def _with_vip(cfg: model.Config, i: int, vip: model.Vip | None) -> model.Config:
    vips = list(cfg.vips)
    if vip is None:
        del vips[i]
    else:
        vips[i] = vip
    return replace(cfg, vips=tuple(vips))


def _with_backends(cfg: model.Config, bid: BackendId, backends: "list[model.Backend]") -> model.Config:
    i = vip_index(cfg, bid.vip)
    return _with_vip(cfg, i, replace(cfg.vips[i], backends=tuple(backends)))


def _backends(cfg: model.Config, bid: BackendId) -> tuple[list[model.Backend], int]:
    """The backends of bid's VIP, and bid's index among them."""
    v = cfg.vips[vip_index(cfg, bid.vip)]
    return list(v.backends), backend_index(v, bid.address, bid.port)


# --- VIPs ------------------------------------------------------------------------------------------

def vip_add(cfg: model.Config, key: model.VipKey, backends: tuple[model.Backend, ...],
            scheduler: model.Scheduler = model.Scheduler.MAGLEV, table_size: int = model.DEFAULT_TABLE_SIZE,
            slow_start: float = 0.0, source_prefix: int | None = None) -> Change:
    if any(v.key == key for v in cfg.vips):
        raise LbxError(f"VIP {key.name} exists already", "change it with `lbxdp backend ...`", exit_code=2)
    size = table_size if scheduler.maglev else model.DEFAULT_TABLE_SIZE
    new = model.Vip(key.address, key.port, key.protocol, model.Mode.DSR, scheduler, backends, size, slow_start,
                    source_prefix=source_prefix)
    return Change(replace(cfg, vips=cfg.vips + (new,)))


def vip_set_scheduler(cfg: model.Config, key: model.VipKey, scheduler: model.Scheduler,
                      source_prefix: int | None = None) -> Change:
    """The VIP's scheduler (issue 13: source, leastconn too); source_prefix for source only."""
    i = vip_index(cfg, key)
    v = cfg.vips[i]
    size = v.table_size if scheduler.maglev else model.DEFAULT_TABLE_SIZE
    return Change(_with_vip(cfg, i, replace(v, scheduler=scheduler, table_size=size, source_prefix=source_prefix)))


def vip_del(cfg: model.Config, key: model.VipKey) -> Change:
    return Change(_with_vip(cfg, vip_index(cfg, key), None))


# --- backends --------------------------------------------------------------------------------------

def backend_add(cfg: model.Config, key: model.VipKey, backend: model.Backend) -> Change:
    v = cfg.vips[vip_index(cfg, key)]
    if any((b.address, b.port) == (backend.address, backend.port) for b in v.backends):
        raise LbxError(f"{v.name} has backend {backend.name} already", "use `backend set-weight` to change it",
                       exit_code=2)
    if isinstance(backend.mac, str) and model.MAC.fullmatch(backend.mac.lower()):
        backend = replace(backend, mac=backend.mac.lower())   # stored as a config file stores it
    return Change(_with_backends(cfg, v.id_of(backend), [*v.backends, backend]))


def backend_del(cfg: model.Config, bid: BackendId) -> Change:
    bes, i = _backends(cfg, bid)
    del bes[i]
    return Change(_with_backends(cfg, bid, bes))


def backend_set_weight(cfg: model.Config, bid: BackendId, weight: int) -> Change:
    bes, i = _backends(cfg, bid)
    bes[i] = replace(bes[i], weight=weight)
    return Change(_with_backends(cfg, bid, bes))


def backend_set_max_conns(cfg: model.Config, bid: BackendId, max_conns: int) -> Change:
    """BACKEND's connection cap (0: none); its open connections stay, new ones stop at the cap."""
    bes, i = _backends(cfg, bid)
    bes[i] = replace(bes[i], max_conns=max_conns)
    return Change(_with_backends(cfg, bid, bes))


def backend_drain(cfg: model.Config, bid: BackendId, deadline: float) -> Change:
    """No new flow goes to bid; at deadline (epoch seconds, rounded up to a balancer.STEP
    boundary so that nodes told the same end it together) it leaves its VIP with its flows."""
    from .balancer import epoch_ceil
    deadline = epoch_ceil(deadline)
    _backends(cfg, bid)     # it exists
    return Change(cfg, drain={bid: deadline})


def backend_set_health(cfg: model.Config, bid: BackendId, state: HealthOverride) -> Change:
    """Force bid's health up or down, or hand it back to its check (AUTO)."""
    if bid not in cfg.backends():
        raise LbxError(f"no backend {bid.name} on VIP {bid.vip.name}", "list them: lbxdp backend ls", exit_code=2)
    return Change(cfg, health={bid: HealthOverride(state)})


# --- allow/deny rules ------------------------------------------------------------------------------

def _admission(cfg: model.Config, key: model.VipKey | None) -> model.Admission:
    return cfg.balancer.admission if key is None else cfg.vips[vip_index(cfg, key)].admission


def _with_admission(cfg: model.Config, key: model.VipKey | None, a: model.Admission) -> model.Config:
    if key is None:
        return replace(cfg, balancer=replace(cfg.balancer, admission=a))
    i = vip_index(cfg, key)
    return _with_vip(cfg, i, replace(cfg.vips[i], admission=a))


def acl_add(cfg: model.Config, which: model.AclList, network: model.IPNetwork,
            key: model.VipKey | None = None) -> Change:
    """Put network on the allow or deny list of VIP key ([balancer]'s when None)."""
    a = _admission(cfg, key)
    nets = getattr(a, which.value)
    if network in nets:
        where = f"VIP {key.name}" if key else "the global rules"
        raise LbxError(f"{network} is on the {which.value} list of {where} already", "list them: lbxdp acl ls",
                       exit_code=2)
    return Change(_with_admission(cfg, key, replace(a, **{which.value: nets + (network,)})))


def acl_del(cfg: model.Config, which: model.AclList, network: model.IPNetwork,
            key: model.VipKey | None = None) -> Change:
    a = _admission(cfg, key)
    nets = getattr(a, which.value)
    if network not in nets:
        where = f"VIP {key.name}" if key else "the global rules"
        raise LbxError(f"{network} is not on the {which.value} list of {where}", "list them: lbxdp acl ls",
                       exit_code=2)
    return Change(_with_admission(cfg, key, replace(a, **{which.value: tuple(n for n in nets if n != network)})))
