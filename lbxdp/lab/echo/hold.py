"""Long-lived connections (lbxdp.lab.traffic.Traffic.hold)::

    python -m lbxdp.lab.echo hold tcp 10.112.0.10 8080 --conns 200 --interval 0.05 --duration 60 \\
        --stop-file /run/x.stop --ready-file /run/x.ready

Opens --conns connections and reads each greeting (which backend it is on); writes the ready
file (JSON: {"open": n, "backends": {name: count}}) once all are open. Then sweeps until the
stop file appears (then makes one last sweep) or --duration ends: each sweep sends every open
connection one numbered line ("<conn> <round>\\n"), reads back exactly that line, then
sleeps --interval. A connection that fails (reset, EOF, timeout, a wrong echo) is closed and
its error recorded; it is never reopened. Prints one JSON object: {"conns": [{"backend",
"open", "rounds", "sent", "received", "last_ok", "max_rtt", "errors": [{"error", "at",
"detail"}]}], "sweeps", "sweep_ends", "max_gap", "max_rtt", "stopped_by", "elapsed"}. Times
are epoch seconds, so a test can line them up with what it did meanwhile; "sent" and
"received" count echoed bytes (not the greeting).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import time
from collections import Counter

from .common import bounded

MAX_CONNS = 5_000
MAX_DURATION = 3_600.0


def error_name(e: BaseException) -> str:
    """What went wrong with a held connection, in one word: ECONNRESET, timeout, EOF, mismatch..."""
    if isinstance(e, socket.timeout):
        return "timeout"
    if isinstance(e, EOFError):
        return "EOF"
    if isinstance(e, ValueError):
        return "mismatch"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def hold_message(conn: int, rnd: int) -> bytes:
    """The line a held connection sends in a round: numbered, so a stale or crossed echo shows."""
    return f"{conn} {rnd}\n".encode()


class Held:
    """One held connection and what happened to it. Not thread-safe (one sweeper)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock: socket.socket | None = None
        self.backend: str | None = None
        self.rounds = self.sent = self.received = 0
        self.last_ok: float | None = None
        self.max_rtt = 0.0
        self.errors: list[dict] = []

    def open(self, host: str, port: int, timeout: float) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.backend = _read_line(self.sock, time.monotonic() + timeout).decode(errors="replace")
        except (OSError, EOFError) as e:
            self.fail(e)

    def round(self, timeout: float) -> None:
        """Send this round's line and read exactly that line back; on any failure, close."""
        assert self.sock is not None
        msg = hold_message(self.index, self.rounds)
        t = time.monotonic()
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(msg)
            self.sent += len(msg)
            got = b""
            while len(got) < len(msg):
                self.sock.settimeout(max(0.001, t + timeout - time.monotonic()))
                chunk = self.sock.recv(len(msg) - len(got))
                if not chunk:
                    raise EOFError(f"EOF after {got!r}")
                got += chunk
            self.received += len(got)
            if got != msg:
                raise ValueError(f"sent {msg!r}, echoed {got!r}")
        except (OSError, EOFError, ValueError) as e:
            self.fail(e)
            return
        self.max_rtt = max(self.max_rtt, time.monotonic() - t)
        self.rounds += 1
        self.last_ok = time.time()

    def fail(self, e: BaseException) -> None:
        self.errors.append({"error": error_name(e), "at": round(time.time(), 3), "detail": str(e)[:200]})
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def summary(self) -> dict:
        return {"backend": self.backend, "open": self.sock is not None, "rounds": self.rounds,
                "sent": self.sent, "received": self.received, "last_ok": self.last_ok,
                "max_rtt": round(self.max_rtt, 4), "errors": self.errors}


def _read_line(s: socket.socket, deadline: float) -> bytes:
    """The greeting: bytes up to the first newline, read one at a time so that nothing after it
    (an echo) is consumed here."""
    buf = b""
    while not buf.endswith(b"\n"):
        s.settimeout(max(0.001, deadline - time.monotonic()))
        c = s.recv(1)
        if not c:
            raise EOFError(f"EOF before greeting (got {buf!r})")
        buf += c
    return buf[:-1]


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_hold(host: str, port: int, conns: int, interval: float, duration: float,
             stop_file: str | None, ready_file: str | None, try_timeout: float) -> dict:
    """Open ``conns`` connections, then sweep them until the stop file or ``duration``."""
    start = time.monotonic()
    deadline = start + duration
    held = [Held(i) for i in range(conns)]
    sweep_ends: list[float] = []
    stopped_by = "duration"
    try:
        for h in held:
            if time.monotonic() >= deadline:
                h.errors.append({"error": "not-opened", "at": round(time.time(), 3), "detail": "duration over"})
                continue
            h.open(host, port, min(try_timeout, max(0.01, deadline - time.monotonic())))
        if ready_file:
            ready = Counter(h.backend for h in held if h.sock is not None)
            _write_atomic(ready_file, json.dumps({"open": sum(ready.values()), "backends": dict(ready)}))
        while time.monotonic() < deadline:
            # Seen before a sweep, so the last sweep starts after the file appeared: every
            # connection that is open at the end was checked after whatever preceded the stop.
            final = bool(stop_file) and os.path.exists(stop_file)
            for h in held:
                if h.sock is not None:
                    h.round(try_timeout)
            sweep_ends.append(round(time.time(), 3))
            if final:
                stopped_by = "stop-file"
                break
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    finally:
        summaries = [h.summary() for h in held]  # "open" as it was at the end, before closing
        for h in held:
            h.close()
    gaps = [b - a for a, b in zip(sweep_ends, sweep_ends[1:])]
    return {"conns": summaries, "sweeps": len(sweep_ends), "sweep_ends": sweep_ends,
            "max_gap": round(max(gaps, default=0.0), 3),
            "max_rtt": round(max((h.max_rtt for h in held), default=0.0), 4),
            "stopped_by": stopped_by, "elapsed": round(time.monotonic() - start, 3)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lbxdp.lab.echo hold",
                                description="Hold long-lived TCP connections and exchange numbered "
                                "lines on each until a stop file appears.")
    p.add_argument("proto", choices=["tcp"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=bounded(int, 1, MAX_CONNS), default=10,
                   help="connections, at most %d" % MAX_CONNS)
    p.add_argument("--interval", type=bounded(float, 0, 60), default=0.05, help="seconds between sweeps")
    p.add_argument("--duration", type=bounded(float, 0, MAX_DURATION, above=True), default=60.0,
                   help="seconds in all (connecting included), at most %d" % MAX_DURATION)
    p.add_argument("--stop-file", help="once this file appears, make one last sweep and stop")
    p.add_argument("--ready-file", help="written (JSON) once every connection is open")
    p.add_argument("--try-timeout", type=bounded(float, 0, 60, above=True), default=2.0,
                   help="seconds for one connect + greeting, or one echo")
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    print(json.dumps(run_hold(a.host, a.port, a.conns, a.interval, a.duration, a.stop_file, a.ready_file,
                              a.try_timeout)))
    return 0
