"""The echo client: counts which backend names answer (lbxdp.lab.traffic runs it in the client
namespace)::

    python -m lbxdp.lab.echo client tcp 10.112.0.10 8080 --count 100 --timeout 20
    python -m lbxdp.lab.echo client udp fd00:112::10 8080 --count 100 [--same-flow]
    python -m lbxdp.lab.echo client tcp 10.112.0.10 8080 --count 2 --payload-size 4000000

Makes at most --count attempts within --timeout seconds in all (each attempt bounded by
--try-timeout) and prints one JSON object: {"names": {name: count}, "failed": n, "attempts": n,
"errors": [first few error strings], "elapsed": seconds}. TCP: one fresh connection per attempt,
which reads the greeting and, if a payload is given, sends it and checks it comes back whole.
UDP: one fresh socket (so a new source port, a new flow for the balancer) per datagram, or one
socket for all with --same-flow; the socket is connect()ed, so a reply from any other address
than the one we sent to is dropped by the kernel and counts as a failure.

UDP with --sport-base B: attempt i (0-based) sends from source port B + i, so running the same
command again repeats the same 5-tuples; the output then also has "flows": {port: name} (name
null for a failed attempt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import time
from collections import Counter

from .common import bounded

MAX_COUNT = 100_000


def _tcp_once(host: str, port: int, timeout: float, payload: bytes) -> str:
    """One connection: read the greeting line; if payload, send it and expect it echoed back."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"EOF before greeting (got {buf!r})")
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        if payload:
            s.sendall(payload)
            while len(rest) < len(payload):
                s.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            if rest != payload:
                raise ValueError(f"echo mismatch: sent {len(payload)} bytes, got {len(rest)}")
        return line.decode(errors="replace").strip()


def _udp_once(sock: socket.socket, timeout: float, payload: bytes) -> str:
    sock.settimeout(timeout)
    sock.send(payload)
    reply = sock.recv(65535)
    name, sep, echoed = reply.partition(b" ")
    if not sep or echoed != payload:
        raise ValueError(f"bad reply {reply[:80]!r}")
    return name.decode(errors="replace")


def _udp_socket(host: str, port: int, sport: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if sport is not None:
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        s.connect((host, port))  # replies from any other address are dropped by the kernel
    except OSError:
        s.close()
        raise
    return s


def run_client(proto: str, host: str, port: int, count: int, timeout: float,
               try_timeout: float, payload: bytes, same_flow: bool,
               sport_base: int | None = None) -> dict:
    """Make up to ``count`` attempts within ``timeout`` seconds; return the JSON-able summary."""
    names: Counter[str] = Counter()
    flows: dict[int, str | None] = {}
    errors: list[str] = []
    failed = attempts = 0
    start = time.monotonic()
    deadline = start + timeout
    flow = _udp_socket(host, port, sport_base) if proto == "udp" and same_flow else None
    held = contextlib.ExitStack()
    try:
        while attempts < count and time.monotonic() < deadline:
            attempts += 1
            budget = max(0.01, min(try_timeout, deadline - time.monotonic()))
            sport = None if sport_base is None or flow is not None else sport_base + attempts - 1
            try:
                if proto == "tcp":
                    name = _tcp_once(host, port, budget, payload)
                elif flow is not None:
                    name = _udp_once(flow, budget, payload)
                else:
                    # A new flow each time: the socket stays open until the run ends, so the
                    # kernel cannot hand the next one the same source port (same 5-tuple).
                    s = held.enter_context(_udp_socket(host, port, sport))
                    name = _udp_once(s, budget, payload)
                names[name] += 1
            except (OSError, ValueError) as e:
                name = None
                failed += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
            if sport is not None:
                flows[sport] = name
    finally:
        held.close()
        if flow is not None:
            flow.close()
    out = {"names": dict(names), "failed": failed, "attempts": attempts, "errors": errors,
           "elapsed": round(time.monotonic() - start, 3)}
    if sport_base is not None and flow is None:
        out["flows"] = flows
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lbxdp.lab.echo client",
                                description="Count which backend names answer.")
    p.add_argument("proto", choices=["tcp", "udp"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=bounded(int, 1, MAX_COUNT), default=10, help="attempts, at most %d" % MAX_COUNT)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for all attempts")
    p.add_argument("--try-timeout", type=float, default=1.0, help="seconds per attempt")
    p.add_argument("--payload", default="ping", help="bytes sent (UDP) / echoed (TCP)")
    p.add_argument("--payload-size", type=int, default=None,
                   help="send this many generated (pseudo-random) bytes instead of --payload")
    p.add_argument("--same-flow", action="store_true", help="UDP: reuse one socket")
    p.add_argument("--sport-base", type=int, default=None, metavar="PORT",
                   help="UDP: attempt i sends from source port PORT + i (repeatable 5-tuples)")
    return p


def main(argv: list[str]) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.sport_base is not None:
        if a.proto != "udp":
            p.error("--sport-base is for udp only (TCP's TIME_WAIT would refuse the ports again)")
        if not (1024 <= a.sport_base and a.sport_base + a.count - 1 <= 65535):
            p.error("--sport-base: PORT .. PORT + count - 1 must lie in 1024..65535")
    payload = a.payload.encode()
    if a.payload_size is not None:
        # Pseudo-random, not a short repeating pattern: a segment delivered at the wrong offset
        # or a rewritten byte is a mismatch, never an accidental match.
        payload = random.Random(a.payload_size).randbytes(a.payload_size)
    out = run_client(a.proto, a.host, a.port, a.count, a.timeout, a.try_timeout,
                     payload, a.same_flow, a.sport_base)
    print(json.dumps(out))
    return 0
