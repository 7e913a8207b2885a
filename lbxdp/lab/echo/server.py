"""A backend's echo server (one per backend namespace)::

    python -m lbxdp.lab.echo --name be1 --port 8080

TCP, dual stack (one socket on ``::`` with IPV6_V6ONLY=0): on connect the server sends
``<name>\\n`` at once, then echoes back every byte it receives until EOF, then closes. That serves
both "which backend am I on" and long-lived byte-exchange tests.
UDP, same port: each datagram is answered with ``<name> <datagram bytes>``, *from the address
the datagram was sent to* (see _UdpEndpoint: with DSR that address is the VIP on lo, not the
address of the interface the reply leaves by).
It prints one line, ``ready <name> <port>``, and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import struct
import threading

from .common import exit_on_signals, tcp_listener

# Linux value; Python 3.11's socket module does not export it.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


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

    exit_on_signals()
    bname = name.encode()
    tcp = tcp_listener(port, 512)
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lbxdp.lab.echo",
                                description="Backend echo server (TCP and UDP, IPv4 and IPv6).")
    p.add_argument("--name", required=True, help="what the server answers with, e.g. be1")
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args(argv)
    serve(a.name, a.port)
    return 0
