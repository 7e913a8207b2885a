"""`lbxdp exporter` against real traffic: what Prometheus scrapes equals what the client saw.

lbxdp is attached (generic mode) to the rig's balancer through the real command, the exporter
runs as `python -m lbxdp --netns <lb> exporter eth0` (so it listens inside the balancer's
namespace), and /metrics is fetched from inside that namespace and parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbxdp import abi
from lbxdp.lab.rig import FAILED, HOST_IF, LB, Rig

Samples = dict[tuple[str, frozenset], float]

FREE_PORT = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def lbxdp_cmd(rig: Rig, *argv: str) -> list[str]:
    return [sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv]


@pytest.fixture(scope="module")
def attached(rig: Rig) -> Iterator[Rig]:
    """lbxdp attached to the balancer in generic mode; detached (pins removed) in finally."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(rig.lb_config_toml(scheduler="rr", with_mac=False))
    try:
        proc = subprocess.run(lbxdp_cmd(rig, "attach", HOST_IF, "--config", f.name, "--mode", "generic"),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        yield rig
    finally:
        subprocess.run(lbxdp_cmd(rig, "detach", HOST_IF), capture_output=True, timeout=60)
        Path(f.name).unlink()


@pytest.fixture(scope="module")
def exporter(attached: Rig) -> Iterator[str]:
    """The exporter running in the balancer's namespace; yields its /metrics URL.

    Stopped by its PID with SIGTERM in finally (SIGKILL if it does not exit), and it must exit
    cleanly on SIGTERM.
    """
    rig = attached
    port = rig.run(LB, sys.executable, "-c", FREE_PORT).stdout.strip()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen(lbxdp_cmd(rig, "exporter", HOST_IF, "--listen", f"127.0.0.1:{port}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"exporter exited ({proc.returncode}): {proc.stderr.read()}")
            if rig.run(LB, sys.executable, "-c", SCRAPE, url, check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, "exporter did not answer within 30 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            rc = None
        out, err = proc.communicate()
        assert rc == 0, f"exporter did not exit cleanly on SIGTERM (rc {rc}): {err}"


def scrape(rig: Rig, url: str) -> Samples:
    body = rig.run(LB, sys.executable, "-c", SCRAPE, url).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def backend_label(rig: Rig, role: str, version: int) -> str:
    a = rig.addr4(role) if version == 4 else rig.addr6(role)
    return f"{a}:{rig.spec.port}" if version == 4 else f"[{a}]:{rig.spec.port}"


def vip_label(rig: Rig, version: int, proto: str) -> str:
    return (f"{rig.spec.vip4}:{rig.spec.port}/{proto}" if version == 4
            else f"[{rig.spec.vip6}]:{rig.spec.port}/{proto}")


def test_instance_metrics_are_exported(attached: Rig, exporter: str) -> None:
    rig = attached
    s = scrape(rig, exporter)
    assert value(s, "lbxdp_up", interface=HOST_IF) == 1
    assert value(s, "lbxdp_flow_table_capacity", interface=HOST_IF) == abi.FLOW_CAPACITY
    info = [k for k in s if k[0] == "lbxdp_info"]
    assert len(info) == 1 and dict(info[0][1])["mode"] == "generic", info
    for r in abi.Reason.exits():
        assert ("lbxdp_verdict_packets_total",
                frozenset({"interface": HOST_IF, "verdict": r.verdict, "reason": r.label}.items())) in s, r
    for version in (4, 6):
        for proto in ("tcp", "udp"):
            for role in rig.backends:
                assert value(s, "lbxdp_backend_in_table", interface=HOST_IF, vip=vip_label(rig, version, proto),
                             backend=backend_label(rig, role, version)) == 1


@pytest.mark.parametrize("version", [4, 6])
def test_counters_equal_what_the_client_saw(attached: Rig, exporter: str, version: int) -> None:
    rig = attached
    vip = rig.spec.vip4 if version == 4 else rig.spec.vip6
    udp, tcp = vip_label(rig, version, "udp"), vip_label(rig, version, "tcp")
    n_udp, n_tcp = 45, 30

    before = scrape(rig, exporter)
    udp_names = rig.udp_names(vip, count=n_udp, timeout=60)
    tcp_names = rig.tcp_names(vip, count=n_tcp, timeout=60)
    after = scrape(rig, exporter)

    assert udp_names[FAILED] == 0 and sum(udp_names.values()) == n_udp, udp_names
    assert tcp_names[FAILED] == 0 and sum(tcp_names.values()) == n_tcp, tcp_names

    def delta(name: str, **labels: str) -> float:
        return value(after, name, interface=HOST_IF, **labels) - value(before, name, interface=HOST_IF, **labels)

    # One datagram per fresh socket: one packet and one new flow each, on the UDP VIP.
    assert delta("lbxdp_vip_packets_total", vip=udp) == n_udp
    assert delta("lbxdp_vip_new_flows_total", vip=udp) == n_udp
    assert delta("lbxdp_vip_new_flows_total", vip=tcp) == n_tcp
    assert delta("lbxdp_vip_bytes_total", vip=udp) > 0
    for role in rig.backends:
        be = backend_label(rig, role, version)
        assert delta("lbxdp_backend_new_flows_total", vip=udp, backend=be) == udp_names[role], role
        assert delta("lbxdp_backend_packets_total", vip=udp, backend=be) == udp_names[role], role
        assert delta("lbxdp_backend_new_flows_total", vip=tcp, backend=be) == tcp_names[role], role

    # Every forwarded packet is one tx/forward verdict. Every new flow is remembered: a completed
    # TCP handshake in the connection table; a one-datagram UDP flow in the connection table or,
    # where the VIP's table cannot repeat the choice (round robin), in the half-open table until
    # its second datagram (README: the handshake gate).
    vip_pkts = sum(delta("lbxdp_vip_packets_total", vip=v) for v in (udp, tcp))
    assert delta("lbxdp_verdict_packets_total", verdict="tx", reason="forward") == vip_pkts
    assert delta("lbxdp_flow_table_entries") >= n_tcp
    assert delta("lbxdp_flow_table_entries") + delta("lbxdp_half_open_entries") >= n_udp + n_tcp
