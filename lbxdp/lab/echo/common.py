"""What the echo programs share: exit cleanly on SIGTERM/SIGINT, a listening dual-stack TCP socket,
bounded command-line numbers."""

from __future__ import annotations

import argparse
import signal
import socket


def exit_on_signals() -> None:
    """SIGTERM and SIGINT end the program with status 0 (SystemExit, so `finally` blocks run)."""

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def tcp_listener(port: int, backlog: int) -> socket.socket:
    """TCP on ``::`` with IPV6_V6ONLY=0: v4 clients too, as ::ffff:a.b.c.d."""
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(backlog)
    return srv


def bounded(conv, lo: float, hi: float, *, above: bool = False):
    """An argparse type: conv(text) within [lo, hi] (within (lo, hi] if above), else a usage error."""
    def check(text: str):
        v = conv(text)
        if not (lo < v <= hi if above else lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if above else '['}{lo:g}, {hi:g}]")
        return v
    return check
