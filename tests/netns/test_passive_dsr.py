"""Passive health of a DSR VIP (issue 13), end to end with `lbxdp run`.

One rig of shape l2 (cli, lb, be1, be2; DSR, generic XDP), the DSR VIP on the rig's port (the
echo servers' port, 8080) with [vip.passive_health]. Every backend's check port (CHECK_PORT) is an
nftables redirect to its echo server, so the active check answers on every backend; a backend
that "silently drops SYNs to the service port" has a prerouting rule before NAT (priority -150)
dropping SYNs to 8080. The balancer sees only the client's side (bpf/select.h): handshakes
sent to a backend with no final ACK for the VIP's passive `timeout` (TIMEOUT, 0.2 s), or a client
retransmitting its SYN, are the failures. The confirmation check is a TCP handshake to the
backend's service port (8080, connect timeout TIMEOUT), which the dropping backend fails.

What is shown:
- at 20 connections/s such a backend is marked down (backend-down cause=passive) within 1 s of
  the first failed handshake's SYN or within 10 failed handshakes (the issue's words; 0.56-0.92 s
  and 7-10 in six runs). The daemon takes each backend's baseline when its VIP is applied: taken
  at the poller's first read instead, 0.1 s later, the clients' first failures became the baseline
  and 3 runs of 4 took 1.05-1.09 s.
  A failed handshake is one whose first SYN went unanswered (its connect took a retransmission,
  which reaches the other backend once the first is down). Measured before the pending-handshake
  signal (the clients' 1 s RTO, the daemon's 1 s tick, a 0.5 s confirmation): ~2 s and ~20;
- a spoofed SYN flood (tests/netns/flood.py, each SYN twice, so the data path counts the second
  as a retransmission) makes backends suspected; their confirmation checks pass and nobody is
  ejected.

Cleanup: the daemons stopped by PID (started_daemons), every client thread bounded by its
timeout, the flood process ours and bounded in count and time, the rig taken down and checked
empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lbxdp import model
from lbxdp.health import CheckType, HealthCheck
from lbxdp.lab import processes
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig, RigSpec, Shape

from .daemon import REPO, Daemon, rig_up, started_daemons

pytestmark = pytest.mark.root

CHECK_PORT = 8082
TABLE = "lbxpdsr"
FAILURES = 5
TIMEOUT = 0.2


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """An up rig of shape l2 with two backends. Scope: module. Cleanup: down, checked empty."""
    yield from rig_up(RigSpec(shape=Shape.L2, backends=2))


@pytest.fixture
def daemons(rig: Rig) -> Iterator[Callable[..., Daemon]]:
    with tempfile.TemporaryDirectory(prefix="lbxdp-passive-dsr-") as tmp:
        yield from started_daemons(rig, Path(tmp))


def nft(rig: Rig, drop_syns: list[str]) -> None:
    """CHECK_PORT answered on every backend; SYNs to the service port dropped on `drop_syns`."""
    port = rig.spec.port
    for be in rig.backends:
        rig.run(be, "nft", "delete", "table", "inet", TABLE, check=False)
        drop = (f" chain early {{\n  type filter hook prerouting priority -150; policy accept;\n"
                f"  tcp dport {port} tcp flags & (syn | ack) == syn drop\n }}\n") if be in drop_syns else ""
        rig.run(be, "nft", "-f", "-", input=(
            f"table inet {TABLE} {{\n{drop} chain pre {{\n  type nat hook prerouting priority dstnat; "
            f"policy accept;\n  tcp dport {CHECK_PORT} redirect to :{port}\n }}\n}}\n"))


@pytest.fixture
def rules(rig: Rig) -> Iterator[Callable[[list[str]], None]]:
    """nft(rig, ...) for the test; the tables removed afterwards, always."""
    yield lambda drop: nft(rig, drop)
    for be in rig.backends:
        rig.run(be, "nft", "delete", "table", "inet", TABLE, check=False)


def config(rig: Rig, max_ejected: float = 0.5) -> str:
    vip = rig.vip(4, "tcp", health=HealthCheck(CheckType.TCP, port=CHECK_PORT, interval=1.0, timeout=0.5, rise=2),
                  passive_health=model.PassiveHealth(failures=FAILURES, timeout=TIMEOUT, max_ejected=max_ejected))
    return rig.nat_config_toml(vip)           # config.dump of these VIPs (any mode)


def role_of(rig: Rig, name: str) -> str:
    return next(r for r in rig.backends if name == model.endpoint(rig.addr4(r), rig.spec.port))


class Clients:
    """Connections to the VIP at `rate` per second from cli, each in its own thread (a dropped SYN
    holds its connect for `timeout`): when each started, what it got (a backend name, None) and
    how long it took (a handshake whose first SYN was dropped needs the client's retransmission,
    >= 1 s later, which may reach another backend once the first is down)."""

    def __init__(self, rig: Rig, rate: float, timeout: float = 3.0) -> None:
        self.rig, self.rate, self.timeout = rig, rate, timeout
        self.results: list[tuple[float, str | None, float]] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _one(self, started: float) -> None:
        t = time.monotonic()
        try:
            got: str | None = self.rig.tcp_hello(self.rig.spec.vip4, self.rig.spec.port, timeout=self.timeout)
        except (OSError, EOFError):
            got = None
        with self._lock:
            self.results.append((started, got, time.monotonic() - t))

    def failed(self) -> list[float]:
        """When the handshakes that failed (their first SYN unanswered) started, in order."""
        return sorted(s for s, got, took in self.results if got is None or took >= 0.5)

    def run_until(self, stop: Callable[[], bool], limit: float) -> None:
        t0 = time.monotonic()
        n = 0
        while not stop() and time.monotonic() - t0 < limit:
            t = threading.Thread(target=self._one, args=(time.time(),), daemon=True)
            t.start()
            self.threads.append(t)
            n += 1
            time.sleep(max(0.0, t0 + n / self.rate - time.monotonic()))

    def join(self) -> None:
        for t in self.threads:
            t.join(self.timeout + 2)


def test_a_backend_dropping_syns_is_marked_down_at_20_connections_per_second(
        rig: Rig, daemons: Callable[..., Daemon], rules: Callable[[list[str]], None]) -> None:
    rules(["be1"])
    d = daemons(config(rig))
    c = Clients(rig, rate=20)
    c.run_until(lambda: bool(d.events("backend-down", cause="passive")), limit=20)
    c.join()
    downs = d.events("backend-down", cause="passive")
    assert downs, f"be1 never marked down:\n{d.text()}"
    at, ev = downs[0]
    assert role_of(rig, ev["backend"]) == "be1", ev
    assert d.events("backend-suspect", backend=ev["backend"]), d.text()
    assert not d.events("backend-down", cause="passive", backend=model.endpoint(rig.addr4("be2"), rig.spec.port))
    failed = c.failed()
    assert failed, "no handshake failed: the test shows nothing"
    failed_before = [s for s in failed if s < at]
    suspect_at, suspect = d.events("backend-suspect", backend=ev["backend"])[0]
    print(f"\n[passive-dsr] be1 down {at - failed[0]:.2f}s after the first failed SYN (suspected after "
          f"{suspect_at - failed[0]:.2f}s); {len(failed_before)} failed handshakes started before it, "
          f"{len(c.results)} connections in all; suspect {suspect}; down {ev}")
    # The issue's bound, "within 10 failed handshakes or 1 s": either holds. Which one is luck of
    # the table (be1's share of 20 connections/s): few connections reaching be1 make a late but
    # short run, many an early one with more failures. Both failing means a slow mechanism.
    took, n = at - failed[0], len(failed_before)
    assert took <= 1.0 or n <= 10, (took, [round(s - failed[0], 2) for s in failed_before], d.text())
    assert took <= 1.5 and n <= 2 * FAILURES + 5, (took, n, d.text())
    # Right after the event new connections reach be2 only. Right after: be1's check port
    # answers, so the checker's rise (2 x 1 s) brings it back about a second later (the confirming
    # check is on the service port, the rise on the check port: README), and it fails again.
    after = [rig.tcp_hello(rig.spec.vip4, rig.spec.port, timeout=0.5) for _ in range(5)]
    assert len(set(after)) == 1 and after[0] != ev["backend"], after


def test_a_spoofed_syn_flood_ejects_nobody(rig: Rig, daemons: Callable[..., Daemon],
                                           rules: Callable[[list[str]], None]) -> None:
    rules([])
    d = daemons(config(rig))
    argv = [*rig.ns_cmd(CLI), sys.executable, str(REPO / "tests/netns/flood.py"), HOST_IF, rig.mac(LB),
            rig.mac(CLI), str(rig.spec.vip4), str(rig.spec.vip6), str(rig.spec.port), "--kind", "syn2",
            "--seconds", "6", "--max-packets", "30000", "--pps", "5000", "--pool", "4000"]
    flood = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=processes.python_env())
    try:
        out, err = flood.communicate(timeout=60)
    finally:
        if flood.poll() is None:
            flood.kill()                       # ours, by its PID
            flood.wait()
    assert flood.returncode == 0, err
    sent = json.loads(out)
    time.sleep(2.5)                            # the last suspicions' confirmations, two ticks
    suspects, downs = d.events("backend-suspect"), d.events("backend-down")
    print(f"\n[passive-dsr] flood {sent}: {len(suspects)} suspicions, "
          f"{len(d.events('backend-suspect-cleared'))} cleared by their check, {len(downs)} down")
    assert sent["sent"] > 5000, sent
    assert suspects, f"the flood made nobody suspected: the test shows nothing\n{d.text()}"
    assert not downs, d.text()
    assert len({rig.tcp_hello(rig.spec.vip4, rig.spec.port, timeout=1.0) for _ in range(20)}) == 2
