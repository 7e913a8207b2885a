"""Issue 13, QUIC connection-ID routing with a real QUIC connection (aioquic, a test extra) across
real namespaces: the DSR rig's three backends run lbxdp.lab.echo's QUIC server, each issuing
connection IDs that carry its server_id in bytes 1-2, on a UDP VIP with quic = true. A client
connects through the VIP and learns its backend's name; after `lbxdp flows flush` it moves to a new
source port (new 5-tuple, new connection ID of the same server) and keeps talking: the answers still
come from the same backend, because the balancer routes the unknown tuple's short-header packets by
the server id (lbx_quic_stats' by_id counter grows, and the VIP's own in lbx_quic_vip), not by the
Maglev table, and records none of those packets (the connection table stays empty after the flush).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import config, model
from lbxdp.lab import namespaces as nsx
from lbxdp.lab import processes
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig

quic = pytest.importorskip("lbxdp.lab.echo.quic", reason="aioquic is a test extra: pip install -e '.[test]'")

PORT = 4433
SERVER_IDS = {"be1": 0x0101, "be2": 0x0202, "be3": 0x0303}


def lbxdp(rig: Rig, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"lbxdp {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def quic_vip(rig: Rig) -> model.Vip:
    bes = tuple(model.Backend(address=rig.addr4(r), port=PORT, server_id=SERVER_IDS[r]) for r in rig.backends)
    return model.Vip(address=rig.spec.vip4, port=PORT, protocol=model.Protocol.UDP, quic=True, backends=bes)


def quic_stats(rig: Rig) -> dict[str, int]:
    return json.loads(lbxdp(rig, "status", HOST_IF, "--json"))["quic"]["packets"]


def status(rig: Rig) -> dict:
    return json.loads(lbxdp(rig, "status", HOST_IF, "--json"))


@pytest.fixture(scope="module")
def quic_rig(rig: Rig) -> Iterator[Rig]:
    """QUIC servers on every backend (bound to the VIP, port 4433) and lbxdp attached (generic XDP)
    with the QUIC VIP. Teardown, even on failure: detach, servers stopped by PID, files removed."""
    tmp = tempfile.TemporaryDirectory(prefix="lbxdp-quic-")
    cert, key = quic.make_cert(tmp.name)
    servers: list[processes.Server] = []
    cfg = Path(tmp.name) / "lbxdp.toml"
    cfg.write_text(config.dump(model.Config(vips=(quic_vip(rig),))))
    try:
        for role in rig.backends:
            log = rig.run_dir / f"{role}-quic.log"
            argv = processes.echo_argv("quic-server", "--name", role, "--server-id", str(SERVER_IDS[role]),
                                       "--addr", str(rig.spec.vip4), "--port", str(PORT),
                                       "--cert", cert, "--key", key)
            srv = processes.start(rig.ns(role), argv, log, False, f"QUIC server of {role}")
            servers.append(srv)
            nsx.poll(f"the QUIC server of {role} to listen",
                     lambda: srv.alive() and "quic server" in processes.log_tail(log))
        lbxdp(rig, "attach", HOST_IF, "--config", str(cfg), "--mode", "generic")
        yield rig
    finally:
        subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), "detach", HOST_IF],
                       capture_output=True, timeout=60)
        for srv in servers:
            processes.terminate(srv, 5.0)
        tmp.cleanup()


def client_socket(rig: Rig) -> socket.socket:
    return nsx.ns_socket(rig.ns(CLI), socket.AF_INET, socket.SOCK_DGRAM)


def test_connection_stays_on_its_backend_across_a_flush_and_a_new_source_port(quic_rig: Rig) -> None:
    rig = quic_rig
    before = quic_stats(rig)
    clients = []
    try:
        for _ in range(6):   # several connections: Initials spread by the table, each then pinned by id
            c = quic.QuicClient(lambda: client_socket(rig), str(rig.spec.vip4), PORT, timeout=5.0)
            clients.append(c)
        first = []
        for c in clients:
            name = c.ask()
            assert name in SERVER_IDS, name
            # the client now sends to a connection ID of its server: the id in bytes 1-2
            assert quic.server_id_of(c.peer_cid) == SERVER_IDS[name]
            first.append(name)
        lbxdp(rig, "flows", "flush", "-i", HOST_IF)
        mid = quic_stats(rig)
        for c, name in zip(clients, first):
            old_port = c.local_port
            c.migrate()
            answers = [c.ask() for _ in range(3)]
            assert c.local_port != old_port
            assert answers == [name] * 3, f"after the flush and a new source port: {answers} (was {name})"
            assert quic.server_id_of(c.peer_cid) == SERVER_IDS[name]
        st = status(rig)
        after = st["quic"]["packets"]
    finally:
        for c in clients:
            c.close()
    # every packet of a migrated connection (3 questions each, and whatever the migration sent) was
    # routed by the id, and none was recorded: the connection table stays empty after the flush
    assert after["by_id"] - mid["by_id"] >= 3 * len(clients), (before, mid, after)
    assert st["flows"]["entries"] == 0, st["flows"]
    # the VIP's own counters (lbx_quic_vip) are the program-wide ones: it is the only QUIC VIP
    [v] = st["vips"]
    assert v["quic"] == after, (v["quic"], after)
    assert after["initial"] > before["initial"], (before, after)
    assert after["unknown_id"] == before["unknown_id"], (before, after)
