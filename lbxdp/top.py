"""`lbxdp top`: the counters as live rates, per VIP and backend, and verdicts by reason.

Each refresh reads what `lbxdp status` reads (control.status(): one lbxdp.view.InstanceStatus
per instance) and turns two consecutive reads into rates over the time between them. That step is
rates(), a pure function of two reads and the seconds between them; tests/unit/test_top.py feeds
it fake reads. The rates are those Prometheus' rate() would give over the same two samples: a
counter that went down restarted from 0 (a re-attach or a reused VIP/backend id), so its increase
is its new value; a row absent from the earlier read has no rate yet ("-").

The screen is drawn by rich (Debian's python3-rich): a Live display in the alternate screen, one
Table per instance and one of verdicts by reason, with sparklines of each VIP's and backend's
packets/s and new flows/s over the last minute (History) and colour for health and drops. rich
does not read keys, so Keys puts stdin in cbreak mode (q quits without Enter; Ctrl-C is still
SIGINT). Whatever ends the view (q, Ctrl-C, SIGTERM, SIGHUP, an error while reading the maps),
Live and Keys restore the terminal on the way out. When stdout is not a terminal, frames are
printed one after the other as plain text, without escape sequences (like `top -b`).
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
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

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
    health: str | None = None    # backends: 'up', 'down' or 'unchecked' (lbxdp.view.Health.state)


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


def _row(name: str, cur: Stats, prev: Stats | None, seconds: float, in_table: bool | None = None,
         health: str | None = None) -> Row:
    def get(k: str) -> int | None:
        return None if prev is None else getattr(prev, k)
    return Row(name, cur.packets, cur.bytes, cur.new_flows,
               per_second(get("packets"), cur.packets, seconds),
               per_second(get("bytes"), cur.bytes, seconds, scale=8),
               per_second(get("new_flows"), cur.new_flows, seconds), in_table, health)


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
        bes = tuple(_row(b.name, b.stats, old_bes.get(b.name), seconds, b.in_table, b.health.state)
                    for b in v.backends)
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


# -------------------------------------------------------------------------------- history

BLOCKS = "▁▂▃▄▅▆▇█"   # U+2581..U+2588; a bucket without a sample is a space
SPARK_WIDTH = 20


def sparkline(values: Iterable[float | None]) -> str:
    """One block per value, scaled to the largest: 0 is the lowest block, any rate above 0 at
    least the second, the largest the full one; None (no sample) a space."""
    vals = list(values)
    top = max((v for v in vals if v is not None), default=0.0)
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        elif v <= 0 or top <= 0:
            out.append(BLOCKS[0])
        else:
            out.append(BLOCKS[max(1, min(7, round(7 * v / top)))])
    return "".join(out)


Key = tuple[Any, ...]   # (netns, interface, vip) or (netns, interface, vip, backend)


class History:
    """Each VIP's and backend's packets/s and new flows/s over the last `window` seconds, for the
    sparklines. add() takes each refresh's frames with the time they stand for; series() resamples
    the window into `width` buckets (the mean of the samples in each, None where there is none),
    so the sparkline covers the same minute whatever the interval."""

    def __init__(self, window: float = 60.0, width: int = SPARK_WIDTH):
        self.window, self.width = window, width
        self._points: dict[Key, deque[tuple[float, float, float]]] = {}
        self.now = 0.0

    def add(self, fs: list[Frame], t: float) -> None:
        self.now = t
        for f in fs:
            for v in f.vips:
                for key, r in (((f.netns, f.interface, v.row.name), v.row),
                               *(((f.netns, f.interface, v.row.name, b.name), b) for b in v.backends)):
                    if r.pps is not None and r.fps is not None:
                        self._points.setdefault(key, deque()).append((t, r.pps, r.fps))
        for key in list(self._points):
            q = self._points[key]
            while q and q[0][0] <= t - self.window:
                q.popleft()
            if not q:
                del self._points[key]

    def series(self, key: Key, field: int) -> list[float | None]:
        """field 1: packets/s, 2: new flows/s."""
        step = self.window / self.width
        start = self.now - self.window
        sums = [0.0] * self.width
        counts = [0] * self.width
        for p in self._points.get(key, ()):
            i = min(self.width - 1, int((p[0] - start) / step))
            if i >= 0:
                sums[i] += p[field]
                counts[i] += 1
        return [s / n if n else None for s, n in zip(sums, counts)]

    def spark(self, key: Key, field: int) -> str:
        return sparkline(self.series(key, field))


# -------------------------------------------------------------------------------- rendering


def si(x: float | None, integer: bool = False) -> str:
    """12 -> '12.0' (or '12'), 12345 -> '12.3k', 4.5e9 -> '4.5G'; None -> '-'."""
    if x is None:
        return "-"
    for above, unit, suffix in ((1e12, 1e12, "T"), (1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(x) >= above:
            return f"{x / unit:.1f}{suffix}"
    return f"{x:.0f}" if integer else f"{x:.1f}"


HEALTH_STYLE = {"up": "green", "down": "bold red", "unchecked": "dim"}
VERDICT_STYLE = {"tx": "green", "pass": "", "drop": "red", "abort": "red"}


def _header(interval: float, now: float | None, keys: bool) -> Text:
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    return Text(f"lbxdp top   interval {interval:g} s   {clock}" + ("   q quits" if keys else ""), style="bold")


def frame_view(f: Frame, history: History | None = None) -> RenderableType:
    """One instance: a title line, the connection table's use, VIPs and backends, verdicts."""
    where = f.interface + (f" (netns {f.netns})" if f.netns else "")
    state = f"{f.mode}, program id {f.prog_id}" if f.attached else "no XDP program attached"
    rate_note = f"rates over {f.seconds:.2f} s" if f.seconds else "rates after the next refresh"
    title = Text(f"{where}: {state}; {rate_note}", style="bold" if f.attached else "bold red")
    share = f.flow_entries / f.flow_capacity if f.flow_capacity else 0.0
    use = Text(f"connection table: {f.flow_entries} / {f.flow_capacity} entries"
               + (f" ({100 * share:.1f}%)" if f.flow_capacity else ""),
               style="bold red" if share >= 0.99 else "yellow" if share >= 0.9 else "")

    t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    t.add_column("VIP / backend", no_wrap=True)
    t.add_column("health", no_wrap=True)
    t.add_column("in table", justify="right", no_wrap=True)
    t.add_column("pkts/s", justify="right", no_wrap=True)
    if history is not None:
        t.add_column("pkts/s, 1 min", no_wrap=True, style="cyan")
    t.add_column("bits/s", justify="right", no_wrap=True)
    t.add_column("flows/s", justify="right", no_wrap=True)
    if history is not None:
        t.add_column("flows/s, 1 min", no_wrap=True, style="magenta")
    for h in ("packets", "bytes", "new flows"):
        t.add_column(h, justify="right", no_wrap=True)

    def add(label: Text, r: Row, key: Key | None, health: Text, table: Text) -> None:
        pps, fps = [si(r.pps)], [si(r.fps)]
        if history is not None:
            pps.append(history.spark(key, 1) if key else "")
            fps.append(history.spark(key, 2) if key else "")
        t.add_row(label, health, table, *pps, si(r.bps), *fps,
                  si(r.packets, True), si(r.bytes, True), si(r.new_flows, True))

    for v in f.vips:
        usable = any(b.in_table for b in v.backends)
        add(Text(f"{v.row.name}  {v.mode} {v.scheduler}".rstrip(), style="bold" if usable else "bold red"),
            v.row, (f.netns, f.interface, v.row.name), Text(""), Text("" if usable else "none", style="bold red"))
        for b in v.backends:
            health = b.health or "unchecked"
            add(Text("  " + b.name), b, (f.netns, f.interface, v.row.name, b.name),
                Text(health if health != "unchecked" else "-", style=HEALTH_STYLE.get(health, "")),
                Text("yes" if b.in_table else "NO", style="" if b.in_table else "yellow"))
    add(Text("total", style="bold"), f.total, None, Text(""), Text(""))

    reasons = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    reasons.add_column("verdict", no_wrap=True)
    reasons.add_column("reason", no_wrap=True)
    for h in ("pkts/s", "bits/s", "packets", "bytes"):
        reasons.add_column(h, justify="right", no_wrap=True)
    for r in f.reasons:
        if r.packets or r.pps:   # reasons never seen stay hidden; once seen, a row stays
            style = VERDICT_STYLE.get(r.verdict, "")
            if style == "red" and r.pps:
                style = "bold red"   # dropping now
            reasons.add_row(r.verdict, r.reason, si(r.pps), si(r.bps), si(r.packets, True), si(r.bytes, True),
                            style=style)
    return Group(title, use, Text(""), t, Text(""), reasons)


def view(fs: list[Frame], interval: float, now: float | None = None, keys: bool = False,
         history: History | None = None) -> RenderableType:
    """What one refresh shows (every instance), with sparklines if a history is given."""
    parts: list[RenderableType] = [_header(interval, now, keys)]
    for f in fs:
        parts += [Text(""), frame_view(f, history)]
    return Group(*parts)


def plain(renderable: RenderableType, width: int = 250) -> list[str]:
    """A renderable as lines of plain text (no escape sequences), trailing spaces removed."""
    from io import StringIO
    c = Console(file=StringIO(), width=width, color_system=None, force_terminal=False, highlight=False,
                emoji=False)
    c.print(renderable)
    return [ln.rstrip() for ln in c.file.getvalue().splitlines()]   # type: ignore[attr-defined]


def render(fs: list[Frame], interval: float, now: float | None = None, keys: bool = False,
           history: History | None = None) -> list[str]:
    """The plain text of one refresh, as lines without newlines."""
    return plain(view(fs, interval, now, keys, history))


# -------------------------------------------------------------------------------- terminal


class Quit(Exception):
    """SIGTERM/SIGHUP while the view runs: leave through the context managers like q does."""


QUIT_KEYS = (b"q", b"Q")


class Keys:
    """`fd` (the terminal's stdin) in cbreak mode while the view runs, so that q needs no Enter
    (Ctrl-C still raises SIGINT); __exit__ restores it. Without a terminal, wait() just sleeps."""

    def __init__(self, fd: int | None):
        self.fd = fd if fd is not None and os.isatty(fd) else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> "Keys":
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> bool:
        """Sleep `seconds`, or less if a quit key comes; True if the user asked to quit."""
        if self.fd is None:
            time.sleep(max(0.0, seconds))
            return False
        deadline = clock() + seconds
        while (left := deadline - clock()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                data = os.read(self.fd, 64)
                if not data or any(k in data for k in QUIT_KEYS):   # b'': the terminal hung up
                    return True
        return False


def terminal_size(out: TextIO) -> tuple[int, int]:
    """(columns, rows) of the terminal `out` writes to; 80x24 for a size never set (a bare pty).
    rich would ask the process' own stdin/stdout, which need not be `out`."""
    cols, rows = os.get_terminal_size(out.fileno())
    return cols or 80, rows or 24


def _on_quit_signals() -> Callable[[], None]:
    """Make SIGTERM, SIGHUP and SIGINT raise Quit (so the terminal is restored); returns the undo.
    SIGINT too, although Python raises KeyboardInterrupt for it by default: a process started with
    SIGINT ignored (from a script's background job, whose shell ignores it there) inherits that,
    and Python then leaves it ignored, so Ctrl-C on the view's terminal did nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: Any) -> None:
        raise Quit(signal.Signals(signum).name)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}

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


def _live(read: Read, interval: float, out: TextIO, keys: Keys) -> None:
    """The view on a terminal: rich's Live in the alternate screen, redrawn once per interval."""
    cols, rows = terminal_size(out)
    console = Console(file=out, force_terminal=True, width=cols, height=rows, highlight=False, emoji=False)
    history = History()
    with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as live:
        for fs in updates(read, interval, keys.wait):
            history.add(fs, time.monotonic())
            console.size = terminal_size(out)   # follow a resize
            live.update(view(fs, interval, keys=keys.fd is not None, history=history), refresh=True)


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
        with Keys(keys_fd if keys_fd is not None else _stdin_fd()) as keys:
            if out.isatty():
                _live(read, interval, out, keys)
                return
            history = History()
            for fs in updates(read, interval, keys.wait):   # not a terminal: frame after frame
                history.add(fs, time.monotonic())
                out.write("\n".join(render(fs, interval, history=history)) + "\n\n")
                out.flush()
    except (KeyboardInterrupt, Quit):
        pass
    finally:
        undo()
