"""A QUIC server and client for the lab (issue 13: QUIC connection-ID routing), on aioquic's
sans-I/O QuicConnection (PyPI `aioquic`, a test extra; imported only here).

Server: `python -m lbxdp.lab.echo quic-server --name be1 --server-id 1 --addr VIP --port P
--cert C --key K` answers every stream with its name ("be1\\n") and ends the stream. Every
connection ID it issues (the first one and those sent in NEW_CONNECTION_ID frames) carries the
server id in bytes 1-2, network order, as lbxdp's bpf/quic.h reads it: byte 0 and bytes 3.. are
random. aioquic has no hook for CID generation, so ServerIdConnection rewrites the first host CID
right after QuicConnection.__init__ (before anything is sent) and overrides
_replenish_connection_ids; server_id_of() lets a caller check the result.

Client: QuicClient (used in-process by tests, with a socket factory that opens UDP sockets in the
client namespace) asks for a name on a new stream; migrate() moves the connection to a new socket
(new source port) and switches to a fresh peer connection ID, as a client behind a NAT rebinding does.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import ssl
import sys
import time
from typing import Callable

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.packet import pull_quic_header
from aioquic.buffer import Buffer

ALPN = "lbxdp-echo"
CID_LEN = 8


def make_cid(server_id: int) -> bytes:
    """A CID_LEN-byte connection ID with `server_id` in bytes 1-2."""
    raw = bytearray(os.urandom(CID_LEN))
    raw[1:3] = server_id.to_bytes(2, "big")
    return bytes(raw)


def server_id_of(cid: bytes) -> int:
    return int.from_bytes(cid[1:3], "big")


class ServerIdConnection(QuicConnection):
    """A server-side QuicConnection whose host connection IDs carry `server_id` (see module doc)."""

    def __init__(self, *, server_id: int, **kw) -> None:
        self.server_id = server_id
        super().__init__(**kw)
        first = self._host_cids[0]
        first.cid = make_cid(server_id)
        self.host_cid = first.cid
        self._local_initial_source_connection_id = first.cid

    def _replenish_connection_ids(self) -> None:
        while len(self._host_cids) < min(8, self._remote_active_connection_id_limit):
            self._host_cids.append(QuicConnectionId(cid=make_cid(self.server_id),
                                                    sequence_number=self._host_cid_seq,
                                                    stateless_reset_token=os.urandom(16)))
            self._host_cid_seq += 1


def _flush(conn: QuicConnection, sock: socket.socket) -> None:
    for data, addr in conn.datagrams_to_send(now=time.monotonic()):
        sock.sendto(data, addr)


def serve(name: str, server_id: int, addr: str, port: int, cert: str, key: str) -> int:
    cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], connection_id_length=CID_LEN)
    cfg.load_cert_chain(cert, key)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, port))  # the VIP: DSR answers must come from it
    by_cid: dict[bytes, ServerIdConnection] = {}
    print(f"quic server {name} id {server_id} on {addr}:{port}", flush=True)
    answer = f"{name}\n".encode()
    while True:
        now = time.monotonic()
        timers = [t for t in (c.get_timer() for c in set(by_cid.values())) if t is not None]
        wait = max(0.0, min(timers) - now) if timers else 1.0
        ready, _, _ = select.select([sock], [], [], min(wait, 1.0))
        if ready:
            data, peer = sock.recvfrom(65536)
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LEN)
            except ValueError:
                continue
            conn = by_cid.get(header.destination_cid)
            if conn is None:
                if header.packet_type is None or header.packet_type.name != "INITIAL":
                    continue
                conn = ServerIdConnection(server_id=server_id, configuration=cfg,
                                          original_destination_connection_id=header.destination_cid)
                by_cid[header.destination_cid] = conn
                by_cid[conn.host_cid] = conn
            conn.receive_datagram(data, peer, now=time.monotonic())
        for conn in set(by_cid.values()):
            t = conn.get_timer()
            if t is not None and t <= time.monotonic():
                conn.handle_timer(now=time.monotonic())
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, events.ConnectionIdIssued):
                    by_cid[ev.connection_id] = conn
                elif isinstance(ev, events.ConnectionIdRetired):
                    by_cid.pop(ev.connection_id, None)
                elif isinstance(ev, events.StreamDataReceived) and ev.end_stream:
                    conn.send_stream_data(ev.stream_id, answer, end_stream=True)
                elif isinstance(ev, events.ConnectionTerminated):
                    for cid in [c for c, v in by_cid.items() if v is conn]:
                        del by_cid[cid]
            _flush(conn, sock)


class QuicClient:
    """One QUIC connection from sockets that `make_socket()` opens (e.g. in a namespace)."""

    def __init__(self, make_socket: Callable[[], socket.socket], addr: str, port: int,
                 timeout: float = 5.0) -> None:
        self._make_socket = make_socket
        self.peer = (addr, port)
        self.timeout = timeout
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], connection_id_length=CID_LEN,
                                verify_mode=ssl.CERT_NONE)
        self.conn = QuicConnection(configuration=cfg)
        self.sock = make_socket()
        self.conn.connect(self.peer, now=time.monotonic())
        self._pump_until(lambda ev: isinstance(ev, events.HandshakeCompleted), "the handshake")

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def peer_cid(self) -> bytes:
        """The connection ID this client sends to now (the server's)."""
        return self.conn._peer_cid.cid

    def _pump_until(self, done: Callable[[events.QuicEvent], bool], what: str) -> events.QuicEvent:
        deadline = time.monotonic() + self.timeout
        while True:
            _flush(self.conn, self.sock)
            while (ev := self.conn.next_event()) is not None:
                if isinstance(ev, events.ConnectionTerminated):
                    raise ConnectionError(f"QUIC connection closed during {what}: {ev.reason_phrase}")
                if done(ev):
                    return ev
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no {what} within {self.timeout} s")
            t = self.conn.get_timer()
            wait = min(deadline - now, max(0.0, t - now) if t is not None else 0.2, 0.2)
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                data, addr = self.sock.recvfrom(65536)
                self.conn.receive_datagram(data, addr, now=time.monotonic())
            t = self.conn.get_timer()
            if t is not None and t <= time.monotonic():
                self.conn.handle_timer(now=time.monotonic())

    def ask(self) -> str:
        """Open a stream, send a request, return the server's answer (its name)."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_stream_data(sid, b"who?", end_stream=True)
        buf = bytearray()

        def done(ev: events.QuicEvent) -> bool:
            if isinstance(ev, events.StreamDataReceived) and ev.stream_id == sid:
                buf.extend(ev.data)
                return ev.end_stream
            return False

        self._pump_until(done, f"the answer on stream {sid}")
        return buf.decode().strip()

    def migrate(self) -> None:
        """Continue from a new UDP socket (new source port) with the next peer connection ID."""
        old = self.sock
        self.sock = self._make_socket()
        old.close()
        self.conn.change_connection_id()

    def close(self) -> None:
        try:
            self.conn.close()
            _flush(self.conn, self.sock)
        except OSError:
            pass
        finally:
            self.sock.close()


def make_cert(directory: str, name: str = "lbxdp-lab") -> tuple[str, str]:
    """A self-signed certificate and key (PEM files in `directory`): (cert path, key path)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "quic-cert.pem"), os.path.join(directory, "quic-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lbxdp.lab.echo quic-server")
    p.add_argument("--name", required=True)
    p.add_argument("--server-id", type=int, required=True)
    p.add_argument("--addr", required=True, help="address to bind (the VIP, for DSR)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args(argv)
    try:
        return serve(a.name, a.server_id, a.addr, a.port, a.cert, a.key)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
