"""`lbxdp run` as the netns tests drive it: one daemon process in the balancer's namespace,
its one-line events read back as they arrive, and the fixture that starts and always stops them.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from lbxdp.paths import Instance
from lbxdp.lab.rig import HOST_IF, LB, Rig, RigSpec

REPO = Path(__file__).resolve().parents[2]
_EVENT = re.compile(r"^lbxdp\[(\d+)\]: (\S+) ?(.*)$")
_PAIR = re.compile(r'(\w+)=(?:("(?:[^"\\]|\\.)*")|(\S+))')


class Daemon:
    """One `lbxdp run` in the balancer's namespace. A thread reads its stderr (stdout merged) and
    stamps every line with the time it arrived, so tests can line its events up with theirs.

    The Popen's pid is lbxdp's own (it enters the namespace itself), so signals reach exactly
    the process we started.
    """

    def __init__(self, rig: Rig, config: Path, log: Path, metrics: str | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        argv = [sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), "run", HOST_IF, "--config", str(config),
                "--mode", "generic", *(["--metrics", metrics] if metrics else []), *args]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=REPO)
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log, "w") as f:
            for raw in self.popen.stdout:          # ends at EOF, when the daemon exits
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    self.lines.append((time.time(), line))
                f.write(line + "\n")
                f.flush()

    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def events(self, name: str, **match: str) -> list[tuple[float, dict[str, str]]]:
        """(arrival time, {key: value}) of its `lbxdp[pid]: NAME key=value ...` lines whose
        values include `match` (logfmt: quoted values are unquoted)."""
        with self._lock:
            lines = list(self.lines)
        out = []
        for t, line in lines:
            m = _EVENT.match(line)
            if m and m[2] == name:
                kv = parse_logfmt(m[3])
                if all(kv.get(k) == v for k, v in match.items()):
                    out.append((t, kv))
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = 30.0,
                   **match: str) -> tuple[float, dict[str, str]]:
        """Poll until the count-th matching NAME event; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.events(name, **match)
            if len(got) >= count:
                return got[count - 1]
            assert self.popen.poll() is None, f"daemon exited ({self.popen.returncode}):\n{self.text()}"
            assert time.monotonic() < deadline, f"no {name} {match} event #{count} in {timeout:.0f}s:\n{self.text()}"
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL by PID (it gets no chance to detach) and reap."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        self._reader.join(5)

    def stop(self) -> int:
        """SIGTERM by PID (it detaches and removes the pins), SIGKILL after 20 s; reaped."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        rc = self.popen.wait(10)
        self._reader.join(5)
        return rc


def parse_logfmt(text: str) -> dict[str, str]:
    """key=value pairs of a daemon log line; double-quoted values are JSON strings."""
    return {k: json.loads(q) if q else bare for k, q, bare in _PAIR.findall(text)}


def rig_up(spec: RigSpec) -> Iterator[Rig]:
    """Generator behind a module's `rig` fixture: the rig up; then down, checked empty (no
    namespace, no server left), even if the tests failed."""
    r = Rig(spec)
    try:
        r.up()
        yield r
    finally:
        servers = list(r.servers.values())
        r.down()
        left = r.leftovers() + [f"server {s.pid}" for s in servers if s.alive()]
        assert not left, f"left behind: {left}"


def started_daemons(rig: Rig, logdir: Path) -> Iterator[Callable[..., Daemon]]:
    """Generator behind the `daemons` fixture: yields start(config, metrics=None, args=()) -> a Daemon
    that has attached (its `attached` event logged); config is a path, or TOML text to write.

    Cleanup, even if the test failed: every daemon started is stopped by its PID (SIGTERM, then
    SIGKILL), then `lbxdp detach` removes whatever a killed daemon left attached and pinned; no
    pin, run state or process may be left.
    """
    started: list[Daemon] = []

    def start(config: Path | str, metrics: str | None = None, args: tuple[str, ...] = ()) -> Daemon:
        if isinstance(config, str):
            path = logdir / f"lbxdp{len(started)}.toml"
            path.write_text(config)
            config = path
        d = Daemon(rig, config, logdir / f"daemon{len(started)}.log", metrics, args)
        started.append(d)
        d.wait_event("attached", timeout=120)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()
        subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), "detach", HOST_IF],
                       capture_output=True, timeout=60, cwd=REPO)
        inst = Instance(HOST_IF, rig.ns(LB))
        assert not inst.pin_dir.exists() and not inst.run_dir.exists(), "pins or run state left behind"
        assert all(d.popen.poll() is not None for d in started)
