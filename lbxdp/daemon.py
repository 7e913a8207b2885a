"""`lbxdp run`: the daemon. Foreground, logs to stderr, one instance (interface) per process.

Life of a daemon:
  start    refuse if another daemon runs for the instance; read and validate the config (a bad
           file stops it here, before anything changes); attach, which adopts the pinned maps of
           an earlier run (or of `lbxdp attach`) and replaces the program atomically;
  loop     SIGHUP (or `lbxdp reload`): re-read the file and apply it as a minimal diff; a bad
           file is logged and changes nothing. Once a second: finish drains past their deadline
           and step slow starts, if any are in progress;
  SIGTERM  detach and remove the pins, unless --keep-attached. SIGKILL leaves the program
           attached and forwarding; the next `lbxdp run` adopts it without losing a flow.
Every state change is one log line: `lbxdp: <event> key=value ...`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from . import applied, config, control
from .errors import LbxError
from .paths import Instance

log = logging.getLogger("lbxdp.daemon")
TICK = 1.0


def _event(name: str, **kv: Any) -> None:
    log.info("%s %s", name, " ".join(f"{k}={v}" for k, v in kv.items()))


def _log_to_stderr() -> None:
    """One line per event on stderr, `lbxdp[pid]: event key=value ...` (journald adds the time)."""
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("lbxdp[%(process)d]: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _pidfile(inst: Instance) -> Path:
    return inst.run_dir / "daemon.pid"


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
        pid_s, started = _pidfile(inst).read_text().split()
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
    def __init__(self, inst: Instance, config_path: str, mode: str = "auto", metrics: str | None = None,
                 keep_attached: bool = False):
        self.inst, self.config_path, self.mode = inst, config_path, mode
        self.metrics_arg, self.keep_attached = metrics, keep_attached
        self._wake = threading.Event()
        self._hup = self._term = False
        self._server: Any = None
        self._m: dict[str, Any] = {}

    # --- signals -------------------------------------------------------------------------------
    def _on_hup(self, *_: Any) -> None:
        self._hup = True
        self._wake.set()

    def _on_term(self, *_: Any) -> None:
        self._term = True
        self._wake.set()

    # --- metrics -------------------------------------------------------------------------------
    def _start_metrics(self, listen: str) -> None:
        from prometheus_client import Counter, Histogram, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        from .exporter import PinnedMaps, make_registry, parse_listen
        reg = make_registry(PinnedMaps(self.inst.netns, [self.inst.ifname]))
        ProcessCollector(registry=reg)
        self._m = {
            "reloads": Counter("lbxdp_config_reloads_total", "Config reloads by result (ok or error).",
                               ["interface", "result"], registry=reg),
            "apply": Histogram("lbxdp_apply_seconds", "Time to apply a config or a runtime step to the maps "
                               "(table builds and switches included).", ["interface"], registry=reg,
                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)),
        }
        addr, port = parse_listen(listen)
        try:
            self._server = start_http_server(port, addr, registry=reg)
        except OSError as e:
            raise LbxError(f"cannot serve metrics on {listen}: {e.strerror}", "pick another --metrics ADDRESS:PORT") from e
        _event("metrics", listen=listen)

    def _observe(self, seconds: float) -> None:
        if self._m:
            self._m["apply"].labels(self.inst.ifname).observe(seconds)

    def _count_reload(self, result: str) -> None:
        if self._m:
            self._m["reloads"].labels(self.inst.ifname, result).inc()

    # --- the life ------------------------------------------------------------------------------
    def run(self) -> None:
        _log_to_stderr()
        other = running_pid(self.inst)
        if other is not None and other != os.getpid():
            raise LbxError(f"a daemon already runs for {self.inst.label} (pid {other})",
                           "stop it first, or send it `lbxdp reload`")
        cfg = config.load(self.config_path)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.inst.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        t = time.monotonic()
        res = control.attach(self.inst, cfg, self.mode, config_path=os.path.abspath(self.config_path))
        _pidfile(self.inst).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        _event("attached", interface=self.inst.label, mode=res.mode, prog_id=res.prog_id,
               adopted=res.upgraded, changes=len(res.diff.lines), seconds=f"{time.monotonic() - t:.3f}")
        listen = self.metrics_arg or cfg.metrics_listen
        try:
            if listen:
                self._start_metrics(listen)
            self._loop()
        finally:
            if self._server is not None:
                self._server[0].shutdown()
            self._stop()

    def _loop(self) -> None:
        while not self._term:
            self._wake.wait(TICK)
            self._wake.clear()
            if self._term:
                break
            if self._hup:
                self._hup = False
                self.reload()
            else:
                self.tick()

    def reload(self) -> None:
        t = time.monotonic()
        try:
            cfg = config.load(self.config_path)
            diff = control.apply(self.inst, cfg)
        except LbxError as e:
            self._count_reload("error")
            _event("reload-failed", error=repr(e.message), kept="the running config")
            return
        self._observe(time.monotonic() - t)
        self._count_reload("ok")
        _event("reloaded", changes=len(diff.lines), seconds=f"{time.monotonic() - t:.3f}")
        for line in diff.lines:
            _event("change", what=repr(line))

    def tick(self) -> None:
        """Finish expired drains, step slow starts: only when there is something to do."""
        now = time.time()
        st = applied.load(self.inst)
        rt = st.runtime(now)
        if not st.expired_drains(now) and not any(rt.ramping(v) for v in st.cfg.vips):
            return
        t = time.monotonic()
        try:
            diff = control.apply(self.inst, None, now)
        except LbxError as e:
            _event("step-failed", error=repr(e.message))
            return
        self._observe(time.monotonic() - t)
        for line in diff.lines:
            _event("change", what=repr(line))

    def _stop(self) -> None:
        if self.keep_attached:
            _event("stopped", attached="yes (--keep-attached)")
        else:
            control.detach(self.inst)
            _event("stopped", attached="no (detached, pins removed)")
        try:
            _pidfile(self.inst).unlink()
        except OSError:
            pass
