"""`lbxdp top` on a real attached balancer: rates while traffic flows, every VIP and backend shown,
and the live view on a real terminal (a pty) quits cleanly on q, Ctrl-C and SIGTERM.

lbxdp is attached (generic mode) through the real command (the `attached` fixture, conftest.py);
top runs as `python -m lbxdp --netns <lb> top ...`, like an operator would.
"""

from __future__ import annotations

import fcntl
import json
import os
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

from lbxdp import top
from lbxdp.lab.rig import FAILED, HOST_IF, LB, Rig


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


@pytest.mark.parametrize("how", ["q", "ctrl-c", "sigterm"])
def test_live_view_on_a_terminal_quits_cleanly(attached: Rig, pty_pair: tuple[int, int], how: str) -> None:
    rig, (master, slave) = attached, pty_pair
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(lbxdp_cmd(rig, "top", HOST_IF, "--interval", "0.3"), stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, preexec_fn=_controlling_tty)
    try:
        be = f"{rig.addr4(rig.backends[-1])}:{rig.spec.port}".encode()
        screen = read_until(master, be, 30)
        assert be in screen and top.ALT_SCREEN.encode() in screen, screen[-2000:]
        screen += read_until(master, b"rates over", 5)          # a frame with rates, too
        assert b"rates over" in screen
        if how == "q":
            os.write(master, b"q")
        elif how == "ctrl-c":
            os.write(master, b"\x03")                           # the line discipline sends SIGINT
        else:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        screen += read_until(master, top.MAIN_SCREEN.encode(), 2)
    finally:
        if proc.poll() is None:   # stop our child by its PID
            proc.kill()
            proc.wait(5)
    assert rc == 0, screen[-2000:]
    assert b"Traceback" not in screen, screen[-2000:]
    assert screen.endswith((top.SHOW_CURSOR + top.MAIN_SCREEN).encode()), screen[-200:]
    assert termios.tcgetattr(slave) == before                   # cbreak undone
