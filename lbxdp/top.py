"""`lbxdp top`: the counters as live rates, per VIP and backend, and verdicts by reason.

Each refresh reads what `lbxdp status` reads (control.status(): one lbxdp.view.InstanceStatus
per instance) and turns two consecutive reads into rates over the time between them. That step is
rates(), a pure function of two reads and the seconds between them; tests/unit/test_top.py feeds
it fake reads. The rates are those Prometheus' rate() would give over the same two samples: a
counter that went down restarted from 0 (a re-attach or a reused VIP/backend id), so its increase
is its new value; a row absent from the earlier read has no rate yet ("-").

The terminal is driven with a few ANSI sequences (alternate screen, hidden cursor, cbreak input so
that q needs no Enter), no curses and no extra dependency. Whatever ends the view (q, Ctrl-C,
SIGTERM, SIGHUP, an error while reading the maps), Screen.__exit__ restores the terminal. When
stdout is not a terminal, frames are printed one after the other as plain text (like `top -b`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, TextIO

from .maps import Stats
from .view import InstanceStatus

Read = Callable[[], list[InstanceStatus]]   # one control.status() per instance


@dataclass(frozen=True)
class Row:
    """One VIP, backend or total: its counters at the later read and their rates."""

    name: str
    packets: int
    bytes: int
    new_flows: int
    pps: float | None            # packets/s; None: no earlier read of this row
    bps: float | None            # bits/s (bytes are whole frames, as the maps count them)
    fps: float | None            # new connection-table entries/s
    in_table: bool | None = None  # backends: in the VIP's live selection table (None for others)


@dataclass(frozen=True)
class Vip:
    row: Row
    mode: str
    scheduler: str
    backends: tuple[Row, ...]


@dataclass(frozen=True)
class Reason:
    verdict: str
    reason: str
    packets: int
    bytes: int
    pps: float | None
    bps: float | None


@dataclass(frozen=True)
class Frame:
    """What one refresh shows for one instance."""

    interface: str
    netns: str | None
    attached: bool
    mode: str
    prog_id: int
    seconds: float               # between the two reads the rates come from (0: only one read)
    vips: tuple[Vip, ...]
    total: Row
    reasons: tuple[Reason, ...]
    flow_entries: int
    flow_capacity: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -------------------------------------------------------------------------------- rates


def increase(before: int | None, after: int) -> int | None:
    """after - before; a counter that went down restarted from 0, so it grew by `after`."""
    if before is None:
        return None
    return after - before if after >= before else after


def per_second(before: int | None, after: int, seconds: float, scale: int = 1) -> float | None:
    d = increase(before, after)
    return None if d is None or seconds <= 0 else d * scale / seconds


def _row(name: str, cur: Stats, prev: Stats | None, seconds: float, in_table: bool | None = None) -> Row:
    def get(k: str) -> int | None:
        return None if prev is None else getattr(prev, k)
    return Row(name, cur.packets, cur.bytes, cur.new_flows,
               per_second(get("packets"), cur.packets, seconds),
               per_second(get("bytes"), cur.bytes, seconds, scale=8),
               per_second(get("new_flows"), cur.new_flows, seconds), in_table)


def _sum(values: Iterable[float | None]) -> float | None:
    """Sum of the known rates; None if none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def rates(prev: InstanceStatus | None, cur: InstanceStatus, seconds: float) -> Frame:
    """The frame for one instance from two control.status() reads `seconds` apart.

    prev None (no earlier read yet) or seconds <= 0: counters only, every rate None. Rows are
    matched by name (VIP 'addr:port/proto', backend 'addr:port' within its VIP, reason by verdict
    and reason), so a VIP or backend added between the reads has no rate yet.
    """
    if seconds <= 0:
        prev = None
    old_vips = {v.name: v for v in prev.vips} if prev is not None else {}
    vips = []
    for v in cur.vips:
        pv = old_vips.get(v.name)
        old_bes = {b.name: b.stats for b in pv.backends} if pv is not None else {}
        bes = tuple(_row(b.name, b.stats, old_bes.get(b.name), seconds, b.in_table) for b in v.backends)
        vips.append(Vip(_row(v.name, v.stats, pv.stats if pv is not None else None, seconds), v.mode, v.scheduler, bes))
    total = Row("total", sum(v.row.packets for v in vips), sum(v.row.bytes for v in vips),
                sum(v.row.new_flows for v in vips), _sum(v.row.pps for v in vips),
                _sum(v.row.bps for v in vips), _sum(v.row.fps for v in vips))
    old_reasons = prev.reason_counts() if prev is not None else {}
    reasons = []
    for r in cur.reasons:
        pp, pb = old_reasons.get(r.reason, (None, None))
        reasons.append(Reason(r.reason.verdict, r.reason.label, r.packets, r.bytes,
                              per_second(pp, r.packets, seconds), per_second(pb, r.bytes, seconds, 8)))
    x = cur.xdp
    return Frame(cur.interface, cur.netns, x.attached, x.mode or "", x.prog_id or 0,
                 seconds if prev is not None else 0.0, tuple(vips), total,
                 tuple(reasons), cur.flow_entries, cur.flow_capacity)


def frames(prev: list[InstanceStatus] | None, cur: list[InstanceStatus], seconds: float) -> list[Frame]:
    """rates() for every instance of `cur`, matched to `prev` by (netns, interface)."""
    old = {(r.netns, r.interface): r for r in prev or []}
    return [rates(old.get((r.netns, r.interface)), r, seconds) for r in cur]


# -------------------------------------------------------------------------------- text


def si(x: float | None, integer: bool = False) -> str:
    """12 -> '12.0' (or '12'), 12345 -> '12.3k', 4.5e9 -> '4.5G'; None -> '-'."""
    if x is None:
        return "-"
    for above, unit, suffix in ((1e12, 1e12, "T"), (1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(x) >= above:
            return f"{x / unit:.1f}{suffix}"
    return f"{x:.0f}" if integer else f"{x:.1f}"


HEAD = ("in table", "pkts/s", "bits/s", "flows/s", "packets", "bytes", "new flows")


def render(fs: list[Frame], interval: float, now: float | None = None, keys: bool = False) -> list[str]:
    """The text of one refresh (every instance), as lines without newlines."""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    out = [f"lbxdp top   interval {interval:g} s   {clock}" + ("   q quits" if keys else "")]
    for f in fs:
        out += [""] + render_frame(f)
    return out


def render_frame(f: Frame) -> list[str]:
    where = f.interface + (f" (netns {f.netns})" if f.netns else "")
    state = f"{f.mode}, program id {f.prog_id}" if f.attached else "no XDP program attached"
    rate_note = f"rates over {f.seconds:.2f} s" if f.seconds else "rates after the next refresh"
    use = f" ({100 * f.flow_entries / f.flow_capacity:.1f}%)" if f.flow_capacity else ""
    lines = [f"{where}: {state}; {rate_note}",
             f"connection table: {f.flow_entries} / {f.flow_capacity} entries{use}", ""]
    names = [v.row.name + f"  {v.mode} {v.scheduler}" for v in f.vips]
    names += ["  " + b.name for v in f.vips for b in v.backends]
    w = max([len(n) for n in names] + [len("VIP / backend")]) + 2
    fmt = "{:<%d}{:>9}{:>10}{:>10}{:>10}{:>11}{:>11}{:>11}" % w

    def row(label: str, r: Row, table: str = "") -> str:
        return fmt.format(label, table, si(r.pps), si(r.bps), si(r.fps),
                          si(r.packets, True), si(r.bytes, True), si(r.new_flows, True))

    lines.append(fmt.format("VIP / backend", *HEAD))
    for v in f.vips:
        lines.append(row(f"{v.row.name}  {v.mode} {v.scheduler}".rstrip(), v.row))
        for b in v.backends:
            lines.append(row("  " + b.name, b, "yes" if b.in_table else "NO"))
    lines.append(row("total", f.total))
    lines += ["", "{:<8}{:<20}{:>10}{:>10}{:>11}{:>11}".format("verdict", "reason", "pkts/s", "bits/s",
                                                                 "packets", "bytes")]
    for r in f.reasons:
        if r.packets or r.pps:   # reasons never seen stay hidden; once seen, a row stays
            lines.append("{:<8}{:<20}{:>10}{:>10}{:>11}{:>11}".format(
                r.verdict, r.reason, si(r.pps), si(r.bps), si(r.packets, True), si(r.bytes, True)))
    return lines


# -------------------------------------------------------------------------------- terminal

ALT_SCREEN, MAIN_SCREEN = "\x1b[?1049h", "\x1b[?1049l"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_EOL, CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
QUIT_KEYS = (b"q", b"Q")


class Quit(Exception):
    """SIGTERM/SIGHUP while the view runs: leave through Screen.__exit__ like q does."""


class Screen:
    """Draws frames; on a terminal, in the alternate screen with the cursor hidden and `keys_fd`
    in cbreak mode (q without Enter; Ctrl-C still raises SIGINT). __exit__ restores all three."""

    def __init__(self, out: TextIO, keys_fd: int | None):
        self.out = out
        self.tty_out = out.isatty()
        self.keys_fd = keys_fd if keys_fd is not None and os.isatty(keys_fd) else None
        self._saved: list[Any] | None = None

    @property
    def keys(self) -> bool:
        return self.keys_fd is not None

    def __enter__(self) -> "Screen":
        if self.keys_fd is not None:
            self._saved = termios.tcgetattr(self.keys_fd)
            tty.setcbreak(self.keys_fd)
        if self.tty_out:
            self.out.write(ALT_SCREEN + HIDE_CURSOR)
            self.out.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.tty_out:
                self.out.write(SHOW_CURSOR + MAIN_SCREEN)
                self.out.flush()
        finally:
            if self._saved is not None:
                termios.tcsetattr(self.keys_fd, termios.TCSADRAIN, self._saved)

    def draw(self, lines: list[str]) -> None:
        if not self.tty_out:
            self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()
            return
        cols, rows = os.get_terminal_size(self.out.fileno())
        cols, rows = cols or 10_000, rows or len(lines)   # 0: the size was never set (a bare pty)
        shown = [ln[:cols] + CLEAR_EOL for ln in lines[:rows]]
        self.out.write(HOME + "\r\n".join(shown) + CLEAR_EOS)
        self.out.flush()

    def wait(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> bool:
        """Sleep `seconds`, or less if a quit key comes; True if the user asked to quit."""
        if self.keys_fd is None:
            time.sleep(max(0.0, seconds))
            return False
        deadline = clock() + seconds
        while (left := deadline - clock()) > 0:
            ready, _, _ = select.select([self.keys_fd], [], [], left)
            if ready:
                data = os.read(self.keys_fd, 64)
                if not data or any(k in data for k in QUIT_KEYS):   # b'': the terminal hung up
                    return True
        return False


def _on_quit_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP raise Quit (so the terminal is restored); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: Any) -> None:
        raise Quit(signal.Signals(signum).name)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}

    def undo() -> None:
        for s, h in old.items():
            signal.signal(s, h)
    return undo


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (ValueError, OSError):   # closed, or replaced by an object without a descriptor
        return None


# -------------------------------------------------------------------------------- loops


def sample(read: Read, clock: Callable[[], float] = time.monotonic) -> tuple[list[InstanceStatus], float]:
    """read() and the time it stands for (the middle of the read)."""
    t0 = clock()
    data = read()
    return data, (t0 + clock()) / 2


def once(read: Read, interval: float, sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> list[Frame]:
    """Two reads `interval` apart -> one frame per instance."""
    a, ta = sample(read, clock)
    sleep(interval)
    b, tb = sample(read, clock)
    return frames(a, b, tb - ta)


def updates(read: Read, interval: float, wait: Callable[[float], bool],
            clock: Callable[[], float] = time.monotonic) -> Iterator[list[Frame]]:
    """Counters at once (no rates yet), then a frame set per interval until wait() says quit."""
    prev, t_prev = sample(read, clock)
    yield frames(None, prev, 0.0)
    while not wait(max(0.0, t_prev + interval - clock())):
        cur, t = sample(read, clock)
        yield frames(prev, cur, t - t_prev)
        prev, t_prev = cur, t


def run(read: Read, interval: float, once_: bool = False, as_json: bool = False,
        out: TextIO | None = None, keys_fd: int | None = None) -> None:
    """`lbxdp top`: --once prints one frame set and returns; otherwise refresh until q, Ctrl-C,
    SIGTERM or SIGHUP (every one of which returns normally, the terminal restored)."""
    out = out or sys.stdout
    if once_:
        fs = once(read, interval)
        if as_json:
            out.write(json.dumps([f.to_json() for f in fs], indent=2) + "\n")
        else:
            out.write("\n".join(render(fs, interval)) + "\n")
        out.flush()
        return
    undo = _on_quit_signals()
    try:
        if as_json:   # one JSON array (all instances) per line, per interval
            for i, fs in enumerate(updates(read, interval, lambda s: time.sleep(s) or False)):
                if i:   # the first set has counters only
                    out.write(json.dumps([f.to_json() for f in fs]) + "\n")
                    out.flush()
            return
        if keys_fd is None:
            keys_fd = _stdin_fd()
        with Screen(out, keys_fd) as screen:
            for fs in updates(read, interval, screen.wait):
                screen.draw(render(fs, interval, keys=screen.keys))
    except (KeyboardInterrupt, Quit):
        pass
    finally:
        undo()
