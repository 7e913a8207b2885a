"""What an instance was last told: the applied config and the runtime state beside it.

The maps say what the kernel does; this says why. `applied.toml` is the last config applied (by
attach, by a reload of the daemon, or edited by `lbxdp vip|backend ...`), in the config file's own
format; `runtime.json` holds what no config file says: backends being drained (with their
deadline), when each backend joined its VIP (for slow start), the health of each checked backend
(written by the daemon's checker) and manual health overrides (`lbxdp backend set-health`). Every change goes through
`locked()`, so the CLI and a running daemon never interleave their applies.
"""

from __future__ import annotations

import fcntl
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

from . import config, model
from .balancer import BackendRef, Runtime
from .errors import LbxError
from .paths import Instance

log = logging.getLogger(__name__)


class Unreadable(LbxError):
    """The applied state cannot be read back (damaged, or written by a version with a bug).
    Status and edits stop with this; an attach or reload with a config replaces it."""

    def __init__(self, inst: Instance, why: str):
        netns = f" --netns {inst.netns}" if inst.netns else ""
        super().__init__(f"lbxdp's record of what {inst.label} was last told is unreadable ({why})",
                         f"re-attach with a config to replace it: lbxdp{netns} attach {inst.ifname} --config FILE "
                         "(the maps and the connection table are kept)")


def ref_key(ref: BackendRef) -> str:
    vip, addr, port = ref
    return f"{vip.name}|{model.endpoint(addr, port)}"


def refs(cfg: model.Config) -> dict[str, BackendRef]:
    return {ref_key(r): r for r in ((v.key, b.address, b.port) for v in cfg.vips for b in v.backends)}


@dataclass
class State:
    cfg: model.Config = field(default_factory=model.Config)
    draining: dict[str, float] = field(default_factory=dict)   # ref key -> deadline (epoch seconds)
    joined: dict[str, float] = field(default_factory=dict)     # ref key -> when it joined its VIP
    health: dict[str, dict] = field(default_factory=dict)      # ref key -> {healthy, since, detail, latency, at}
    overrides: dict[str, str] = field(default_factory=dict)    # ref key -> "up" | "down"

    def is_down(self, key: str) -> bool:
        """Forced down, or failed its check and not forced up."""
        forced = self.overrides.get(key)
        return forced == "down" or (forced != "up" and self.health.get(key, {}).get("healthy") is False)

    def runtime(self, now: float) -> Runtime:
        r = refs(self.cfg)
        return Runtime(frozenset(r[k] for k in self.draining if k in r),
                       {r[k]: t for k, t in self.joined.items() if k in r}, now,
                       frozenset(ref for k, ref in r.items() if self.is_down(k)))

    def moved_to(self, cfg: model.Config, now: float) -> "State":
        """The state for a new config: backends new to their VIP join now; gone ones are forgotten.
        A backend whose check changed forgets its health (the new check decides)."""
        old, new = refs(self.cfg), refs(cfg)
        joined = {k: self.joined.get(k, now) if k in old else now for k in new}
        checks = _checks(self.cfg)
        new_checks = _checks(cfg)
        health = {k: h for k, h in self.health.items() if k in new and checks.get(k) == new_checks.get(k)}
        return State(cfg, {k: d for k, d in self.draining.items() if k in new}, joined, health,
                     {k: o for k, o in self.overrides.items() if k in new})

    def expired_drains(self, now: float) -> list[str]:
        return sorted(k for k, deadline in self.draining.items() if deadline <= now)

    def without(self, keys: list[str]) -> model.Config:
        """The config with these backends removed from their VIPs."""
        gone = set(keys)
        vips = []
        for v in self.cfg.vips:
            bes = tuple(b for b in v.backends if ref_key((v.key, b.address, b.port)) not in gone)
            vips.append(replace(v, backends=bes))
        return model.Config(tuple(vips), self.cfg.metrics_listen)


def _checks(cfg: model.Config) -> dict[str, object]:
    return {ref_key((v.key, b.address, b.port)): v.check_of(b) for v in cfg.vips for b in v.backends}


def load(inst: Instance) -> State:
    """The instance's applied state (an empty one if nothing was applied yet); Unreadable if it
    cannot be read back."""
    cfg_file = inst.run_dir / "applied.toml"
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


def _with_runtime(inst: Instance, cfg: model.Config) -> State:
    rt_file = inst.run_dir / "runtime.json"
    try:
        rt = json.loads(rt_file.read_text()) if rt_file.exists() else {}
        return State(cfg, dict(rt.get("draining", {})), dict(rt.get("joined", {})), dict(rt.get("health", {})),
                     dict(rt.get("overrides", {})))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise Unreadable(inst, f"runtime.json: {_why(e)}") from None


def _why(e: BaseException) -> str:
    text = e.message if isinstance(e, LbxError) else (getattr(e, "strerror", None) or str(e))
    return text.splitlines()[0] if text else type(e).__name__


def save(inst: Instance, st: State) -> None:
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, text in (("applied.toml", config.dump(st.cfg)),
                       ("runtime.json", json.dumps({"draining": st.draining, "joined": st.joined, "health": st.health,
                                                "overrides": st.overrides}, indent=1))):
        tmp = inst.run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(inst.run_dir / name)


@contextmanager
def locked(inst: Instance) -> Iterator[None]:
    """Exclusive right to change the instance (its maps and its applied state)."""
    inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(inst.run_dir / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
