"""`lbxdp run`: the daemon. Foreground, logs to stderr, one instance (interface) per process.

It is a small supervisor of services (Service below), each with start/on_change/tick/stop, over
one state layer: what the instance was told (lbxdp.applied; every change, whoever makes it,
reaches each service's on_change). The services: MetricsService (/metrics: the exporter's
families and the daemon's own), HealthService (the checker's transitions applied to the maps,
checks.json), OwnMacService (follows the interface's MAC), RuntimeService (finishes drains,
steps slow starts) and RunDirService (puts back a deleted run directory); the BGP announcer and
the reweighters (issues 13, 14) are services too. The supervisor runs each service's tick as a
named step: an error is logged (`step-failed`, once a minute while it repeats; `step-recovered`
when it passes again) and never detaches.

Life of a daemon:
  start    refuse if another daemon runs for the instance; read and validate the config and
           bind the metrics port (a bad file or an unusable port stops it here, before anything
           changes); attach, which adopts the pinned maps of an earlier run (or of `lbxdp
           attach`) and replaces the program atomically;
  loop     SIGHUP (or `lbxdp reload`): re-read the file and apply it as a minimal diff; a bad
           file, or any error while applying it, is logged (`reload-failed`) and the running
           config stays. Health checks (lbxdp.health, in their own thread) report transitions,
           which are applied at once. Once a second: put back the run directory if it was
           deleted, finish drains past their deadline, step slow starts, follow edits made with
           `lbxdp vip|backend ...`; a step that fails is logged and the loop goes on;
  SIGTERM  (or SIGINT) detach and remove the pins, unless --keep-attached. Anything else that
           ends the daemon (a crash, SIGKILL) leaves the program attached and forwarding, with its
           pins (one `left-attached` line says so); the next `lbxdp run` adopts it without losing
           a flow, and `lbxdp detach` removes it.
Every state change is one log line, `lbxdp[pid]: <event> key=value ...` (logfmt: a value with
spaces is double-quoted).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from . import abi, applied, config, control, etcdsrc, model, probe
from .errors import LbxError
from .model import BackendId, XdpMode
from .paths import Instance, atomic_write, private_dirs
from .sched import ConnRecountService

log = logging.getLogger("lbxdp.daemon")
TICK = 1.0
TICK_LAG = 0.01   # a tick comes this long after a wall-clock STEP boundary (balancer.STEP)


def until_next_tick(now: float) -> float:
    """Seconds until the next tick: just after the next wall-clock boundary of TICK (= balancer.
    STEP) seconds, so that every node steps its slow starts and ends its drains together (issue
    14), whenever it was started. A wake-up (a signal, a health transition, a new config from
    etcd) runs the loop at once anyway."""
    return TICK - now % TICK + TICK_LAG


def _logfmt(v: Any) -> str:
    """A logfmt value: bare if it has no space, quote or '=', else double-quoted with escapes."""
    s = str(v)
    if s and not any(c in s for c in ' "=\\') and s.isprintable():
        return s
    return json.dumps(s)


def _event(name: str, **kv: Any) -> None:
    log.info("%s %s", name, " ".join(f"{k}={_logfmt(v)}" for k, v in kv.items()))


def _warn(cfg: model.Config) -> None:
    """Valid but probably not meant (config.warnings): one config-warning event each."""
    for w in config.warnings(cfg):
        _event("config-warning", warning=w)


def _log_to_stderr() -> None:
    """One line per event on stderr, `lbxdp[pid]: event key=value ...` (journald adds the time)."""
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("lbxdp[%(process)d]: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _start_time(pid: int) -> str | None:
    """The process's start time (to tell it from a later process with the same pid), or None if
    there is no live process: a zombie (killed, not yet reaped) counts as gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def running_pid(inst: Instance) -> int | None:
    """The pid of the live daemon of this instance, if any (checked against its start time)."""
    try:
        pid_s, started = inst.pid_file.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == started else None


def signal_daemon(inst: Instance, sig: int = signal.SIGHUP) -> int:
    pid = running_pid(inst)
    if pid is None:
        raise LbxError(f"no `lbxdp run` daemon is running for {inst.label}",
                       f"start one: lbxdp run --config FILE {inst.ifname} (or apply with `lbxdp attach`)")
    os.kill(pid, sig)
    return pid


class Service(Protocol):
    """One job of the daemon. start(state) once the program is attached; on_change(state) when
    what the instance was told changed (a reload, an edit, a health transition, a step); tick()
    once a loop (about once a second); stop() when the daemon ends, however it ends. A service
    that fails in tick() is logged by the supervisor under its `name` and ticked again."""

    name: str

    def start(self, state: applied.State) -> None: ...

    def on_change(self, state: applied.State) -> None: ...

    def tick(self) -> None: ...

    def stop(self) -> None: ...


class BaseService:
    """A Service that does nothing at any stage: services override what they need."""

    name = "service"

    def start(self, state: applied.State) -> None:
        pass

    def on_change(self, state: applied.State) -> None:
        pass

    def tick(self) -> None:
        pass

    def stop(self) -> None:
        pass


class MetricsService(BaseService):
    """/metrics: the exporter's families (lbxdp.exporter over this instance: counters, backend
    health from checks.json) plus the daemon's own process metrics (reloads, apply and check
    durations), which exist only here. The port is bound by bind(), before the attach."""

    name = "metrics"

    def __init__(self, inst: Instance, listen: str | None, option: str):
        self.inst, self.listen, self.option = inst, listen, option
        self.m: dict[str, Any] = {}
        self._server: Any = None

    def register(self, reg: Any) -> dict[str, Any]:
        """The daemon's own metrics, registered on reg."""
        from prometheus_client import Counter, Histogram
        m = {
            "reloads": Counter("lbxdp_config_reloads_total", "Config reloads by result (ok or error).",
                               ["interface", "result"], registry=reg),
            "apply": Histogram("lbxdp_apply_seconds", "Time to apply a config, a health transition or a runtime "
                               "step to the maps (table builds and switches included).", ["interface"], registry=reg,
                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)),
            "check": Histogram("lbxdp_health_check_seconds", "Time a health check took to reach its verdict.",
                               ["interface", "vip", "backend", "result"], registry=reg,
                               buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)),
        }
        m |= {
            "gc_removed": Counter("lbxdp_nat_gc_removed_total", "NAT conntrack entries past their state's timeout "
                                  "removed by the daemon's GC, by the state they were in.", ["interface", "state"],
                                  registry=reg),
            "gc_scanned": Counter("lbxdp_nat_gc_scanned_total", "NAT conntrack entries read by the daemon's GC.",
                                  ["interface"], registry=reg),
            "gc_seconds": Counter("lbxdp_nat_gc_seconds_total", "Time the daemon's NAT GC took (bounded per tick).",
                                  ["interface"], registry=reg),
            "suspects": Counter("lbxdp_passive_suspects_total", "Times a NAT backend was suspected by passive "
                                "health ([vip.passive_health] failures in a row) and actively checked.",
                                ["interface", "vip", "backend"], registry=reg),
            "ejections": Counter("lbxdp_passive_ejections_total", "Times a NAT backend was marked down by passive "
                                 "health (suspected, then failed its confirmation check).",
                                 ["interface", "vip", "backend"], registry=reg),
            "capped": Counter("lbxdp_passive_ejections_capped_total", "Confirmed passive-health failures left up "
                              "because the VIP was at its max_ejected cap.", ["interface", "vip", "backend"],
                              registry=reg),
        }
        for state in ("syn_sent", "established", "closing", "udp"):
            m["gc_removed"].labels(self.inst.ifname, state)
        m["gc_scanned"].labels(self.inst.ifname)
        m["gc_seconds"].labels(self.inst.ifname)
        # Series exist from the start (at 0), so that rate() and increase() have data at once.
        for result in ("ok", "error"):
            m["reloads"].labels(self.inst.ifname, result)
        m["apply"].labels(self.inst.ifname)
        self.m = m
        return m

    def bind(self) -> None:
        if not self.listen:
            return
        from prometheus_client import start_http_server
        from prometheus_client.process_collector import ProcessCollector

        from .exporter import PinnedMaps, make_registry, parse_listen
        reg = make_registry(PinnedMaps(self.inst.netns, [self.inst.ifname]))
        ProcessCollector(registry=reg)
        self.register(reg)
        addr, port = parse_listen(self.listen, self.option)
        try:
            self._server = start_http_server(port, addr, registry=reg)
        except (OSError, ValueError, OverflowError) as e:
            raise LbxError(f"cannot serve metrics on {self.listen}: {getattr(e, 'strerror', None) or e}",
                           "pick another --metrics ADDRESS:PORT (or [metrics] listen)") from e
        _event("metrics", listen=self.listen)

    def observe_apply(self, seconds: float) -> None:
        if self.m:
            self.m["apply"].labels(self.inst.ifname).observe(seconds)

    def count_reload(self, result: str) -> None:
        if self.m:
            self.m["reloads"].labels(self.inst.ifname, result).inc()

    def count_gc(self, removed: dict[str, int], scanned: int, seconds: float) -> None:
        if self.m:
            for state, n in removed.items():
                self.m["gc_removed"].labels(self.inst.ifname, state).inc(n)
            self.m["gc_scanned"].labels(self.inst.ifname).inc(scanned)
            self.m["gc_seconds"].labels(self.inst.ifname).inc(seconds)

    def count_passive(self, what: str, bid: BackendId) -> None:
        """what: suspects, ejections or capped."""
        if self.m:
            self.m[what].labels(self.inst.ifname, bid.vip.name, bid.name).inc()

    def observe_check(self, bid: BackendId, result: Any) -> None:   # checker thread
        if self.m:
            self.m["check"].labels(self.inst.ifname, bid.vip.name, bid.name,
                                   "ok" if result.ok else "fail").observe(result.latency)

    def stop(self) -> None:
        if self._server is not None:
            self._server[0].shutdown()


def timed(metrics: MetricsService, fn: Callable[[], Any]) -> Any:
    """fn(), its duration observed as an apply."""
    t = time.monotonic()
    out = fn()
    metrics.observe_apply(time.monotonic() - t)
    return out


def log_diff(diff: Any) -> None:
    for line in diff.lines:
        _event("change", what=line)


class HealthService(BaseService):
    """The health checker (lbxdp.health, its own thread): its targets follow what the instance
    was told; its transitions are applied to the maps at once (backend-up / backend-down logged
    when the maps say so) and its last results written to checks.json, for `lbxdp status` and
    the exporter's lbxdp_backend_healthy."""

    name = "health"

    def __init__(self, inst: Instance, metrics: MetricsService, wake: threading.Event):
        self.inst, self.metrics, self.wake = inst, metrics, wake
        self.checker: Any = None
        self._events: queue.Queue[tuple[BackendId, bool, Any]] = queue.Queue()

    def _on_change(self, bid: BackendId, healthy: bool, result: Any) -> None:   # checker thread
        self._events.put((bid, healthy, result))
        self.wake.set()

    def start(self, state: applied.State) -> None:
        from .health import Checker
        # A new checker starts every backend healthy (as HAProxy does): forget what an earlier
        # daemon last saw, so the maps and the checker agree from the first transition on.
        control.health_changed(self.inst, None)
        self.checker = Checker(self._on_change, on_result=self.metrics.observe_check)
        self.checker.start()

    def on_change(self, state: applied.State) -> None:
        from .health import Target
        from .passive import IMPLICIT_CHECK   # a passive-health backend without a check gets a tcp one
        if self.checker is None:
            return
        ids = self._tunnel_ids(state)
        if ids and not probe.attached(self.inst.ifname):
            probe.attach(self.inst)
            _event("probe-attached", interface=self.inst.label, backends=len(ids))
        targets = []
        for bid, (v, b) in state.cfg.backends().items():
            if (check := v.check_of(b) or (IMPLICIT_CHECK if v.passive_health else None)) is None:
                continue
            if bid in ids:   # the VIP's service on the backend, through the tunnel (lbxdp.probe)
                targets.append(Target(bid, str(v.address), check.port or v.port, check, mark=probe.mark(ids[bid])))
            else:
                targets.append(Target(bid, str(b.address), check.port or b.port, check))
        self.checker.set_targets(targets)

    def _tunnel_ids(self, state: applied.State) -> dict[BackendId, int]:
        """Backend entry id of every checked ipip/gue backend probed through the tunnel."""
        from .health import Via
        want = {bid: (v, b) for bid, (v, b) in state.cfg.backends().items()
                if v.mode.encap and (c := v.check_of(b)) is not None and c.via is not Via.DIRECT}
        if not want:
            return {}
        with control.open_maps(self.inst) as m:
            vip_ids = {k: meta.id for k, meta in m.vips().items()}
            entries = {(e.vip_id, e.address, e.port): i for i, e in m.backends().items()}
        return {bid: i for bid, (v, b) in want.items()
                if (i := entries.get((vip_ids.get(v.key), b.address, b.port))) is not None}

    def tick(self) -> None:
        """Apply the transitions reported since the last tick, then rewrite checks.json."""
        changes: dict[BackendId, dict[str, Any]] = {}
        while True:
            try:
                bid, healthy, r = self._events.get_nowait()
            except queue.Empty:
                break
            changes[bid] = {"healthy": healthy, "since": r.at, "detail": r.detail, "latency": r.latency}
        if not changes:
            self.write_checks()
            return
        diff = timed(self.metrics, lambda: control.health_changed(self.inst, changes))
        self.write_checks()
        # Logged once applied: when the line appears, the maps and checks.json already say so.
        for bid, c in changes.items():
            _event("backend-up" if c["healthy"] else "backend-down", vip=bid.vip.name, backend=bid.name,
                   check=c["detail"], latency=f"{c['latency']:.4f}", **({} if c["healthy"] else {"cause": "active"}))
        log_diff(diff)

    def write_checks(self) -> None:
        """Last result of every check (atomically replaced once a second and on transitions)."""
        if self.checker is None:
            return
        data = {k.key: {"healthy": s.healthy, "since": s.since, "checks": s.checks,
                        "last": s.last.detail if s.last else None, "ok": s.last.ok if s.last else None,
                        "latency": s.last.latency if s.last else None, "at": s.last.at if s.last else None}
                for k, s in self.checker.states().items()}
        atomic_write(self.inst.checks_file, json.dumps(data))

    def stop(self) -> None:
        if self.checker is not None:
            self.checker.stop()


class OwnMacService(BaseService):
    """The program forwards only frames to the interface's MAC: follow a change of it."""

    name = "own-mac"

    def __init__(self, inst: Instance):
        self.inst = inst

    def tick(self) -> None:
        try:
            moved = control.sync_own_mac(self.inst)
            if moved:
                _event("own-mac-changed", old=moved[0] or "none", new=moved[1])
        except LbxError as e:
            _event("own-mac-check-failed", error=e.message)


class NextHopService(BaseService):
    """ipip/gue backends' next hops (gateway or neighbour MACs), the interface's MTU and own
    addresses, kept fresh (control.refresh_next_hops: a write only when something moved)."""

    name = "next-hops"

    def __init__(self, inst: Instance):
        self.inst = inst

    def tick(self) -> None:
        diff = control.refresh_next_hops(self.inst)
        if diff is not None and not diff.empty:
            _event("next-hops-changed", changes=len(diff.lines))
            log_diff(diff)


class NatGcService(BaseService):
    """NAT conntrack GC (lbxdp.conntrack.Gc): deletes lbx_nat entries past their state's timeout
    (the program already treats them as absent), one batch of at most conntrack.CHUNK entries
    per tick, so a closed connection's entries and SNAT port are gone within its close timeout
    plus one pass (capacity / CHUNK ticks: 8 s for a full table, 1 s for a small one). It also
    counts, for passive health, handshakes still in SYN_SENT past their VIP's `timeout`.
    Idle (no walk) without NAT VIPs."""

    name = "nat-gc"

    def __init__(self, inst: Instance, metrics: MetricsService):
        from .conntrack import Gc
        self.inst, self.metrics = inst, metrics
        self.gc = Gc()
        self.timeouts: dict[int, int] = {}     # backend entry id -> handshakes timed out, ever (passive health)
        self.active = False

    def on_change(self, state: applied.State) -> None:
        self.active = any(v.mode is model.Mode.NAT for v in state.cfg.vips)
        if not self.active:
            self.gc.close()

    def tick(self) -> None:
        if not self.active:
            return
        t = time.monotonic()
        r = self.gc.tick(self._open)
        for be, n in r.syn_timeouts.items():
            self.timeouts[be] = self.timeouts.get(be, 0) + n
        self.metrics.count_gc(r.removed, r.scanned, time.monotonic() - t)

    def _open(self) -> Any:
        from . import loader
        from .maps import Maps
        return Maps(loader.open_pinned_maps(self.inst))   # kept for a pass; Gc.close() closes it

    def stop(self) -> None:
        self.gc.close()


class PassiveHealthService(BaseService):
    """Passive health of VIPs with [vip.passive_health] (lbxdp.passive has the rules; NAT, and
    since issue 13 dsr/ipip/gue TCP VIPs, whose SYN retransmissions, pending handshakes and
    handshake ACKs bpf/select.h counts in the same lbx_nat_be entries):
    every PASSIVE_POLL (a thread of its own, which reads a few lbx_nat_be entries and nothing
    more while nobody is suspect), read lbx_nat_be of their backends; a backend past `failures`
    failed handshakes in a row is suspected (backend-suspect) and gets one immediate TCP check of
    its service port (the checker's loop; connect timeout: the smaller of its check's and the
    passive `timeout`); its result wakes the daemon's loop, whose tick settles it: a pass clears
    it (backend-suspect-cleared; no new suspicion for QUIET_AFTER_CLEAR), a failure marks it down
    (backend-down cause=passive: the applied state's health, and the checker's state, so its
    `rise` brings it back) unless the VIP is at its max_ejected cap (ejection-capped). Either way
    its count starts over."""

    name = "passive-health"
    PASSIVE_POLL = 0.1           # seconds between reads of lbx_nat_be
    QUIET_AFTER_CLEAR = 1.0      # seconds before a backend whose check passed may be suspected again

    def __init__(self, inst: Instance, metrics: MetricsService, health: HealthService, gc: NatGcService,
                 wake: threading.Event):
        from .passive import Tracker
        self.inst, self.metrics, self.health, self.gc, self.wake = inst, metrics, health, gc, wake
        self.tracker = Tracker()
        self.state: applied.State | None = None
        self.entries: dict[BackendId, int] = {}          # passive-health backends -> entry id
        self.confirming: dict[BackendId, tuple[Any, Any]] = {}   # -> (future, Failures)
        self._lock = threading.RLock()                   # all of the above, the poller's and the loop's
        self._maps: Any = None                           # lbx_nat_be's reader, kept while there are entries
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_error: str | None = None

    def _passive(self, state: applied.State) -> dict[BackendId, tuple[model.Vip, model.Backend]]:
        return {bid: (v, b) for bid, (v, b) in state.cfg.backends().items()
                if v.passive_health is not None}     # nat, and dsr/ipip/gue TCP VIPs (issue 13: bpf/select.h)

    def on_change(self, state: applied.State) -> None:
        with self._lock:
            self._on_change(state)
            # The baselines now, not at the poller's first read: a backend's failures count from
            # the moment its VIP is applied (before `attached` or the reload's `change` lines),
            # so that handshakes failing in the poller's first 0.1 s are not taken as its baseline.
            self.poll()
        if self.entries and self._thread is None:
            self._thread = threading.Thread(target=self._poller, name="lbxdp-passive", daemon=True)
            self._thread.start()

    def _on_change(self, state: applied.State) -> None:
        self.state = state
        want = self._passive(state)
        self.tracker.failures = {bid: v.passive_health.failures for bid, (v, _) in want.items()}  # type: ignore[union-attr]
        self.tracker.timeout = {bid: v.passive_health.timeout for bid, (v, _) in want.items()  # type: ignore[union-attr]
                                if v.mode is not model.Mode.NAT}
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        if not want:
            self.entries, self.gc.gc.syn_timeout = {}, {}
            return
        with control.open_maps(self.inst) as m:
            vip_ids = {k: meta.id for k, meta in m.vips().items()}
            have = {(e.vip_id, e.address, e.port): i for i, e in m.backends().items()}
        self.entries = {bid: i for bid, (v, b) in want.items()
                        if (i := have.get((vip_ids.get(v.key), b.address, b.port))) is not None}
        unit = 1e9 / (1 << abi.NAT_TIME_SHIFT)
        self.gc.gc.syn_timeout = {i: int(want[bid][0].passive_health.timeout * unit)   # type: ignore[union-attr]
                                  for bid, i in self.entries.items() if want[bid][0].mode is model.Mode.NAT}

    def _signals(self) -> dict[BackendId, Any]:
        from . import loader
        from .maps import Maps
        from .passive import Signals
        if self._maps is None:
            self._maps = Maps(loader.open_pinned_maps(self.inst))
        out = {}
        for bid, i in self.entries.items():
            s = self._maps.nat_backend(i)
            out[bid] = Signals(s.consecutive, s.syn_rst, s.syn_retx, s.synack, self.gc.timeouts.get(i, 0),
                               s.pending, s.pending_since)
        return out

    def _poller(self) -> None:
        """The fast half: suspect and start confirmations between the loop's ticks."""
        while not self._stopping.wait(self.PASSIVE_POLL):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - logged once per distinct error; the loop's tick goes on
                error = e.message if isinstance(e, LbxError) else f"{type(e).__name__}: {e}"
                if error != self._poll_error:
                    _event("step-failed", step="passive-poll", error=error, type=type(e).__name__)
                self._poll_error = error
            else:
                if self._poll_error is not None:
                    _event("step-recovered", step="passive-poll")
                self._poll_error = None

    def poll(self) -> dict[BackendId, Any] | None:
        """Read the signals, start a confirmation for each newly suspected backend; the signals."""
        with self._lock:
            if not self.entries or self.state is None or self.health.checker is None:
                return None
            st = self.state
            signals = self._signals()
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)   # the data path's clock (coarse: <= a tick behind)
            for bid, f in self.tracker.observe(signals, exempt=st.down(), now_ns=now).items():
                v, b = st.cfg.backends()[bid]
                self._confirm(bid, v, b, f)
            return signals

    def tick(self) -> None:
        with self._lock:
            signals = self.poll()
            if signals is not None:
                self._settle(signals)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            if self._maps is not None:
                self._maps.close()
                self._maps = None

    def _confirm(self, bid: BackendId, v: model.Vip, b: model.Backend, f: Any) -> None:
        from .health import CheckType, HealthCheck, Target
        check = v.check_of(b)
        timeout = min(check.timeout if check else 1.0, v.passive_health.timeout)  # type: ignore[union-attr]
        t = Target(("confirm", bid), str(b.address), b.port, HealthCheck(CheckType.TCP, timeout=timeout))
        fut = self.health.checker.probe_now(t)
        fut.add_done_callback(lambda _: self.wake.set())
        self.confirming[bid] = (fut, f)
        self.metrics.count_passive("suspects", bid)
        _event("backend-suspect", vip=bid.vip.name, backend=bid.name, failures=f.total, rst=f.rst, retx=f.retx,
               timeout=f.timeout, unfinished=f.unfinished, confirming=f"tcp {b.name}")

    def _settle(self, signals: dict[BackendId, Any]) -> None:
        from .passive import decide
        st = self.state
        assert st is not None
        done = {bid: c for bid, c in self.confirming.items() if c[0].done()}
        confirmed, results = [], {}
        for bid, (fut, f) in done.items():
            del self.confirming[bid]
            if bid not in self.entries:
                continue
            r = fut.result()
            if r.ok:
                quiet = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(self.QUIET_AFTER_CLEAR * 1e9)
                self.tracker.settle(bid, signals[bid], quiet)
                _event("backend-suspect-cleared", vip=bid.vip.name, backend=bid.name, check=r.detail,
                       latency=f"{r.latency:.4f}")
            else:
                confirmed.append((bid.vip, bid, f.total))
                results[bid] = (r, f)
        if not confirmed:
            return
        cfg_vips = {v.key: v for v in st.cfg.vips}
        passive_down = self.passive_down(st)
        verdict = decide(confirmed, {k: len(v.backends) for k, v in cfg_vips.items()},
                         {k: len(d) for k, d in passive_down.items()},
                         {k: v.passive_health.max_ejected for k, v in cfg_vips.items() if v.passive_health})
        changes = {}
        for bid in verdict.eject:
            r, f = results[bid]
            changes[bid] = {"healthy": False, "since": r.at, "detail": f"passive: {f.text()}; confirmed: {r.detail}",
                            "latency": r.latency, "cause": "passive"}
        if changes:
            diff = timed(self.metrics, lambda: control.health_changed(self.inst, changes))
            for bid, c in changes.items():
                self.health.checker.mark_down(bid, results[bid][0])
                self.tracker.settle(bid, signals[bid])
                self.metrics.count_passive("ejections", bid)
                _event("backend-down", vip=bid.vip.name, backend=bid.name, cause="passive",
                       failures=results[bid][1].total, check=results[bid][0].detail)
            log_diff(diff)
            self.health.write_checks()
        for bid in verdict.capped:
            v = cfg_vips[bid.vip]
            self.tracker.settle(bid, signals[bid])
            self.metrics.count_passive("capped", bid)
            _event("ejection-capped", vip=bid.vip.name, backend=bid.name, failures=results[bid][1].total,
                   down=len(passive_down.get(bid.vip, ())) + sum(1 for e in verdict.eject if e.vip == bid.vip),
                   backends=len(v.backends), max_ejected=v.passive_health.max_ejected)  # type: ignore[union-attr]

    @staticmethod
    def passive_down(st: applied.State) -> dict[model.VipKey, set[BackendId]]:
        """The backends down for passive health now, by VIP (from the applied state's health)."""
        out: dict[model.VipKey, set[BackendId]] = {}
        for bid, h in st.health.items():
            if h.get("cause") == "passive" and h.get("healthy") is False and bid in st.down():
                out.setdefault(bid.vip, set()).add(bid)
        return out


class RuntimeService(BaseService):
    """Finishes drains past their deadline and steps slow starts (only when there is something
    to do: a tick with nothing to finish or ramp reads the applied state and stops there)."""

    name = "tick"

    def __init__(self, inst: Instance, metrics: MetricsService):
        self.inst, self.metrics = inst, metrics

    def tick(self) -> None:
        now = time.time()
        st = applied.load(self.inst)
        rt = st.runtime(now)
        if not st.expired_drains(now) and not any(rt.ramping(v) for v in st.cfg.vips):
            return
        try:
            diff = timed(self.metrics, lambda: control.apply(self.inst, None, now))
        except LbxError as e:
            _event("step-failed", error=e.message)
            return
        log_diff(diff)


class RunDirService(BaseService):
    """Puts back what a deleted run directory held: the schema (or no command could read the
    maps), the pid file (or `lbxdp reload` would not find us) and the applied state (or the
    next change would start from an empty config and remove every VIP)."""

    name = "run-dir"

    def __init__(self, inst: Instance, write_pid: Callable[[], None], restored: Callable[[], None]):
        self.inst, self.write_pid, self.restored = inst, write_pid, restored
        self._kept: dict[Path, str] = {}              # file -> text: what only attach writes
        self._last: applied.State | None = None

    def start(self, state: applied.State) -> None:
        for f in (self.inst.schema_file, self.inst.state_file):
            self._kept[f] = f.read_text()

    def on_change(self, state: applied.State) -> None:
        self._last = state

    def tick(self) -> None:
        inst = self.inst
        missing = [f for f in (inst.schema_file, inst.state_file, inst.pid_file, inst.applied_file) if not f.exists()]
        if not missing:
            return
        private_dirs(inst, create=True)
        with applied.locked(inst):
            for f, text in self._kept.items():
                if not f.exists():
                    atomic_write(f, text)
            if not inst.applied_file.exists() and self._last is not None:
                applied.save(inst, self._last)
        if not inst.pid_file.exists():
            self.write_pid()
        self.restored()
        _event("run-dir-restored", dir=inst.run_dir, files=",".join(f.name for f in missing))


class Daemon:
    """The supervisor: starts the services, runs the loop, ends them (see the module's docstring)."""

    def __init__(self, inst: Instance, config_path: str, mode: XdpMode = XdpMode.AUTO, metrics: str | None = None,
                 keep_attached: bool = False, allow_empty: bool = False, node_name: str | None = None):
        self.inst, self.config_path, self.mode = inst, config_path, mode
        self.allow_empty = allow_empty   # a config without VIPs may remove all (start and reloads)
        self.metrics_arg, self.keep_attached = metrics, keep_attached
        self._wake = threading.Event()
        self._hup = self._term = False
        self._told_mtime = -1.0
        self._failing: dict[str, tuple[str, float]] = {}  # step -> (error, when last logged)
        self.metrics = MetricsService(inst, metrics, "--metrics" if metrics else "[metrics] listen")
        self.health = HealthService(inst, self.metrics, self._wake)
        self.run_dir = RunDirService(inst, self._write_pid, self._reread)
        self.nat_gc = NatGcService(inst, self.metrics)
        self.passive = PassiveHealthService(inst, self.metrics, self.health, self.nat_gc, self._wake)
        self.recount = ConnRecountService(inst)   # leastconn / max_conns counts (lbxdp.sched)
        # In tick order; a reload (SIGHUP) comes before them, the state hand-over after.
        self.services: list[Service] = [self.run_dir, self.health, OwnMacService(inst), NextHopService(inst),
                                        RuntimeService(inst, self.metrics), self.nat_gc, self.passive, self.recount,
                                        self.metrics]
        from .bgp import BgpService   # [bgp]: announces the usable VIPs through BIRD (issue 14)
        self.bgp = BgpService(inst)
        self.services.insert(self.services.index(self.metrics), self.bgp)
        self._started: list[Service] = []
        self.etcd: Any = None   # config_path an etcd:// URL: the source of every config (lbxdp.etcdsrc)
        if etcdsrc.is_url(config_path):
            url = etcdsrc.EtcdUrl.parse(config_path)
            self.etcd = etcdsrc.EtcdService(inst, url, node_name or etcdsrc.default_node_name(inst), self._wake,
                                            self._apply_from_source, self._announcements)
            self.services.insert(1, self.etcd)

    # --- signals -------------------------------------------------------------------------------
    def _on_hup(self, *_: Any) -> None:
        self._hup = True
        self._wake.set()

    def _on_term(self, *_: Any) -> None:
        self._term = True
        self._wake.set()

    # --- the life ------------------------------------------------------------------------------
    def run(self) -> None:
        _log_to_stderr()
        other = running_pid(self.inst)
        if other is not None and other != os.getpid():
            raise LbxError(f"a daemon already runs for {self.inst.label} (pid {other})",
                           "stop it first, or send it `lbxdp reload`")
        cfg = config.load(self.config_path) if self.etcd is None else self.etcd.initial()[1]
        _warn(cfg)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        clean = False
        try:
            private_dirs(self.inst)
            # The port first: one that cannot be used stops the start before anything changes
            # (an attached program, adopted or not, keeps forwarding untouched).
            self.metrics.listen = self.metrics_arg or cfg.metrics_listen
            self._started.append(self.metrics)
            self.metrics.bind()
            t = time.monotonic()
            res = control.attach(self.inst, cfg, self.mode, allow_empty=self.allow_empty,
                                 config_path=os.path.abspath(self.config_path) if self.etcd is None else self.config_path)
            attach_seconds = time.monotonic() - t
            self.metrics.observe_apply(attach_seconds)
            self._write_pid()
            self._start_services()
            _event("attached", interface=self.inst.label, mode=res.mode, prog_id=res.prog_id,
                   adopted=res.upgraded, changes=len(res.diff.lines), seconds=f"{attach_seconds:.3f}",
                   **({"recreated": ",".join(res.recreated)} if res.recreated else {}))
            self._loop()
            clean = True
        except LbxError as e:
            self._left_attached(e)
            raise
        except Exception as e:
            self._left_attached(e)
            logging.getLogger("lbxdp").debug("the daemon's traceback", exc_info=True)   # -vv shows it
            raise LbxError(f"the daemon stopped on an unexpected error: {type(e).__name__}: {e}",
                           "the program stays attached and forwarding; `lbxdp run` adopts it again "
                           f"(`lbxdp detach {self.inst.ifname}` removes it); run with -vv for the traceback") from e
        finally:
            for svc in reversed(self._started):
                svc.stop()
            if clean:
                self._stop()
            else:
                _unlink(self.inst.pid_file)

    def _start_services(self) -> None:
        """Start every service on what the instance was told, then hand them the state."""
        st = applied.load(self.inst)
        for svc in self.services:
            if svc is not self.metrics:
                self._started.append(svc)
                svc.start(st)
        self._step("state", self._sync_state)

    def _reread(self) -> None:
        self._told_mtime = -1.0

    def _sync_state(self) -> None:
        """Hand what the instance was last told to every service, when it changed (whoever
        changed it: a reload, `lbxdp vip|backend ...`, a health transition, a step)."""
        try:
            mtime = self.inst.applied_file.stat().st_mtime
        except OSError:
            return
        if mtime == self._told_mtime:
            return
        st = applied.load(self.inst)
        self._told_mtime = mtime
        for svc in self._started:
            svc.on_change(st)

    def _left_attached(self, e: BaseException) -> None:
        """One line when the daemon ends on an error: what it leaves in place (never a detach)."""
        error = e.message if isinstance(e, LbxError) else f"{type(e).__name__}: {e}"
        try:
            attached = self.inst.exists()
        except OSError:
            attached = False
        if attached:
            _event("left-attached", interface=self.inst.label, pins=self.inst.pin_dir, error=error,
                   hint=f"it keeps forwarding; lbxdp run adopts it, lbxdp detach {self.inst.ifname} removes it")
        else:
            _event("start-failed", interface=self.inst.label, error=error, attached="no (nothing was changed)")

    def _loop(self) -> None:
        while not self._term:
            self._wake.wait(until_next_tick(time.time()))
            self._wake.clear()
            if self._term:
                break
            if self._hup:
                self._hup = False
                self.reload()
            for svc in self.services:
                self._step(svc.name, svc.tick)
            self._step("state", self._sync_state)

    def _step(self, name: str, fn: Any) -> None:
        """Run one step of the loop; an error is logged (once, then once a minute while it
        repeats) and the loop goes on: the data path does not depend on the daemon."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - whatever it is, the program keeps forwarding
            error = e.message if isinstance(e, LbxError) else f"{type(e).__name__}: {e}"
            last = self._failing.get(name)
            if last is None or last[0] != error or time.monotonic() - last[1] > 60:
                _event("step-failed", step=name, error=error, type=type(e).__name__)
                self._failing[name] = (error, time.monotonic())
            return
        if self._failing.pop(name, None) is not None:
            _event("step-recovered", step=name)

    def _write_pid(self) -> None:
        atomic_write(self.inst.pid_file, f"{os.getpid()} {_start_time(os.getpid())}\n")

    def _apply_from_source(self, cfg: model.Config, source: str) -> None:
        """The reload path for a parsed config (a file's, or etcd's): apply it as a minimal diff, or
        raise (the caller logs the refusal; the running config stays)."""
        t = time.monotonic()
        try:
            diff = control.apply(self.inst, cfg, allow_empty=self.allow_empty, source=source)
            from . import trace
            if trace.restore(self.inst):   # a killed `lbxdp trace` had left its build attached
                _event("trace-build-replaced", interface=self.inst.label, by="the normal build")
        except Exception:
            self.metrics.count_reload("error")
            raise
        self.metrics.observe_apply(time.monotonic() - t)
        self.metrics.count_reload("ok")
        _event("reloaded", source=source, changes=len(diff.lines), seconds=f"{time.monotonic() - t:.3f}")
        log_diff(diff)
        _warn(cfg)

    def _announcements(self) -> Any:
        """What the BGP service (lbxdp.bgp) announces, for the etcd node record: VIP name ->
        'announced' or 'withdrawn (why)', and each BGP session's state; None without [bgp]."""
        bgp = getattr(self, "bgp", None)
        if bgp is None or getattr(bgp, "opts", None) is None:
            return None
        st = bgp.status()
        out = {name: "announced" if v.get("announced") else f"withdrawn ({v.get('why')})"
               for name, v in (st.get("vips") or {}).items()}
        out |= {f"session {n['address']}": n.get("state") for n in st.get("neighbors") or ()}
        if st.get("error"):
            out["error"] = st["error"]
        return out

    def reload(self) -> None:
        if self.etcd is not None:   # SIGHUP with etcd: fetch and apply the current revision again
            self.etcd.refetch()
            return
        try:
            try:
                cfg = config.load(self.config_path)
            except Exception:
                self.metrics.count_reload("error")
                raise
            self._apply_from_source(cfg, self.config_path)
        except Exception as e:  # noqa: BLE001 - any error: the running config and data path stay
            _event("reload-failed", error=e.message if isinstance(e, LbxError) else f"{type(e).__name__}: {e}",
                   type=type(e).__name__, kept="the running config")

    def _stop(self) -> None:
        if self.keep_attached:
            _event("stopped", attached="yes (--keep-attached)")
        else:
            control.detach(self.inst)
            _event("stopped", attached="no (detached, pins removed)")
        for f in (self.inst.pid_file, self.inst.checks_file):
            _unlink(f)


def _unlink(f: Path) -> None:
    try:
        f.unlink()
    except OSError:
        pass
