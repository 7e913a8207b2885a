"""lbxdp.top without a kernel: rates from fake control.status() reads, the text, the loops.

The reads are the typed values control.status() returns (lbxdp.view.InstanceStatus), built by
status() below; rates are checked exactly (integers over a 2 s interval).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import sys
import termios
import threading
import time

import pytest

from lbxdp import cli as cli_mod
from lbxdp import top
from lbxdp.abi import Reason
from lbxdp.maps import Stats
from lbxdp.view import (UNCHECKED_HEALTH, AttachRecord, BackendStatus, Health, InstanceStatus, ReasonCount, VipStatus,
                        Xdp)

VIP, VIP6 = "10.112.0.10:8080/tcp", "[fd00:112::10]:8080/udp"
# What rich's Live(screen=True) writes to enter and leave the view, and its bold red.
ALT_SCREEN, MAIN_SCREEN = "\x1b[?1049h", "\x1b[?1049l"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
BOLD_RED = "\x1b[1;31m"
RISING = re.compile("[▁▂▃▄▅▆▇]+█")   # a sparkline of growing traffic (within its first 3 s bucket or two)
BE1, BE2, BE6 = "10.111.0.11:8080", "10.111.0.12:8080", "[fd00:111::11]:8080"


def status(vip: tuple[int, int, int], be1: tuple[int, int, int], be2: tuple[int, int, int],
           vip6: tuple[int, int, int] | None = None, forward: int = 0, not_vip: int = 0,
           entries: int = 0, in_table2: bool = True, iface: str = "eth0", drops: int = 0,
           health1: Health = UNCHECKED_HEALTH) -> InstanceStatus:
    """A control.status() value: counters are (packets, bytes, new_flows)."""
    vips = [VipStatus(VIP, Stats(*vip), (
        BackendStatus(BE1, Stats(*be1), True, 0, "02:00:00:00:00:11", health=health1),
        BackendStatus(BE2, Stats(*be2), in_table2, 1, "02:00:00:00:00:12")), 0, "dsr", "rr")]
    if vip6 is not None:
        vips.append(VipStatus(VIP6, Stats(*vip6), (BackendStatus(BE6, Stats(*vip6), True, 2, "02:00:00:00:00:11"),),
                              1, "dsr", "hash"))
    return InstanceStatus(iface, None, "/sys/fs/bpf/lbxdp/" + iface, Xdp(True, 42, "generic"), AttachRecord(),
                          tuple(vips), (ReasonCount(Reason.TX_FORWARD, forward, forward * 100),
                                        ReasonCount(Reason.PASS_NOT_VIP, not_vip, not_vip * 60),
                                        ReasonCount(Reason.DROP_NO_BACKEND, drops, drops * 60)), entries, 65536)


A = status(vip=(100, 10_000, 10), be1=(60, 6_000, 6), be2=(40, 4_000, 4), forward=100, not_vip=5, entries=10)
B = status(vip=(300, 30_000, 30), be1=(160, 16_000, 16), be2=(140, 14_000, 14), forward=300, not_vip=5,
           entries=30)


def test_rates_are_increase_over_seconds_and_bits_are_bytes_times_8() -> None:
    f = top.rates(A, B, 2.0)
    (v,) = f.vips
    assert (v.row.pps, v.row.bps, v.row.fps) == (100.0, 80_000.0, 10.0)
    assert (v.row.packets, v.row.bytes, v.row.new_flows) == (300, 30_000, 30)
    be1, be2 = v.backends
    assert (be1.name, be1.pps, be1.bps, be1.fps, be1.in_table) == (BE1, 50.0, 40_000.0, 5.0, True)
    assert (be2.name, be2.pps, be2.bps, be2.fps) == (BE2, 50.0, 40_000.0, 5.0)
    assert (v.mode, v.scheduler) == ("dsr", "rr")
    assert (f.seconds, f.flow_entries, f.flow_capacity, f.mode, f.prog_id) == (2.0, 30, 65536, "generic", 42)


def test_totals_sum_the_vips() -> None:
    a = status((100, 1_000, 10), (100, 1_000, 10), (0, 0, 0), vip6=(10, 500, 10))
    b = status((150, 1_500, 20), (150, 1_500, 20), (0, 0, 0), vip6=(30, 1_500, 12))
    t = top.rates(a, b, 1.0).total
    assert (t.packets, t.bytes, t.new_flows) == (180, 3_000, 32)
    assert (t.pps, t.bps, t.fps) == (70.0, 12_000.0, 12.0)


def test_reasons_have_rates_by_verdict_and_reason() -> None:
    got = {(r.verdict, r.reason): (r.packets, r.pps, r.bps) for r in top.rates(A, B, 2.0).reasons}
    assert got == {("tx", "forward"): (300, 100.0, 8 * 100 * 100.0),
                   ("pass", "not_vip"): (5, 0.0, 0.0),
                   ("drop", "no_backend"): (0, 0.0, 0.0)}


def test_a_counter_that_went_down_restarted_from_zero() -> None:
    after_reattach = status(vip=(20, 2_000, 2), be1=(20, 2_000, 2), be2=(0, 0, 0))
    v = top.rates(B, after_reattach, 2.0).vips[0]
    assert (v.row.pps, v.row.fps) == (10.0, 1.0)      # increase 20, not 20 - 300
    assert v.backends[1].pps == 0.0
    assert top.increase(5, 3) == 3 and top.increase(3, 5) == 2 and top.increase(None, 5) is None


def test_rows_missing_from_the_first_read_have_no_rate_yet() -> None:
    b = status(vip=(300, 30_000, 30), be1=(160, 16_000, 16), be2=(140, 14_000, 14), vip6=(9, 900, 9))
    f = top.rates(A, b, 2.0)
    assert f.vips[0].row.pps == 100.0
    assert (f.vips[1].row.pps, f.vips[1].row.bps, f.vips[1].backends[0].fps) == (None, None, None)
    assert f.total.pps == 100.0                  # the known rates only
    first = top.rates(None, b, 0.0)
    assert first.seconds == 0.0 and first.total.pps is None and first.vips[0].row.packets == 300
    assert all(r.pps is None for r in first.reasons)
    assert top.rates(A, B, 0.0).vips[0].row.pps is None   # no time between reads: no rate


def test_frames_match_instances_by_namespace_and_interface() -> None:
    eth1_a = status((0, 0, 0), (0, 0, 0), (0, 0, 0), iface="eth1")
    eth1_b = status((10, 100, 1), (10, 100, 1), (0, 0, 0), iface="eth1")
    fs = top.frames([eth1_a, A], [B, eth1_b], 1.0)
    assert [(f.interface, f.vips[0].row.pps) for f in fs] == [("eth0", 200.0), ("eth1", 10.0)]


def test_in_table_flag_and_render_show_every_vip_backend_and_seen_reason() -> None:
    b = status(vip=(300, 30_000, 30), be1=(160, 16_000, 16), be2=(140, 14_000, 14), vip6=(9, 900, 9),
               forward=300, not_vip=5, entries=30, in_table2=False)
    f = top.rates(A, b, 2.0)
    assert f.vips[0].backends[1].in_table is False
    text = "\n".join(top.render([f], 2.0, now=0))
    for name in (VIP, VIP6, BE1, BE2, BE6, "total", "forward", "not_vip", "30 / 65536"):
        assert name in text, name
    assert "no_backend" not in text                        # never seen: hidden
    line = next(ln for ln in text.splitlines() if BE2 in ln)
    assert line.split()[1:6] == ["-", "NO", "50.0", "40.0k", "5.0"], line      # unchecked, out of the table
    line = next(ln for ln in text.splitlines() if ln.startswith("total"))
    assert line.split()[1:4] == ["100.0", "80.0k", "10.0"], line


@pytest.mark.parametrize("x, integer, want", [
    (None, False, "-"), (0, False, "0.0"), (12, True, "12"), (9999, True, "9999"),
    (12_345, False, "12.3k"), (4.5e6, False, "4.5M"), (4.5e9, True, "4.5G"), (2e12, False, "2.0T")])
def test_si(x: float | None, integer: bool, want: str) -> None:
    assert top.si(x, integer) == want


@pytest.mark.parametrize("values, want", [
    ([0, 1, 2, 3, 4, 5, 6, 7], "▁▂▃▄▅▆▇█"), ([None, 0, 0.01, 100], " ▁▂█"), ([0, 0], "▁▁"), ([None], " "),
    ([5, 5], "██")])
def test_sparkline_scales_to_the_largest_and_shows_any_traffic_above_zero(values: list, want: str) -> None:
    assert top.sparkline(values) == want


def test_history_keeps_the_last_minute_in_fixed_buckets_per_vip_and_backend() -> None:
    h = top.History(window=60.0, width=20)               # 3 s buckets
    for i in range(100):                                 # 100 s of one read per second, rates rising
        a = status(vip=(i * i, 0, i), be1=(i * i, 0, i), be2=(0, 0, 0))
        b = status(vip=((i + 1) ** 2, 0, i + 1), be1=((i + 1) ** 2, 0, i + 1), be2=(0, 0, 0))
        h.add(top.frames([a], [b], 1.0), float(i))
    key = (None, "eth0", VIP)
    pps = h.series(key, 1)
    assert len(pps) == 20 and None not in pps            # every bucket of the minute has samples
    assert pps == sorted(pps) and pps[-1] > pps[0]       # rising: the last minute only (40..99 s)
    assert min(p[1] for p in h._points[key]) == 2 * 40 + 1
    assert h.series(key, 2) == [1.0] * 20                # one new flow per second throughout
    assert h.spark(key + (BE2,), 1) == "▁" * 20          # a backend without traffic
    assert h.spark((None, "eth0", VIP6), 1) == " " * 20  # never seen
    h.add([], 1000.0)                                    # a minute without a frame forgets the rows
    assert h._points == {}


class FakeClock:
    """A clock that only moves when sleep() is called; reads take no time."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_once_reads_twice_one_interval_apart() -> None:
    reads = iter([[A], [B]])
    clock = FakeClock()
    (f,) = top.once(lambda: next(reads), 2.0, sleep=clock.sleep, clock=clock)
    assert f.seconds == 2.0 and f.vips[0].row.pps == 100.0


def test_updates_gives_counters_first_then_a_frame_per_interval_until_quit() -> None:
    reads = iter([[A], [B], [B]])
    clock = FakeClock()
    waits: list[float] = []

    def wait(s: float) -> bool:
        waits.append(s)
        clock.sleep(s)
        return len(waits) > 2
    got = [fs[0] for fs in top.updates(lambda: next(reads), 2.0, wait, clock)]
    assert [f.seconds for f in got] == [0.0, 2.0, 2.0]
    assert [f.vips[0].row.pps for f in got] == [None, 100.0, 0.0]
    assert waits == [2.0, 2.0, 2.0]


def test_run_once_prints_text_or_json() -> None:
    for as_json in (False, True):
        reads = iter([[A], [B]])
        out = io.StringIO()
        top.run(lambda: next(reads), 0.01, once_=True, as_json=as_json, out=out)
        if as_json:
            (f,) = json.loads(out.getvalue())
            assert f["interface"] == "eth0" and f["vips"][0]["backends"][0]["name"] == BE1
            assert f["vips"][0]["row"]["pps"] > 0
            # The rows as before, backends with their health added (vips and totals: null).
            assert set(f["vips"][0]["backends"][0]) == {"name", "packets", "bytes", "new_flows", "pps", "bps",
                                                        "fps", "in_table", "health"}
            assert f["vips"][0]["backends"][0]["health"] == "unchecked" and f["total"]["health"] is None
        else:
            assert VIP in out.getvalue() and BE2 in out.getvalue()
            assert "\x1b" not in out.getvalue()          # not a terminal: no escape sequences


def read_until(fd: int, want: bytes, timeout: float) -> bytes:
    """What `fd` gives within `timeout` seconds, stopping early once `want` was seen."""
    got, deadline = b"", time.monotonic() + timeout
    while want not in got and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 65536)
    return got


class Drain(threading.Thread):
    """Reads a pty master into a bytearray while the block runs (and what is left after it)."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.got, self.done = fd, bytearray(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if select.select([self.fd], [], [], 0.05)[0]:
                self.got += os.read(self.fd, 65536)

    def __enter__(self) -> bytearray:
        self.start()
        return self.got

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)
        while select.select([self.fd], [], [], 0.2)[0]:
            self.got += os.read(self.fd, 65536)


def growing(n: int) -> InstanceStatus:
    """The n-th read of a balancer whose traffic grows (so the sparklines rise), with BE1 down
    by its health check and no_backend drops."""
    return status(vip=(100 * n * n, 10_000 * n * n, 10 * n * n), be1=(60 * n * n, 6_000 * n * n, 6 * n * n),
                  be2=(40 * n * n, 4_000 * n * n, 4 * n * n), forward=100 * n * n, drops=5 * n, entries=10,
                  health1=Health("down", passing=False))


def test_live_view_on_a_terminal_draws_colour_and_sparklines_quits_on_q_and_restores_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rich Live view on a real pty: alternate screen, hidden cursor and cbreak while it
    runs, all undone after q; the down backend in bold red, the drops in bold red, sparklines."""
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        before = termios.tcgetattr(slave)
        out = open(os.dup(slave), "w", encoding="utf-8")
        reads: list[int] = []
        result: list[BaseException | None] = []

        def read() -> list[InstanceStatus]:
            reads.append(1)
            return [growing(len(reads))]

        def go() -> None:
            try:
                top.run(read, 0.05, out=out, keys_fd=slave)
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - reported by the assert below
                result.append(e)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        screen = read_until(master, b"rates over", 5)
        deadline = time.monotonic() + 5               # a few frames: the sparklines rise
        while not RISING.search(screen.decode(errors="replace")) and time.monotonic() < deadline:
            screen += read_until(master, b"rates over", 1)
        assert BE2.encode() in screen, screen[-3000:]     # a frame was drawn
        assert not termios.tcgetattr(slave)[3] & termios.ICANON   # cbreak while it runs
        os.write(master, b"q")
        t.join(5)
        assert not t.is_alive(), "top did not quit on q"
        assert result == [None]
        out.close()
        screen += read_until(master, MAIN_SCREEN.encode(), 2)   # the rest of what it wrote
        assert screen.startswith(ALT_SCREEN.encode()) and HIDE_CURSOR.encode() in screen[:100]
        assert screen.endswith((SHOW_CURSOR + MAIN_SCREEN).encode())
        assert termios.tcgetattr(slave) == before       # cbreak undone
        text = screen.decode()
        assert BOLD_RED + "down" in text, re.findall(".{20}down.{5}", text)[:3]   # BE1 health
        assert BOLD_RED + "drop" in text and BOLD_RED + "no_backend" in text, "drops now: bold red"
        assert RISING.search(text), re.findall("[▁▂▃▄▅▆▇█]+", text)[-5:]
    finally:
        os.close(master)
        os.close(slave)


def test_live_json_is_one_line_per_interval_and_ctrl_c_ends_it_cleanly() -> None:
    reads = iter([[A], [B], [B]])

    def read() -> list[InstanceStatus]:
        try:
            return next(reads)
        except StopIteration:
            raise KeyboardInterrupt from None
    out = io.StringIO()
    top.run(read, 0.01, as_json=True, out=out)         # returns: Ctrl-C is a normal way out
    lines = out.getvalue().splitlines()
    assert [json.loads(ln)[0]["vips"][0]["row"]["new_flows"] for ln in lines] == [30, 30]


def test_an_error_while_reading_restores_the_terminal_and_propagates() -> None:
    from lbxdp.errors import LbxError
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        calls = []

        def read() -> list[InstanceStatus]:
            calls.append(1)
            if len(calls) > 1:
                raise LbxError("lbxdp is not attached to eth0")
            return [A]
        with open(os.dup(slave), "w", encoding="utf-8") as out, Drain(master) as screen:
            with pytest.raises(LbxError):   # (a pty nobody reads would block top's writes)
                top.run(read, 0.01, out=out, keys_fd=slave)
        assert BE2.encode() in screen                    # the first frame was drawn
        assert screen.endswith((SHOW_CURSOR + MAIN_SCREEN).encode())
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_cli_top_refuses_without_root(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["lbxdp", "top", "eth0", "--once"])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "needs root" in err and "sudo lbxdp top eth0 --once" in err and "Traceback" not in err
