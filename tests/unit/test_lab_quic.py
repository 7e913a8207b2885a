"""lbxdp.lab.echo.quic on loopback (no balancer): the server's connection IDs carry its server id
in bytes 1-2, it answers a stream with its name, and the client's migration to a new source port
keeps the connection (what tests/netns/test_quic.py relies on through the balancer)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from lbxdp.lab import processes

quic = pytest.importorskip("lbxdp.lab.echo.quic", reason="aioquic is a test extra: pip install -e '.[test]'")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_make_cid_puts_the_server_id_in_bytes_1_and_2() -> None:
    cids = {quic.make_cid(0xBEEF) for _ in range(50)}
    assert len(cids) == 50   # the other bytes are random
    for cid in cids:
        assert len(cid) == quic.CID_LEN and cid[1:3] == b"\xbe\xef" and quic.server_id_of(cid) == 0xBEEF


def test_server_ids_in_its_cids_and_migration_keeps_the_connection(tmp_path: Path) -> None:
    cert, key = quic.make_cert(str(tmp_path))
    port = free_udp_port()
    log = tmp_path / "server.log"
    argv = processes.echo_argv("quic-server", "--name", "be7", "--server-id", "513", "--addr", "127.0.0.1",
                               "--port", str(port), "--cert", cert, "--key", key)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=processes.python_env())
    client = None
    try:
        deadline = time.monotonic() + 10
        while "quic server" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        client = quic.QuicClient(loopback_socket, "127.0.0.1", port, timeout=5.0)
        assert client.ask() == "be7"
        assert quic.server_id_of(client.peer_cid) == 513
        # the NEW_CONNECTION_ID frames' ids carry it too
        issued = [c.cid for c in client.conn._peer_cid_available]
        assert issued and all(quic.server_id_of(c) == 513 for c in issued)
        old_port, old_cid = client.local_port, client.peer_cid
        client.migrate()
        assert client.local_port != old_port and client.peer_cid != old_cid
        assert [client.ask() for _ in range(3)] == ["be7"] * 3
        assert quic.server_id_of(client.peer_cid) == 513
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(timeout=10)
