"""`lbxdp run`: the daemon. Foreground, logs to stderr, one instance (interface) per process.

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
from typing import Any

from . import applied, config, control, model
from .errors import LbxError
from .model import BackendId, XdpMode
from .paths import Instance, atomic_write, private_dirs

log = logging.getLogger("lbxdp.daemon")
TICK = 1.0


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


class Daemon:
    def __init__(self, inst: Instance, config_path: str, mode: XdpMode = XdpMode.AUTO, metrics: str | None = None,
                 keep_attached: bool = False, allow_empty: bool = False):
        self.inst, self.config_path, self.mode = inst, config_path, mode
        self.allow_empty = allow_empty   # a config without VIPs may remove all (start and reloads)
        self.metrics_arg, self.keep_attached = metrics, keep_attached
        self._wake = threading.Event()
        self._hup = self._term = False
        self._server: Any = None
        self._m: dict[str, Any] = {}
        self._checker: Any = None
        self._events: queue.Queue[tuple[BackendId, bool, Any]] = queue.Queue()
        self._applied_mtime = -1.0
        self._last_applied: applied.State | None = None   # to put back a deleted run directory
        self._kept: dict[Path, str] = {}                  # file -> text, likewise
        self._failing: dict[str, tuple[str, float]] = {}  # step -> (error, when last logged)

    # --- signals -------------------------------------------------------------------------------
    def _on_hup(self, *_: Any) -> None:
        self._hup = True
        self._wake.set()

    def _on_term(self, *_: Any) -> None:
        self._term = True
        self._wake.set()

    # --- metrics -------------------------------------------------------------------------------
    def own_metrics(self, reg: Any) -> dict[str, Any]:
        """The daemon's own metrics (beside the exporter's), registered on reg."""
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
        reg.register(_HealthCollector(self))
        # Series exist from the start (at 0), so that rate() and increase() have data at once.
        for result in ("ok", "error"):
            m["reloads"].labels(self.inst.ifname, result)
        m["apply"].labels(self.inst.ifname)
        return m

    def _start_metrics(self, listen: str) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.process_collector import ProcessCollector

        from .exporter import PinnedMaps, make_registry, parse_listen
        reg = make_registry(PinnedMaps(self.inst.netns, [self.inst.ifname]))
        ProcessCollector(registry=reg)
        self._m = self.own_metrics(reg)
        addr, port = parse_listen(listen, "--metrics" if self.metrics_arg else "[metrics] listen")
        try:
            self._server = start_http_server(port, addr, registry=reg)
        except (OSError, ValueError, OverflowError) as e:
            raise LbxError(f"cannot serve metrics on {listen}: {getattr(e, 'strerror', None) or e}",
                           "pick another --metrics ADDRESS:PORT (or [metrics] listen)") from e
        _event("metrics", listen=listen)

    def _observe(self, seconds: float) -> None:
        if self._m:
            self._m["apply"].labels(self.inst.ifname).observe(seconds)

    def _count_reload(self, result: str) -> None:
        if self._m:
            self._m["reloads"].labels(self.inst.ifname, result).inc()

    # --- the life ------------------------------------------------------------------------------
    # --- health checks -------------------------------------------------------------------------
    def _on_change(self, bid: BackendId, healthy: bool, result: Any) -> None:   # checker thread
        self._events.put((bid, healthy, result))
        self._wake.set()

    def _on_result(self, bid: BackendId, result: Any) -> None:                  # checker thread
        if self._m:
            self._m["check"].labels(self.inst.ifname, bid.vip.name, bid.name,
                                    "ok" if result.ok else "fail").observe(result.latency)

    def _start_health(self) -> None:
        from .health import Checker
        self._restore_run_dir()
        # A new checker starts every backend healthy (as HAProxy does): forget what an earlier
        # daemon last saw, so the maps and the checker agree from the first transition on.
        control.health_changed(self.inst, None)
        self._checker = Checker(self._on_change, on_result=self._on_result)
        self._checker.start()
        self._sync_targets()

    def _sync_targets(self) -> None:
        """Give the checker the backends of what the instance was last told, when that changed."""
        try:
            mtime = self.inst.applied_file.stat().st_mtime
        except OSError:
            return
        if mtime == self._applied_mtime or self._checker is None:
            return
        self._applied_mtime = mtime
        from .health import Target
        st = applied.load(self.inst)
        self._last_applied = st
        targets = [Target(bid, str(b.address), check.port or b.port, check)
                   for bid, (v, b) in st.cfg.backends().items() if (check := v.check_of(b)) is not None]
        self._checker.set_targets(targets)

    def _apply_health_events(self) -> None:
        changes: dict[BackendId, dict[str, Any]] = {}
        while True:
            try:
                bid, healthy, r = self._events.get_nowait()
            except queue.Empty:
                break
            changes[bid] = {"healthy": healthy, "since": r.at, "detail": r.detail, "latency": r.latency}
        if not changes:
            return
        t = time.monotonic()
        diff = control.health_changed(self.inst, changes)
        self._observe(time.monotonic() - t)
        # Logged once applied: when the line appears, the maps already say so.
        for bid, c in changes.items():
            _event("backend-up" if c["healthy"] else "backend-down", vip=bid.vip.name, backend=bid.name, check=c["detail"],
                   latency=f"{c['latency']:.4f}")
        for line in diff.lines:
            _event("change", what=line)

    def _write_checks(self) -> None:
        """Last result of every check, for `lbxdp status` (atomically replaced once a second)."""
        if self._checker is None:
            return
        data = {k.key: {"healthy": s.healthy, "since": s.since, "checks": s.checks,
                    "last": s.last.detail if s.last else None, "ok": s.last.ok if s.last else None,
                    "latency": s.last.latency if s.last else None, "at": s.last.at if s.last else None}
                for k, s in self._checker.states().items()}
        atomic_write(self.inst.checks_file, json.dumps(data))

    # --- the life ------------------------------------------------------------------------------
    def run(self) -> None:
        _log_to_stderr()
        other = running_pid(self.inst)
        if other is not None and other != os.getpid():
            raise LbxError(f"a daemon already runs for {self.inst.label} (pid {other})",
                           "stop it first, or send it `lbxdp reload`")
        cfg = config.load(self.config_path)
        _warn(cfg)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        clean = False
        try:
            private_dirs(self.inst)
            # The port first: one that cannot be used stops the start before anything changes
            # (an attached program, adopted or not, keeps forwarding untouched).
            listen = self.metrics_arg or cfg.metrics_listen
            if listen:
                self._start_metrics(listen)
            t = time.monotonic()
            res = control.attach(self.inst, cfg, self.mode, config_path=os.path.abspath(self.config_path),
                             allow_empty=self.allow_empty)
            attach_seconds = time.monotonic() - t
            self._observe(attach_seconds)
            self._keep_run_files()
            self._write_pid()
            self._start_health()
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
            if self._checker is not None:
                self._checker.stop()
            if self._server is not None:
                self._server[0].shutdown()
            if clean:
                self._stop()
            else:
                _unlink(self.inst.pid_file)

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
            self._wake.wait(TICK)
            self._wake.clear()
            if self._term:
                break
            self._step("run-dir", self._restore_run_dir)
            self._step("health", self._apply_health_events)
            if self._hup:
                self._hup = False
                self.reload()
            else:
                self._step("tick", self.tick)
            self._step("sync-targets", self._sync_targets)
            self._step("write-checks", self._write_checks)

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

    def _keep_run_files(self) -> None:
        """Keep in memory what the run directory holds that only attach writes."""
        for f in (self.inst.schema_file, self.inst.state_file):
            self._kept[f] = f.read_text()

    def _restore_run_dir(self) -> None:
        """Put back what a deleted run directory held: the schema (or no command could read the
        maps), the pid file (or `lbxdp reload` would not find us) and the applied state (or the
        next change would start from an empty config and remove every VIP)."""
        inst = self.inst
        missing = [f for f in (inst.schema_file, inst.state_file, inst.pid_file, inst.applied_file) if not f.exists()]
        if not missing:
            return
        private_dirs(inst, create=True)
        with applied.locked(inst):
            for f, text in self._kept.items():
                if not f.exists():
                    atomic_write(f, text)
            if not inst.applied_file.exists() and self._last_applied is not None:
                applied.save(inst, self._last_applied)
        if not inst.pid_file.exists():
            self._write_pid()
        self._applied_mtime = -1.0    # have the checker's targets re-read
        _event("run-dir-restored", dir=inst.run_dir, files=",".join(f.name for f in missing))

    def reload(self) -> None:
        t = time.monotonic()
        try:
            cfg = config.load(self.config_path)
            diff = control.apply(self.inst, cfg, allow_empty=self.allow_empty, source=self.config_path)
        except Exception as e:  # noqa: BLE001 - any error: the running config and data path stay
            self._count_reload("error")
            _event("reload-failed", error=e.message if isinstance(e, LbxError) else f"{type(e).__name__}: {e}",
                   type=type(e).__name__, kept="the running config")
            return
        self._observe(time.monotonic() - t)
        self._count_reload("ok")
        _event("reloaded", changes=len(diff.lines), seconds=f"{time.monotonic() - t:.3f}")
        for line in diff.lines:
            _event("change", what=line)
        _warn(cfg)

    def tick(self) -> None:
        """Follow the interface's MAC; finish expired drains, step slow starts: only when there is
        something to do."""
        try:
            moved = control.sync_own_mac(self.inst)
            if moved:
                _event("own-mac-changed", old=moved[0] or "none", new=moved[1])
        except LbxError as e:
            _event("own-mac-check-failed", error=e.message)
        now = time.time()
        st = applied.load(self.inst)
        rt = st.runtime(now)
        if not st.expired_drains(now) and not any(rt.ramping(v) for v in st.cfg.vips):
            return
        t = time.monotonic()
        try:
            diff = control.apply(self.inst, None, now)
        except LbxError as e:
            _event("step-failed", error=e.message)
            return
        self._observe(time.monotonic() - t)
        for line in diff.lines:
            _event("change", what=line)

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


class _HealthCollector:
    """lbxdp_backend_healthy: the checker's verdict per backend, read at scrape time."""

    def __init__(self, d: Daemon):
        self.d = d

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily
        g = GaugeMetricFamily("lbxdp_backend_healthy", "1 if the backend passes its health check (after rise/"
                              "fall), 0 if not; only checked backends appear.", labels=["interface", "vip", "backend"])
        if self.d._checker is not None:
            for bid, st in self.d._checker.states().items():
                g.add_metric([self.d.inst.ifname, bid.vip.name, bid.name], 1 if st.healthy else 0)
        yield g
