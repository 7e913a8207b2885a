"""Passive health and conntrack GC of NAT VIPs (issue 12), end to end with `lbxdp run`.

One rig of shape nat (cli, lb, be1, be2 on one segment; one-armed DNAT, generic XDP), one NAT
VIP 10.112.0.10:80/tcp -> be1, be2 on SERVICE_PORT. The backends' echo servers listen on the
rig's port (8080), which is also the active check's port; the service port is an nftables
redirect to it (`tcp dport 8081 redirect to :8080`) on a backend that serves, and nothing on one
that does not: the kernel answers its SYNs with RST while its check port still answers. That is
the issue's "a backend that RSTs the service port while its check port answers".

What is shown:
- passive health marks such a backend down (backend-down cause=passive, confirmed by a TCP
  check of the service port) within 10 failed handshakes, and the active checker's rise brings
  it back;
- with both backends refusing, max_ejected = 0.5 holds one of two down at most (ejection-capped);
- a spoofed SYN flood (tests/netns/flood.py, each SYN twice, sources that get no SYN-ACK; bounded
  in count and time, from the client's namespace) makes the backends suspected, and the
  confirmation checks keep every one up;
- the daemon's GC removes the entries of closed connections within the close timeout plus a
  GC period (removed, not just expired: `lbxdp nat status` counts expired entries apart).

Cleanup: the daemons stopped by PID and lbxdp detached (started_daemons), the flood process is
ours and bounded, the rig taken down and checked empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lbxdp import model
from lbxdp.health import CheckType, HealthCheck
from lbxdp.lab import processes
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig, RigSpec, Shape

from .daemon import REPO, Daemon, rig_up, started_daemons

pytestmark = pytest.mark.root

VIP_PORT, SERVICE_PORT = 80, 8081
SVC_TABLE = "lbxsvc"
FAILURES = 5           # [vip.passive_health] failures in these tests
CLOSE_TIMEOUT = 2      # [balancer] nat_timeouts.tcp_close


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """An up rig of shape nat with two backends. Scope: module. Cleanup: down, checked empty."""
    yield from rig_up(RigSpec(shape=Shape.NAT, backends=2))


@pytest.fixture
def daemons(rig: Rig) -> Iterator[Callable[..., Daemon]]:
    with tempfile.TemporaryDirectory(prefix="lbxdp-nat-health-") as tmp:
        yield from started_daemons(rig, Path(tmp))


def serve(rig: Rig, roles: list[str]) -> None:
    """SERVICE_PORT answered (redirected to the echo server) on these backends, refused on the others."""
    for be in rig.backends:
        rig.run(be, "nft", "delete", "table", "inet", SVC_TABLE, check=False)
        if be in roles:
            rig.run(be, "nft", "-f", "-", input=(
                f"table inet {SVC_TABLE} {{\n chain pre {{\n  type nat hook prerouting priority dstnat; "
                f"policy accept;\n  tcp dport {SERVICE_PORT} redirect to :{rig.spec.port}\n }}\n}}\n"))


def config(rig: Rig, *, interval: float = 1.0, rise: int = 2, max_ejected: float = 0.5) -> str:
    vip = rig.nat_vip(4, "tcp", port=VIP_PORT, backend_port=SERVICE_PORT,
                      health=HealthCheck(CheckType.TCP, port=rig.spec.port, interval=interval, timeout=0.5, rise=rise),
                      passive_health=model.PassiveHealth(failures=FAILURES, timeout=2.0, max_ejected=max_ejected))
    return rig.nat_config_toml(vip, nat_timeouts=model.NatTimeouts(tcp_syn=10, tcp_established=600,
                                                                   tcp_close=CLOSE_TIMEOUT, udp=30))


def role_of(rig: Rig, name: str) -> str:
    """The backend role of an lbxdp backend name on SERVICE_PORT ('10.111.0.11:8081')."""
    return next(r for r in rig.backends if name == model.endpoint(rig.addr4(r), SERVICE_PORT))


def lbxdp_json(rig: Rig, *argv: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv, "--json"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def backends(rig: Rig) -> dict[str, dict]:
    """role -> its backend document in `lbxdp status --json`."""
    doc = lbxdp_json(rig, "status", HOST_IF)
    return {role_of(rig, b["backend"]): b for v in doc["vips"] for b in v["backends"]}


def connect(rig: Rig) -> str | None:
    """One connection to the VIP: the backend's name, or None if refused/reset/timed out."""
    try:
        return rig.tcp_hello(rig.spec.vip4, VIP_PORT, timeout=1.0)
    except (OSError, EOFError):
        return None


def test_a_backend_refusing_the_service_port_is_marked_down_within_10_failed_handshakes(
        rig: Rig, daemons: Callable[..., Daemon]) -> None:
    serve(rig, ["be2"])                        # be1 RSTs the service port; its check port answers
    d = daemons(config(rig))
    failed, deadline = 0, time.monotonic() + 30
    while not d.events("backend-down", cause="passive"):
        assert time.monotonic() < deadline, f"be1 never marked down ({failed} failed):\n{d.text()}"
        failed += connect(rig) is None
        time.sleep(0.3)                        # ~3 connections/s, half of them to be1
    _, ev = d.events("backend-down", cause="passive")[0]
    assert role_of(rig, ev["backend"]) == "be1" and "refused" in ev["check"], ev
    assert d.events("backend-suspect", backend=ev["backend"]), d.text()
    be = backends(rig)
    hs = be["be1"]["handshakes"]
    print(f"\n[nat-health] be1 down after {failed} failed client connections; data path: {hs}")
    assert failed <= 10 and hs["syn_rst"] <= 10, (failed, hs)
    assert be["be1"]["health"] == "down" and be["be1"]["down_cause"] == "passive", be["be1"]
    assert be["be2"]["health"] == "up"
    # the VIP serves from be2 only now
    assert [connect(rig) for _ in range(10)] == ["be2"] * 10
    # and be1 comes back through the active checker's rise (its check port answers)
    d.wait_event("backend-up", backend=ev["backend"], timeout=15)
    assert backends(rig)["be1"]["health"] == "up"


def test_passive_health_holds_at_most_max_ejected_of_the_backends_down(
        rig: Rig, daemons: Callable[..., Daemon]) -> None:
    serve(rig, [])                             # both refuse: both are confirmed failing
    d = daemons(config(rig, interval=5.0, rise=3))   # rise takes ~15 s: nobody comes back meanwhile
    deadline = time.monotonic() + 30
    while not d.events("ejection-capped"):
        assert time.monotonic() < deadline, f"no ejection-capped:\n{d.text()}"
        connect(rig)
        time.sleep(0.1)
    for _ in range(20):                        # more failures: the other stays up
        connect(rig)
        time.sleep(0.05)
    downs = d.events("backend-down", cause="passive")
    capped = d.events("ejection-capped")
    be = backends(rig)
    print(f"\n[nat-health] cap: {len(downs)} down, {len(capped)} capped; "
          f"{ {r: b['health'] for r, b in be.items()} }")
    assert len(downs) == 1, d.text()
    assert sorted(b["health"] for b in be.values()) == ["down", "up"], be
    up = next(r for r, b in be.items() if b["health"] == "up")
    assert any(role_of(rig, e["backend"]) == up for _, e in capped), (up, capped)
    assert capped[0][1]["max_ejected"] == "0.5" and capped[0][1]["backends"] == "2"


def test_a_spoofed_syn_flood_ejects_nobody(rig: Rig, daemons: Callable[..., Daemon]) -> None:
    serve(rig, rig.backends)                   # both healthy
    d = daemons(config(rig))
    argv = [*rig.ns_cmd(CLI), sys.executable, str(REPO / "tests/netns/flood.py"), HOST_IF, rig.mac(LB),
            rig.mac(CLI), str(rig.spec.vip4), str(rig.spec.vip6), str(VIP_PORT), "--kind", "syn2",
            "--seconds", "6", "--max-packets", "30000", "--pps", "5000", "--pool", "4000"]
    flood = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=processes.python_env())
    try:
        ok = 0
        while flood.poll() is None:
            ok += connect(rig) is not None
            time.sleep(0.2)
        out, err = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()                       # ours, by its PID
            flood.wait()
    assert flood.returncode == 0, err
    sent = json.loads(out)
    time.sleep(2.5)                            # the last suspicions' confirmations, two ticks
    suspects, downs = d.events("backend-suspect"), d.events("backend-down")
    print(f"\n[nat-health] flood {sent}: {len(suspects)} suspicions, "
          f"{len(d.events('backend-suspect-cleared'))} cleared by their check, {len(downs)} down; "
          f"{ok} client connections answered during it")
    assert sent["sent"] > 5000, sent
    assert suspects, f"the flood made nobody suspected: the test shows nothing\n{d.text()}"
    assert not downs, d.text()
    assert all(b["health"] == "up" for b in backends(rig).values())
    assert [connect(rig) for _ in range(6)].count(None) == 0


def test_gc_removes_closed_connections_within_the_close_timeout(rig: Rig, daemons: Callable[..., Daemon]) -> None:
    serve(rig, rig.backends)
    daemons(config(rig))
    res = rig.client("tcp", rig.spec.vip4, VIP_PORT, count=100, timeout=60, try_timeout=2)
    assert res["failed"] == 0, res
    closed_at = time.monotonic()
    conns = lbxdp_json(rig, "nat", "ls", "-i", HOST_IF, "--expired")
    ours = [c for c in conns if c["client"].startswith(f"{rig.addr4(CLI)}:")]
    assert len(ours) >= 100, conns[:3]
    assert {c["vip"] for c in ours} == {f"{rig.spec.vip4}:{VIP_PORT}"} and {c["snat"] for c in ours} == {None}
    assert {c["backend"] for c in ours} == {model.endpoint(rig.addr4(b), SERVICE_PORT) for b in rig.backends}
    assert {c["state"] for c in ours} == {"closing"}, Counter(c["state"] for c in ours)
    nat = lbxdp_json(rig, "nat", "status", "-i", HOST_IF)
    held = sum(e["entries"] for e in nat["entries"] if e["state"] == "closing") + nat["expired"]
    assert held >= 100, nat                    # the closed connections' entries are there at first
    while True:
        nat = lbxdp_json(rig, "nat", "status", "-i", HOST_IF)
        left = sum(e["entries"] for e in nat["entries"] if e["state"] == "closing") + nat["expired"]
        if left == 0:
            break
        assert time.monotonic() - closed_at < CLOSE_TIMEOUT + 3, f"{left} entries left: {nat}"
        time.sleep(0.2)
    took = time.monotonic() - closed_at
    print(f"\n[nat-health] {held} entries of 100 closed connections removed {took:.1f}s after the last closed "
          f"(close timeout {CLOSE_TIMEOUT}s)")
    assert nat["snat_pool"]["in_use"] == [] or all(p["ports"] == 0 for p in nat["snat_pool"]["in_use"])
