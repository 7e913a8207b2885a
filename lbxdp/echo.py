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

Standard library only, so it starts fast and runs under any interpreter the rig picks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def _udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))  # replies from any other address are dropped by the kernel
    return s


def run_client(proto: str, host: str, port: int, count: int, timeout: float,
               try_timeout: float, payload: bytes, same_flow: bool) -> dict:
    """Make up to ``count`` attempts within ``timeout`` seconds; return the JSON-able summary."""
    names: Counter[str] = Counter()
    errors: list[str] = []
    failed = attempts = 0
    start = time.monotonic()
    deadline = start + timeout
    flow = _udp_socket(host, port) if proto == "udp" and same_flow else None
    held = contextlib.ExitStack()
    try:
        while attempts < count and time.monotonic() < deadline:
            attempts += 1
            budget = max(0.01, min(try_timeout, deadline - time.monotonic()))
            try:
                if proto == "tcp":
                    names[_tcp_once(host, port, budget, payload)] += 1
                elif flow is not None:
                    names[_udp_once(flow, budget, payload)] += 1
                else:
                    # A new flow each time: the socket stays open until the run ends, so the
                    # kernel cannot hand the next one the same source port (same 5-tuple).
                    s = held.enter_context(_udp_socket(host, port))
                    names[_udp_once(s, budget, payload)] += 1
            except (OSError, ValueError) as e:
                failed += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
    finally:
        held.close()
        if flow is not None:
            flow.close()
    return {"names": dict(names), "failed": failed, "attempts": attempts, "errors": errors,
            "elapsed": round(time.monotonic() - start, 3)}


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
        a = p.parse_args(argv[1:])
        if not 0 < a.count <= MAX_COUNT:
            p.error(f"--count must be in 1..{MAX_COUNT}")
        payload = a.payload.encode()
        if a.payload_size is not None:
            payload = (b"0123456789abcdef" * (a.payload_size // 16 + 1))[:a.payload_size]
        out = run_client(a.proto, a.host, a.port, a.count, a.timeout, a.try_timeout,
                         payload, a.same_flow)
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
