"""`lbxdp top` on a real attached balancer: rates while traffic flows, every VIP and backend shown,
and the live view (rich, in the alternate screen) on a real terminal (a pty) draws sparklines of
live traffic and colours a backend set down, and quits cleanly on q, Ctrl-C and SIGTERM.

lbxdp is attached (generic mode) through the real command (the `attached` fixture, conftest.py);
top runs as `python -m lbxdp --netns <lb> top ...`, like an operator would.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Iterator

import pytest

from lbxdp.lab.rig import FAILED, HOST_IF, LB, Rig

# What rich's Live(screen=True) writes to enter and leave the view; its bold red and yellow.
ALT_SCREEN, MAIN_SCREEN = "\x1b[?1049h", "\x1b[?1049l"
SHOW_CURSOR = "\x1b[?25h"
BOLD_RED, YELLOW = "\x1b[1;31m", "\x1b[33m"
SPARK = re.compile("[▁▂▃▄▅▆▇█]+")
TERM_ENV = {**os.environ, "TERM": "xterm-256color"}   # a colour terminal, whatever runs the tests
TERM_ENV.pop("NO_COLOR", None)


def lbxdp_cmd(rig: Rig, *argv: str) -> list[str]:
    return [sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv]


def vip_labels(rig: Rig) -> set[str]:
    return {f"{rig.spec.vip4}:{rig.spec.port}/{p}" for p in ("tcp", "udp")} | \
           {f"[{rig.spec.vip6}]:{rig.spec.port}/{p}" for p in ("tcp", "udp")}


def backend_labels(rig: Rig, version: int) -> set[str]:
    if version == 4:
        return {f"{rig.addr4(r)}:{rig.spec.port}" for r in rig.backends}
    return {f"[{rig.addr6(r)}]:{rig.spec.port}" for r in rig.backends}


class Traffic:
    """UDP rounds to the v4 VIP from the client in a thread until stop() (at most 40 rounds of
    20 datagrams, and at most 60 s), so that top's interval falls inside the traffic."""

    def __init__(self, rig: Rig):
        self.rig, self.stopping, self.first = rig, threading.Event(), threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            for _ in range(40):
                if self.stopping.is_set() or time.monotonic() - t0 > 60:
                    break
                names = self.rig.udp_names(self.rig.spec.vip4, count=20, timeout=20)
                if names[FAILED]:
                    self.errors.append(f"{names[FAILED]} datagrams failed")
                self.sent += sum(names.values())
                self.first.set()
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(repr(e))
        finally:
            self.first.set()

    def __enter__(self) -> "Traffic":
        self.thread.start()
        assert self.first.wait(30), "no traffic round finished within 30 s"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "traffic thread did not stop"
        assert not self.errors, self.errors


def test_once_json_has_rates_while_traffic_flows(attached: Rig) -> None:
    rig = attached
    with Traffic(rig) as traffic:
        proc = subprocess.run(lbxdp_cmd(rig, "top", HOST_IF, "--once", "--interval", "1", "--json"),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert traffic.sent > 0
    (f,) = json.loads(proc.stdout)
    assert (f["interface"], f["netns"], f["attached"], f["mode"]) == (HOST_IF, rig.ns(LB), True, "generic")
    assert 0.9 <= f["seconds"] <= 5, f["seconds"]
    vips = {v["row"]["name"]: v for v in f["vips"]}
    assert set(vips) == vip_labels(rig)
    for name, v in vips.items():
        want = backend_labels(rig, 6 if name.startswith("[") else 4)
        assert {b["name"] for b in v["backends"]} == want, name
        assert all(b["in_table"] for b in v["backends"]), name
    udp = vips[f"{rig.spec.vip4}:{rig.spec.port}/udp"]
    assert udp["row"]["pps"] > 0 and udp["row"]["fps"] > 0 and udp["row"]["bps"] > 0, udp["row"]
    assert sum(b["fps"] > 0 for b in udp["backends"]) >= 2, udp["backends"]     # round robin
    assert f["total"]["pps"] >= udp["row"]["pps"]
    forward = next(r for r in f["reasons"] if (r["verdict"], r["reason"]) == ("tx", "forward"))
    assert forward["pps"] > 0 and forward["packets"] >= udp["row"]["packets"]


def test_once_text_without_ifname_shows_every_vip_and_backend(attached: Rig) -> None:
    rig = attached
    proc = subprocess.run(lbxdp_cmd(rig, "top", "--once", "--interval", "0.3"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{HOST_IF} (netns {rig.ns(LB)}): generic" in out, out
    for name in vip_labels(rig) | backend_labels(rig, 4) | backend_labels(rig, 6):
        assert name in out, f"{name} not in:\n{out}"
    assert "\x1b" not in out                                   # a pipe, not a terminal
    lines = out.splitlines()
    assert any(ln.startswith("total") for ln in lines) and any(ln.startswith("tx") for ln in lines), out


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    """A pty (master, slave) sized 50x160; both ends closed afterwards."""
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def read_until(fd: int, want: bytes, timeout: float) -> bytes:
    got, deadline = b"", time.monotonic() + timeout
    while want not in got and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            try:
                got += os.read(fd, 65536)
            except OSError:   # EIO: every slave end is closed
                break
    return got


def _controlling_tty() -> None:
    """In the child (after setsid): make its stdin, the pty slave, its controlling terminal, so
    that Ctrl-C typed on the master is SIGINT to it, as in a real terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _controlling_tty_sigint_ignored() -> None:
    """The same, started with SIGINT ignored, as a script's background job is (its shell ignores
    SIGINT there, and an ignored signal survives exec): Ctrl-C must still quit the view."""
    _controlling_tty()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("how", ["q", "ctrl-c", "ctrl-c, started with SIGINT ignored", "sigterm"])
def test_live_view_on_a_terminal_quits_cleanly(attached: Rig, pty_pair: tuple[int, int], how: str) -> None:
    rig, (master, slave) = attached, pty_pair
    before = termios.tcgetattr(slave)
    setup = _controlling_tty_sigint_ignored if "ignored" in how else _controlling_tty
    proc = subprocess.Popen(lbxdp_cmd(rig, "top", HOST_IF, "--interval", "0.3"), stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, preexec_fn=setup, env=TERM_ENV)
    try:
        be = f"{rig.addr4(rig.backends[-1])}:{rig.spec.port}".encode()
        screen = read_until(master, be, 30)
        assert be in screen and ALT_SCREEN.encode() in screen, screen[-2000:]
        screen += read_until(master, b"rates over", 5)          # a frame with rates, too
        assert b"rates over" in screen
        if how == "q":
            os.write(master, b"q")
        elif how.startswith("ctrl-c"):
            os.write(master, b"\x03")                           # the line discipline sends SIGINT
        else:
            proc.send_signal(signal.SIGTERM)
        # Keep reading, as a terminal does (a view writing to a full pty would block).
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            screen += read_until(master, b"\0", 0.2)
        rc = proc.wait(1)
        screen += read_until(master, MAIN_SCREEN.encode(), 2) if not screen.endswith(MAIN_SCREEN.encode()) else b""
    finally:
        if proc.poll() is None:   # stop our child by its PID
            proc.kill()
            proc.wait(5)
    assert rc == 0, screen[-2000:]
    assert b"Traceback" not in screen, screen[-2000:]
    assert screen.endswith((SHOW_CURSOR + MAIN_SCREEN).encode()), screen[-200:]
    assert termios.tcgetattr(slave) == before                   # cbreak undone


def test_live_view_draws_sparklines_of_live_traffic_and_a_down_backend_in_colour(
        attached: Rig, pty_pair: tuple[int, int]) -> None:
    """UDP to the v4 VIP while top runs on a terminal, with one of its backends set down
    (`lbxdp backend set-health ... down`, undone after): the VIP's and the backends' packets/s
    sparklines rise, the backend's health is bold red and its "NO" (out of the table) yellow."""
    rig, (master, slave) = attached, pty_pair
    vip = f"{rig.spec.vip4}:{rig.spec.port}/udp"
    down = f"{rig.addr4(rig.backends[0])}:{rig.spec.port}"
    health = lambda state: subprocess.run(lbxdp_cmd(rig, "backend", "set-health", vip, down, state),  # noqa: E731
                                          capture_output=True, text=True, timeout=60)
    set_down = health("down")
    assert set_down.returncode == 0, set_down.stderr
    proc = None
    try:
        with Traffic(rig):
            proc = subprocess.Popen(lbxdp_cmd(rig, "top", HOST_IF, "--interval", "0.3"), stdin=slave, stdout=slave,
                                    stderr=slave, start_new_session=True, preexec_fn=_controlling_tty, env=TERM_ENV)
            screen, deadline = b"", time.monotonic() + 30
            while time.monotonic() < deadline:   # until a frame shows a sparkline that rose
                screen += read_until(master, b"rates over", 2)
                if any(len(set(s)) > 1 for s in SPARK.findall(screen.decode(errors="replace"))):
                    break
            proc.send_signal(signal.SIGTERM)
            # Keep reading, as a terminal does (a view writing to a full pty would block).
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            screen += read_until(master, b"\0", 0.2)
        rc = proc.wait(1)
        screen += read_until(master, MAIN_SCREEN.encode(), 2) if not screen.endswith(MAIN_SCREEN.encode()) else b""
    finally:
        if proc is not None and proc.poll() is None:   # stop our child by its PID
            proc.kill()
            proc.wait(5)
        restored = health("auto")
    assert restored.returncode == 0, restored.stderr
    assert rc == 0, screen[-2000:]
    text = screen.decode(errors="replace")
    assert "pkts/s, 1 min" in text and "flows/s, 1 min" in text, text[-3000:]
    sparks = SPARK.findall(text)
    assert any(len(set(s)) > 1 for s in sparks), sparks[-8:]           # traffic drawn as it grew
    assert BOLD_RED + "down" in text, re.findall(re.escape(down) + ".{0,80}", text)[-4:]   # the backend set down
    assert re.search(re.escape(YELLOW) + " *NO", text), text[-3000:]     # and out of the table (right-justified)
    assert screen.endswith((SHOW_CURSOR + MAIN_SCREEN).encode()), screen[-200:]
