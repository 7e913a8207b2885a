"""Issue 15: `lbxdp explain` and `lbxdp trace` on a real balancer with real connections.

The rig's balancer is attached through the real command (generic mode, Maglev VIPs with every
backend); the clients are sockets this process opens in the client namespace, so each
connection's source port is known, and each backend's echo server names itself in its greeting.

What each test pins down:
- test_explain_names_the_backend_that_answered: for 200 connections (IPv4 and IPv6), explain of
  the SYN before connecting and of the established flow after names the backend whose server
  answered; the connection table's size and the reason counters do not move by explaining.
- test_trace_shows_a_known_flows_packets: `lbxdp trace --vip --src -n --pcap --json` shows the
  packets of one connection, forwarded to the backend that answered; the pcap opens in scapy;
  while it runs status says "trace build attached"; after it the pinned normal build is back.
- test_a_killed_tracer_leaves_a_trace_build_that_attach_and_restore_replace: SIGKILL leaves the
  trace build attached and forwarding, status says so, `trace --restore` puts the normal build
  back; after a second SIGKILL `lbxdp attach` (not refused as a foreign program) does too; and
  SIGTERM restores by itself.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import explain, model
from lbxdp.lab import namespaces as nsx
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig
from lbxdp.paths import Instance

CONNS = 200


def lbxdp(rig: Rig, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *args],
                          capture_output=True, text=True, timeout=timeout)


def status(rig: Rig) -> dict:
    p = lbxdp(rig, "status", HOST_IF, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    return doc[0] if isinstance(doc, list) else doc


@pytest.fixture(scope="module")
def lb(rig: Rig) -> Iterator[Rig]:
    """The rig with lbxdp attached (generic) by the command: Maglev VIPs v4/v6 x tcp/udp, every
    backend. Scope: module. Cleanup: `lbxdp detach` and the config file removed, always."""
    with tempfile.NamedTemporaryFile("w", prefix="lbxdp-", suffix=".toml", delete=False) as f:
        f.write(rig.lb_config_toml(scheduler="maglev", with_mac=False))
    try:
        p = lbxdp(rig, "attach", HOST_IF, "--config", f.name, "--mode", "generic")
        assert p.returncode == 0, p.stderr
        rig.config_file = f.name   # type: ignore[attr-defined]
        yield rig
    finally:
        lbxdp(rig, "detach", HOST_IF, timeout=60)
        Path(f.name).unlink()


class Conn:
    """One TCP connection from the client namespace: its source port and the greeting's name."""

    def __init__(self, rig: Rig, dst: model.IPAddress, port: int):
        fam = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
        self.sock = nsx.ns_socket(rig.ns(CLI), fam, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.bind(("::" if dst.version == 6 else "0.0.0.0", 0))
        self.src = ipaddress.ip_address(rig.addr4(CLI) if dst.version == 4 else rig.addr6(CLI))
        self.sport = self.sock.getsockname()[1]
        self.dst, self.port = dst, port

    def connect(self) -> str:
        self.sock.connect((str(self.dst), self.port))
        buf = b""
        while b"\n" not in buf:
            chunk = self.sock.recv(256)
            assert chunk, f"EOF before the greeting ({buf!r})"
            buf += chunk
        self.sock.sendall(b"ping\n")   # the flow's later segments: recorded by now
        assert self.sock.recv(16)
        return buf.split(b"\n", 1)[0].decode()

    def probe(self, syn: bool) -> explain.Probe:
        return explain.Probe(self.src, self.sport, self.dst, self.port, model.Protocol.TCP, syn)


def test_explain_names_the_backend_that_answered(lb: Rig) -> None:
    inst = Instance(HOST_IF, lb.ns(LB))
    port = lb.spec.port
    conns: list[tuple[Conn, str, str, str]] = []
    with explain.Session(inst) as s:
        flows_before = s.dry.lm.flow_count()
        half_open = s.dry.lm.half_open_entries()
        for i in range(CONNS):
            dst = lb.spec.vip4 if i % 2 == 0 else lb.spec.vip6
            c = Conn(lb, dst, port)
            before = s.explain(c.probe(syn=True))
            assert (before.verdict, before.via) == ("tx", "table slot"), before.text()
            name = c.connect()
            after = s.explain(c.probe(syn=False))
            conns.append((c, name, before.backend.name, after.backend.name))
            assert after.via == "connection table", after.text()
        assert s.dry.lm.flow_count() == flows_before + CONNS   # one entry per connection, none per explain
        # 400 more explanations record nothing (the counters are checked exactly in
        # tests/datapath/test_explain.py: here delayed ACKs and neighbour discovery move them)
        explained = [s.explain(c.probe(syn=syn)) for c, _, _, _ in conns for syn in (False, True)]
        assert all(e.backend is not None for e in explained)
        assert s.dry.lm.flow_count() == flows_before + CONNS and s.dry.lm.half_open_entries() == half_open
    wrong = [(c.sport, name, b, a) for c, name, b, a in conns if not (lb.role_of(b) == lb.role_of(a) == name)]
    assert not wrong, f"{len(wrong)} of {CONNS} named another backend than the one that answered: {wrong[:5]}"
    assert len({name for _, name, _, _ in conns}) == len(lb.backends), "200 connections reached every backend"
    # the command itself, for one of them
    c, name, _, _ = conns[0]
    p = lbxdp(lb, "explain", f"{c.src}:{c.sport}", "->", f"{c.dst}:{port}/tcp", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert lb.role_of(doc["backend"]["name"]) == name and doc["via"] == "connection table"
    assert doc["backend"]["weight"] == 1 and doc["backend"]["down"] is False
    for c, _, _, _ in conns:
        c.sock.close()


def _start_trace(lb: Rig, *args: str) -> subprocess.Popen:
    """`lbxdp trace ARGS` started; returns once it says it is tracing (the trace build is attached)."""
    p = subprocess.Popen([sys.executable, "-m", "lbxdp", "--netns", lb.ns(LB), "trace", "-i", HOST_IF, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()   # blocks until it says so, or exits
    if "tracing" not in line:
        p.kill()
        out, err = p.communicate(timeout=30)
        pytest.fail(f"lbxdp trace did not start: {line}{err}")
    return p


def _normal_build_back(lb: Rig) -> None:
    st = status(lb)
    assert st["xdp"]["prog_id"] == st["state"]["prog_id"] and "build" not in st["xdp"], st["xdp"]


def test_trace_shows_a_known_flows_packets(lb: Rig, tmp_path: Path) -> None:
    pcap = tmp_path / "flow.pcap"
    src = str(lb.addr4(CLI))
    p = _start_trace(lb, "--vip", f"{lb.spec.vip4}:{lb.spec.port}/tcp", "--src", f"{src}/32", "-n", "3",
                     "--json", "--pcap", str(pcap), "--seconds", "60")
    try:
        st = status(lb)
        assert st["xdp"].get("build") == "trace" and st["xdp"]["tracer_alive"] is True, st["xdp"]
        c = Conn(lb, lb.spec.vip4, lb.spec.port)
        name = c.connect()
        out, err = p.communicate(timeout=60)
        c.sock.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    events = [json.loads(x) for x in out.splitlines()]
    assert len(events) == 3, out
    assert all(e["sport"] == c.sport and e["src"] == src and e["reason"] == "tx_forward" for e in events), events
    assert {lb.role_of(e["backend"]) for e in events} == {name}
    _normal_build_back(lb)
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap
    pkts = rdpcap(str(pcap))
    assert len(pkts) == 3 and pkts[0][TCP].flags == "S" and all(x[TCP].sport == c.sport for x in pkts)


def test_a_killed_tracer_leaves_a_trace_build_that_attach_and_restore_replace(lb: Rig) -> None:
    normal = status(lb)["state"]["prog_id"]
    p = _start_trace(lb)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    st = status(lb)
    assert st["xdp"]["prog_id"] != normal and st["xdp"]["build"] == "trace" and not st["xdp"]["tracer_alive"]
    text = lbxdp(lb, "status", HOST_IF).stdout
    assert "trace build attached (left by a stopped `lbxdp trace`)" in text, text
    assert lb.tcp_hello(lb.spec.vip4) in lb.backends          # still forwarding
    r = lbxdp(lb, "trace", "-i", HOST_IF, "--restore")
    assert r.returncode == 0 and "normal build put back" in r.stdout, r.stderr
    _normal_build_back(lb)
    assert status(lb)["xdp"]["prog_id"] == normal
    # killed again: `lbxdp attach` replaces it (the trace build is not a foreign program)
    p = _start_trace(lb)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    r = lbxdp(lb, "attach", HOST_IF, "--config", lb.config_file, "--mode", "generic")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr
    _normal_build_back(lb)
    assert "trace build" not in lbxdp(lb, "status", HOST_IF).stdout
    # SIGTERM: the tracer puts the normal build back itself
    before = status(lb)["state"]["prog_id"]
    p = _start_trace(lb)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "normal build put back" in err, err
    _normal_build_back(lb)
    assert status(lb)["xdp"]["prog_id"] == before
    assert lb.tcp_hello(lb.spec.vip4) in lb.backends
