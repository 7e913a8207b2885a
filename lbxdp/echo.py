"""Backend echo server and test client for the namespace rig (lbxdp.rig).

Server (one per backend namespace)::

    python -m lbxdp.echo --name be1 --port 8080

  TCP, dual stack (one socket on ``::`` with IPV6_V6ONLY=0): on connect the server sends
  ``<name>\\n`` at once, then echoes back every byte it receives until EOF, then closes. That serves
  both "which backend am I on" and long-lived byte-exchange tests.
  UDP, same port: each datagram is answered with ``<name> <datagram bytes>``, *from the address
  the datagram was sent to* (see _UdpEndpoint: with DSR that address is the VIP on lo, not the
  address of the interface the reply leaves by).
  It prints one line, ``ready <name> <port>``, and exits 0 on SIGTERM or SIGINT.

Client (run inside the client namespace by lbxdp.rig.Rig.tcp_names/udp_names)::

    python -m lbxdp.echo client tcp 10.112.0.10 8080 --count 100 --timeout 20
    python -m lbxdp.echo client udp fd00:112::10 8080 --count 100 [--same-flow]
    python -m lbxdp.echo client tcp 10.112.0.10 8080 --count 2 --payload-size 4000000

  Makes at most --count attempts within --timeout seconds in all (each attempt bounded by
  --try-timeout) and prints one JSON object: {"names": {name: count}, "failed": n, "attempts": n,
  "errors": [first few error strings], "elapsed": seconds}. TCP: one fresh connection per attempt,
  which reads the greeting and, if a payload is given, sends it and checks it comes back whole.
  UDP: one fresh socket (so a new source port, a new flow for the balancer) per datagram, or one
  socket for all with --same-flow; the socket is connect()ed, so a reply from any other address
  than the one we sent to is dropped by the kernel and counts as a failure.

Long-lived connections (lbxdp.rig.Rig.hold)::

    python -m lbxdp.echo hold tcp 10.112.0.10 8080 --conns 200 --interval 0.05 --duration 60 \\
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

HTTP health-check target (tests/netns/test_health.py runs one per backend)::

    python -m lbxdp.echo http --name be1 --port 8081 --status-file /run/x/be1.status

  Answers every request (one per connection, head read up to 8 KiB within 2 s) with
  ``HTTP/1.1 <code>`` and the body ``<name> <code>``, then closes. The code is re-read from the
  status file for each request (200 if the file is missing or holds no code), so a test turns
  a backend's health check red by writing ``500`` there. It prints ``ready http <name> <port>``.

UDP with --sport-base B: attempt i (0-based) sends from source port B + i, so running the same
command again repeats the same 5-tuples; the output then also has "flows": {port: name} (name
null for a failed attempt).

Standard library only, so it starts fast and runs under any interpreter the rig picks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter

# Linux value; Python 3.11's socket module does not export it.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
MAX_COUNT = 100_000
MAX_CONNS = 5_000
MAX_DURATION = 3_600.0


# --------------------------------------------------------------------------------------------
# server


def _serve_tcp_conn(conn: socket.socket, name: bytes) -> None:
    """Greet with the name, then echo until EOF. One thread per connection."""
    with conn:
        try:
            conn.sendall(name + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass  # peer reset or vanished: nothing to report to anyone


class _UdpEndpoint:
    """A UDP socket that answers each datagram from the address it was sent to.

    A socket bound to the wildcard address lets the kernel pick the reply's source address by
    routing, which here is the backend's eth0 address. With direct server return the client sent
    to the VIP (which the backend holds on lo), so such a reply comes from the wrong address and
    the client's connected socket drops it. IP_PKTINFO / IPV6_RECVPKTINFO tell us the destination
    of each datagram; handing it back in the reply's control message makes it the source.
    The two families use two sockets (the v6 one V6ONLY) because mixing v4 control messages on a
    dual-stack v6 socket is harder to read than a second socket.
    """

    def __init__(self, family: int, port: int, name: bytes) -> None:
        self.family = family
        self.name = name
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            self.sock.bind(("::", port))
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.sock.bind(("0.0.0.0", port))

    def handle(self) -> None:
        try:
            data, anc, _flags, peer = self.sock.recvmsg(65535, socket.CMSG_SPACE(64))
        except OSError:
            return
        cmsgs = []
        for level, ctype, cdata in anc:
            if level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
                # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: on send,
                # spec_dst is the source; ifindex 0 lets routing pick the interface.
                _ifindex, _spec_dst, dst = struct.unpack("=i4s4s", cdata[:12])
                cmsgs.append((level, ctype, struct.pack("=i4s4s", 0, dst, bytes(4))))
            elif level == socket.IPPROTO_IPV6 and ctype == socket.IPV6_PKTINFO:
                # struct in6_pktinfo {in6_addr addr; unsigned ifindex}
                dst, _ifindex = struct.unpack("=16sI", cdata[:20])
                cmsgs.append((level, ctype, struct.pack("=16sI", dst, 0)))
        try:
            self.sock.sendmsg([self.name + b" " + data], cmsgs, 0, peer)
        except OSError:
            pass


def serve(name: str, port: int) -> None:
    """Serve TCP and UDP on ``port`` (both families) until SIGTERM/SIGINT."""

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bname = name.encode()

    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 clients too, as ::ffff:a.b.c.d
    tcp.bind(("::", port))
    tcp.listen(512)
    udps = [_UdpEndpoint(socket.AF_INET, port, bname), _UdpEndpoint(socket.AF_INET6, port, bname)]

    sel = selectors.DefaultSelector()
    sel.register(tcp, selectors.EVENT_READ, None)
    for u in udps:
        sel.register(u.sock, selectors.EVENT_READ, u)
    print(f"ready {name} {port}", flush=True)
    try:
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    try:
                        conn, _ = tcp.accept()
                    except OSError:
                        continue
                    threading.Thread(target=_serve_tcp_conn, args=(conn, bname), daemon=True).start()
                else:
                    key.data.handle()
    finally:
        sel.close()
        tcp.close()
        for u in udps:
            u.sock.close()


# --------------------------------------------------------------------------------------------
# client


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


# --------------------------------------------------------------------------------------------
# hold: long-lived connections


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


# --------------------------------------------------------------------------------------------
# http: a health-check target whose answer a test can change


HTTP_MAX_REQUEST = 8192


def http_status(status_file: str | None) -> int:
    """The status to answer with now: the integer in status_file (re-read per request), 200 if
    there is no file or it holds no code in 100..599."""
    if not status_file:
        return 200
    try:
        with open(status_file) as f:
            code = int(f.read().strip())
    except (OSError, ValueError):
        return 200
    return code if 100 <= code <= 599 else 200


def _serve_http_conn(conn: socket.socket, name: str, status_file: str | None) -> None:
    """Read one request head (bounded in size and time), answer it, close."""
    with conn:
        try:
            conn.settimeout(2.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < HTTP_MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            code = http_status(status_file)
            try:
                phrase = http.HTTPStatus(code).phrase
            except ValueError:
                phrase = "Status"
            body = f"{name} {code}\n".encode()
            conn.sendall(f"HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:
            pass


def serve_http(name: str, port: int, status_file: str | None) -> None:
    """Answer every HTTP request on ``port`` (TCP, both families) with the status in status_file
    (see http_status) and the body ``<name> <code>``, one thread per connection, until SIGTERM/SIGINT."""

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(128)
    print(f"ready http {name} {port}", flush=True)
    with srv:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_serve_http_conn, args=(conn, name, status_file), daemon=True).start()


def http_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lbxdp.echo http",
                                description="A minimal HTTP/1.1 responder (a health-check target): "
                                "every request gets the status code read from --status-file.")
    p.add_argument("--name", required=True, help="put in every response body, e.g. be1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--status-file", help="holds the status code to answer with (re-read per request; "
                   "default and fallback 200)")
    a = p.parse_args(argv)
    serve_http(a.name, a.port, a.status_file)
    return 0


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["http"]:
        return http_main(argv[1:])
    if argv[:1] == ["client"]:
        p = argparse.ArgumentParser(prog="python -m lbxdp.echo client",
                                    description="Count which backend names answer.")
        p.add_argument("proto", choices=["tcp", "udp"])
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--count", type=int, default=10, help="attempts, at most %d" % MAX_COUNT)
        p.add_argument("--timeout", type=float, default=30.0, help="seconds for all attempts")
        p.add_argument("--try-timeout", type=float, default=1.0, help="seconds per attempt")
        p.add_argument("--payload", default="ping", help="bytes sent (UDP) / echoed (TCP)")
        p.add_argument("--payload-size", type=int, default=None,
                       help="send this many generated bytes instead of --payload (bulk TCP)")
        p.add_argument("--same-flow", action="store_true", help="UDP: reuse one socket")
        p.add_argument("--sport-base", type=int, default=None, metavar="PORT",
                       help="UDP: attempt i sends from source port PORT + i (repeatable 5-tuples)")
        a = p.parse_args(argv[1:])
        if not 0 < a.count <= MAX_COUNT:
            p.error(f"--count must be in 1..{MAX_COUNT}")
        if a.sport_base is not None:
            if a.proto != "udp":
                p.error("--sport-base is for udp only (TCP's TIME_WAIT would refuse the ports again)")
            if not (1024 <= a.sport_base and a.sport_base + a.count - 1 <= 65535):
                p.error("--sport-base: PORT .. PORT + count - 1 must lie in 1024..65535")
        payload = a.payload.encode()
        if a.payload_size is not None:
            payload = (b"0123456789abcdef" * (a.payload_size // 16 + 1))[:a.payload_size]
        out = run_client(a.proto, a.host, a.port, a.count, a.timeout, a.try_timeout,
                         payload, a.same_flow, a.sport_base)
        print(json.dumps(out))
        return 0
    if argv[:1] == ["hold"]:
        p = argparse.ArgumentParser(prog="python -m lbxdp.echo hold",
                                    description="Hold long-lived TCP connections and exchange numbered "
                                    "lines on each until a stop file appears.")
        p.add_argument("proto", choices=["tcp"])
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--conns", type=int, default=10, help="connections, at most %d" % MAX_CONNS)
        p.add_argument("--interval", type=float, default=0.05, help="seconds between sweeps")
        p.add_argument("--duration", type=float, default=60.0,
                       help="seconds in all (connecting included), at most %d" % MAX_DURATION)
        p.add_argument("--stop-file", help="once this file appears, make one last sweep and stop")
        p.add_argument("--ready-file", help="written (JSON) once every connection is open")
        p.add_argument("--try-timeout", type=float, default=2.0,
                       help="seconds for one connect + greeting, or one echo")
        a = p.parse_args(argv[1:])
        if not 0 < a.conns <= MAX_CONNS:
            p.error(f"--conns must be in 1..{MAX_CONNS}")
        if not 0 < a.duration <= MAX_DURATION:
            p.error(f"--duration must be in (0, {MAX_DURATION:.0f}]")
        if not 0 <= a.interval <= 60 or not 0 < a.try_timeout <= 60:
            p.error("--interval must be in 0..60 and --try-timeout in (0, 60]")
        out = run_hold(a.host, a.port, a.conns, a.interval, a.duration, a.stop_file, a.ready_file,
                       a.try_timeout)
        print(json.dumps(out))
        return 0
    p = argparse.ArgumentParser(prog="python -m lbxdp.echo",
                                description="Backend echo server (TCP and UDP, IPv4 and IPv6).")
    p.add_argument("--name", required=True, help="what the server answers with, e.g. be1")
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args(argv)
    serve(a.name, a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
