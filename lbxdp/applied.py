"""What an instance was last told: the applied config and the runtime state beside it.

The maps say what the kernel does; this says why. `applied.toml` is the last config applied (by
attach, by a reload of the daemon, or edited by `lbxdp vip|backend ...`), in the config file's own
format; `runtime.json` holds what no config file says: backends being drained (with their
deadline), when each backend joined its VIP (for slow start), the health of each checked backend
(written by the daemon's checker) and manual health overrides (`lbxdp backend set-health`), each
by its backend's model.BackendId (its `.key` string in the file). Every change goes through
`locked()`, so the CLI and a running daemon never interleave their applies.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, TypeVar

from . import config, model
from .balancer import Runtime, epoch_ceil
from .errors import LbxError
from .model import BackendId, HealthOverride
from .paths import Instance, atomic_write

T = TypeVar("T")

log = logging.getLogger(__name__)


class Unreadable(LbxError):
    """The applied state cannot be read back (damaged, or written by a version with a bug).
    Status and edits stop with this; an attach or reload with a config replaces it."""

    def __init__(self, inst: Instance, why: str):
        netns = f" --netns {inst.netns}" if inst.netns else ""
        super().__init__(f"lbxdp's record of what {inst.label} was last told is unreadable ({why})",
                         f"re-attach with a config to replace it: lbxdp{netns} attach {inst.ifname} --config FILE "
                         "(the maps and the connection table are kept)")


@dataclass
class State:
    cfg: model.Config = field(default_factory=model.Config)
    draining: dict[BackendId, float] = field(default_factory=dict)   # -> deadline (epoch seconds)
    joined: dict[BackendId, float] = field(default_factory=dict)     # -> when it joined its VIP
    health: dict[BackendId, dict] = field(default_factory=dict)      # -> {healthy, since, detail, latency, at}
    overrides: dict[BackendId, HealthOverride] = field(default_factory=dict)   # -> UP | DOWN

    def is_down(self, bid: BackendId) -> bool:
        """Forced down, or failed its check and not forced up."""
        forced = self.overrides.get(bid)
        return forced is HealthOverride.DOWN or (forced is not HealthOverride.UP
                                                 and self.health.get(bid, {}).get("healthy") is False)

    def down(self) -> set[BackendId]:
        return {k for k in self.cfg.backends() if self.is_down(k)}

    def runtime(self, now: float) -> Runtime:
        r = self.cfg.backends()
        return Runtime(frozenset(k for k in self.draining if k in r),
                       {k: t for k, t in self.joined.items() if k in r}, now, frozenset(self.down()))

    def moved_to(self, cfg: model.Config, now: float) -> "State":
        """The state for a new config: backends new to their VIP join at the next STEP boundary
        (balancer.epoch_ceil: the same instant on every node that got the config within the step);
        gone ones are forgotten. A backend whose check changed forgets its health (the new check
        decides)."""
        old, new = self.cfg.backends(), cfg.backends()
        join = epoch_ceil(now)
        joined = {k: self.joined.get(k, join) if k in old else join for k in new}
        checks = _checks(self.cfg)
        new_checks = _checks(cfg)
        health = {k: h for k, h in self.health.items() if k in new and checks.get(k) == new_checks.get(k)}
        return State(cfg, {k: d for k, d in self.draining.items() if k in new}, joined, health,
                     {k: o for k, o in self.overrides.items() if k in new})

    def expired_drains(self, now: float) -> list[BackendId]:
        return sorted((k for k, deadline in self.draining.items() if deadline <= now), key=str)

    def without(self, ids: list[BackendId]) -> model.Config:
        """The config with these backends removed from their VIPs."""
        gone = set(ids)
        vips = tuple(replace(v, backends=tuple(b for b in v.backends if v.id_of(b) not in gone))
                     for v in self.cfg.vips)
        return replace(self.cfg, vips=vips)


def _checks(cfg: model.Config) -> dict[BackendId, object]:
    return {k: v.check_of(b) for k, (v, b) in cfg.backends().items()}


def load(inst: Instance) -> State:
    """The instance's applied state (an empty one if nothing was applied yet); Unreadable if it
    cannot be read back."""
    cfg_file = inst.applied_file
    if not cfg_file.exists():
        # Attached but no record (the run directory was removed by hand, or a crash lost it):
        # an empty state here would make the next edit or health step remove every VIP.
        if inst.exists():
            raise Unreadable(inst, "it is missing, though the program is attached")
        return State()
    try:
        cfg = config.parse(cfg_file.read_text(), source="applied state")
    except (OSError, ValueError, LbxError) as e:   # ValueError: UnicodeDecodeError
        raise Unreadable(inst, _why(e)) from None
    return _with_runtime(inst, cfg)


def load_to_replace(inst: Instance) -> State:
    """The state a full config is about to replace (attach, reload): like load(), but an
    unreadable one is logged and replaced, never an obstacle. The maps (and so the connection
    table) are what the new config is diffed against; they are kept either way."""
    try:
        return load(inst)
    except Unreadable as e:
        log.warning("%s; replacing it with the new config (kept: the maps and the connection table; "
                    "slow starts and health verdicts start over)", e.message)
    try:
        return _with_runtime(inst, model.Config())
    except Unreadable:
        return State()


def load_runtime(inst: Instance) -> State:
    """Only runtime.json (drains, joins, health verdicts, overrides), with an empty config: what
    a metrics scrape needs, without parsing and validating applied.toml each time. An unreadable
    or missing file gives an empty state (a scrape shows the maps whatever the record says)."""
    try:
        return _with_runtime(inst, model.Config())
    except Unreadable:
        return State()


def _with_runtime(inst: Instance, cfg: model.Config) -> State:
    rt_file = inst.runtime_file
    try:
        rt = json.loads(rt_file.read_text()) if rt_file.exists() else {}
        return State(cfg, _by_id(rt.get("draining", {}), float), _by_id(rt.get("joined", {}), float),
                     _by_id(rt.get("health", {}), dict), _by_id(rt.get("overrides", {}), HealthOverride))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise Unreadable(inst, f"runtime.json: {_why(e)}") from None


def _by_id(d: dict[str, Any], conv: Callable[[Any], T]) -> dict[BackendId, T]:
    """A runtime.json table (backend key -> value) by BackendId. A key that names no backend
    (the file is only ever written from BackendIds) is skipped: no VIP could have it."""
    out = {}
    for k, v in dict(d).items():
        try:
            bid = BackendId.parse(k)
        except ValueError:
            log.debug("runtime.json: skipped %r, which names no backend", k)
            continue
        out[bid] = conv(v)
    return out


def _why(e: BaseException) -> str:
    text = e.message if isinstance(e, LbxError) else (getattr(e, "strerror", None) or str(e))
    return text.splitlines()[0] if text else type(e).__name__


def save(inst: Instance, st: State) -> None:
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(inst.applied_file, config.dump(st.cfg))
    runtime = {"draining": st.draining, "joined": st.joined, "health": st.health,
               "overrides": {k: o.value for k, o in st.overrides.items()}}
    atomic_write(inst.runtime_file, json.dumps({name: {k.key: v for k, v in table.items()}
                                                for name, table in runtime.items()}, indent=1))


@contextmanager
def locked(inst: Instance) -> Iterator[None]:
    """Exclusive right to change the instance (its maps and its applied state)."""
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(os.open(inst.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
