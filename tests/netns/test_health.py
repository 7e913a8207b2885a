"""Issue 4 §4: active health checks, end to end, with the real daemon and real sockets.

The daemon is the real command, `python -m lbxdp --netns <lb> run eth0 --config FILE --mode
generic`, one per test (it attaches, checks, and detaches on SIGTERM). Backends fail the way real
ones do: their echo server stops (TCP RST, ICMP port unreachable), an HTTP endpoint answers 500,
an nftables rule black-holes their port. Clients are the rig's: Rig.tcp_hello from this process
when each connection must be timed, lbxdp.lab.echo clients (Rig.tcp_names, Rig.udp_flows) otherwise.

What each test pins down:
- test_a_stopped_backend_gets_no_new_connection_after_detection_and_rejoins: new connections
  stop reaching a stopped backend within fall x interval + timeout (+ slack), and reach it again
  about rise x interval after it answers again. Prints the measured times.
- test_http_500_fails_an_http_check_but_not_a_tcp_check: one backend answers HTTP 500; the VIP
  checked over HTTP drops it, the VIP checked over TCP keeps it.
- test_a_black_holed_backend_fails_by_timeout_without_delaying_the_others: SYNs to one backend
  are dropped; its check fails as "timeout", the others' checks keep their pace.
- test_a_flapping_backend_never_crashes_the_daemon_nor_gets_flows_while_down: a server stopped
  for 1.5 s, then running for 1 s, over and over for 30 s; no connection fails later than the
  detection window after a stop.
- test_migrate_moves_a_dead_backends_udp_flows_and_keep_does_not: the same 5-tuples before and
  after a backend dies, on a "keep" VIP and a "migrate" VIP.
- test_all_backends_down_drops_or_passes_as_the_vip_says: on_all_down "drop" and "pass", counted
  by reason, and seen (or not) by the balancer's own netfilter.
- test_set_health_forces_a_backend_out_and_in: `backend set-health down|auto|up`.
- test_metrics_show_health_and_count_checks: lbxdp_backend_healthy, lbxdp_health_check_seconds.

Timing: the machine may have two cores busy with other tests. Every wait polls for a state with a
timeout; every bound on a measured time adds SLACK to what the design promises, and the design
figure comes first in the assertion message.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbxdp.health import HealthCheck
from lbxdp.paths import Instance
from lbxdp.lab.rig import FAILED, HOST_IF, LB, Rig

from .daemon import REPO, Daemon, started_daemons

BACKENDS = ["be1", "be2", "be3"]
HTTP_PORT = 8081
SLACK = 1.0            # seconds on top of a design bound: a busy 2-core machine, the daemon's apply


# --- the daemon ---------------------------------------------------------------------------------

@pytest.fixture
def daemons(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(config text, metrics=None) -> an attached `lbxdp run` (tests/netns/daemon.py).

    Scope: function. Depends on: rig (conftest, module scope), root, bcc. Cleanup: see
    started_daemons (stopped by PID, detached, nothing left); configs and logs in tmp_path.
    """
    yield from started_daemons(rig, tmp_path)


@pytest.fixture
def servers(rig: Rig) -> Iterator[Rig]:
    """The module's rig, whose test may stop backends' echo servers (Rig.stop_server): every
    backend's server runs again afterwards, even if the test failed.

    Scope: function. Depends on: rig. Cleanup: Rig.start_server for each stopped backend.
    """
    try:
        yield rig
    finally:
        for role in rig.backends:
            if role not in rig.servers:
                rig.start_server(role)


@pytest.fixture
def nft(rig: Rig) -> Iterator[Callable[[str, str], None]]:
    """load(role, ruleset): load an nftables ruleset (`nft -f -`) in role's namespace. Its tables
    must be named lbxhealth (family inet or ip/ip6). Scope: function. Cleanup: every lbxhealth
    table loaded is deleted again, even if the test failed."""
    loaded: set[tuple[str, str]] = set()

    def load(role: str, ruleset: str) -> None:
        for family in re.findall(r"^\s*table\s+(\w+)\s+lbxhealth\b", ruleset, re.M):
            loaded.add((role, family))
        rig.run(role, "nft", "-f", "-", input=ruleset)

    try:
        yield load
    finally:
        for role, family in loaded:
            rig.run(role, "nft", "delete", "table", family, "lbxhealth", check=False)


@pytest.fixture
def http_backends(rig: Rig, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """An HTTP responder (`python -m lbxdp.lab.echo http`) on port HTTP_PORT in every backend, each
    answering with the status code in its file (the returned {role: status file}; 200 to start).

    Scope: function. Depends on: rig. Cleanup: each responder is stopped by its PID (SIGTERM,
    then SIGKILL) and reaped, even if the test failed.
    """
    procs: list[subprocess.Popen] = []
    files = {role: tmp_path / f"{role}.status" for role in rig.backends}
    try:
        for role, f in files.items():
            f.write_text("200\n")
            log = open(tmp_path / f"{role}.http.log", "wb")
            with log:
                procs.append(subprocess.Popen(
                    [*rig.ns_cmd(role), sys.executable, "-m", "lbxdp.lab.echo", "http", "--name", role,
                     "--port", str(HTTP_PORT), "--status-file", str(f)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        for role, p in zip(files, procs):
            poll(f"the HTTP responder of {role}", lambda: p.poll() is not None or
                 "ready http" in (tmp_path / f"{role}.http.log").read_text(), timeout=20)
            assert p.poll() is None, (tmp_path / f"{role}.http.log").read_text()
        yield files
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            p.wait(5)


# --- helpers ------------------------------------------------------------------------------------

def poll(what: str, check: Callable[[], Any], timeout: float = 20.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(every)


def lbxdp(rig: Rig, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"lbxdp {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def health(rig: Rig, vip: str) -> dict[str, dict[str, Any]]:
    """`lbxdp status --json` backend rows of one VIP by role: health, forced, last_check, ..."""
    st = json.loads(lbxdp(rig, "status", HOST_IF, "--json"))
    v = next(v for v in st["vips"] if v["vip"] == vip)
    return {rig.role_of(b["backend"]): b for b in v["backends"]}


def reasons(rig: Rig) -> dict[tuple[str, str], int]:
    st = json.loads(lbxdp(rig, "status", HOST_IF, "--json"))
    return {(r["verdict"], r["reason"]): r["packets"] for r in st["reasons"]}


def wait_health(rig: Rig, vip: str, want: dict[str, str], timeout: float = 20.0, **extra: Any) -> dict:
    """Poll status until each role's health is as wanted (and its row has the `extra` values)."""
    def ok() -> dict | None:
        rows = health(rig, vip)
        good = all(rows[r]["health"] == h and all(rows[r].get(k) == v for k, v in extra.items())
                   for r, h in want.items())
        return rows if good else None
    return poll(f"{vip} health {want} {extra}", ok, timeout=timeout, every=0.2)


def checks_json(rig: Rig) -> dict[str, dict[str, Any]]:
    """The daemon's checks.json (last result of every check, rewritten once a second)."""
    try:
        return json.loads((Instance(HOST_IF, rig.ns(LB)).run_dir / "checks.json").read_text())
    except (OSError, ValueError):
        return {}


def all_checked(rig: Rig, vip: str, roles: list[str], detail: str = "connected") -> Callable[[], bool]:
    """A poll check: every role has had a check on vip, and the last one said `detail`."""
    def ok() -> bool:
        c = checks_json(rig)
        return all(c.get(f"{vip}|{rig.endpoint(r, 6 if vip.startswith('[') else 4)}", {}).get("last") == detail
                   for r in roles)
    return ok


def vip_toml(rig: Rig, version: int = 4, proto: str = "tcp", *, check: HealthCheck | None = None,
             scheduler: str = "rr", roles: list[str] = BACKENDS, **vip_fields: str) -> str:
    """A config file with one VIP: the rig's (DSR) with these backends, this health check and
    other Vip fields (on_backend_down, on_all_down); built as model values, written by
    config.dump. Concatenate several for a config file."""
    return rig.vip_toml(version, proto, roles, scheduler=scheduler, health=check, **vip_fields)


@dataclass(frozen=True)
class Attempt:
    start: float          # time.time() before connect
    end: float            # after the greeting (or the failure)
    name: str | None      # the backend that greeted, None if it failed
    error: str | None


class Prober:
    """A thread making one TCP connection to the VIP every `pace` seconds (Rig.tcp_hello) and
    recording each: when it started and ended, and which backend greeted or why it failed.
    A context manager; stops by itself after `limit` seconds."""

    def __init__(self, rig: Rig, host: Any, pace: float = 0.02, try_timeout: float = 1.0, limit: float = 120.0):
        self.rig, self.host, self.pace, self.try_timeout, self.limit = rig, host, pace, try_timeout, limit
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.try_timeout + 5)

    def _run(self) -> None:
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            t0 = time.time()
            try:
                name, err = self.rig.tcp_hello(self.host, timeout=self.try_timeout), None
            except (OSError, EOFError) as e:
                name, err = None, type(e).__name__
            self.attempts.append(Attempt(t0, time.time(), name, err))
            self._stop.wait(self.pace)

    def since(self, t: float) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.start >= t]

    def wait_for(self, what: str, pred: Callable[[Attempt], bool], after: float, timeout: float = 20.0) -> Attempt:
        """The first attempt started after `after` that satisfies pred (polling)."""
        return poll(what, lambda: next((a for a in self.since(after) if pred(a)), None), timeout=timeout, every=0.02)


# --- the tests ----------------------------------------------------------------------------------

def test_a_stopped_backend_gets_no_new_connection_after_detection_and_rejoins(
        servers: Rig, daemons: Callable[..., Daemon]) -> None:
    """interval 0.5 s, timeout 0.25 s, fall 2, rise 2, round robin over be1..be3.

    Detection: a refused check fails at once, the checks keep a fixed grid, so the second failure
    comes at most fall x interval after the stop; the verdict is applied as soon as the daemon's
    loop wakes. Design bound: fall x interval + timeout = 1.25 s (the random first-check offset
    only shifts the grid, once, at start). Measured: from the moment the server had exited to the
    end of the last connection that still reached it (refused), and to the daemon's log line.
    Rejoin: rise successes in a row, so between (rise - 1) x interval and rise x interval after the
    server answers again (+ the apply); measured to the first new connection it greets.
    """
    rig, victim = servers, "be1"
    check = HealthCheck(type="tcp", interval=0.5, timeout=0.25, rise=2, fall=2)
    vip = rig.vip_name(4, "tcp")
    d = daemons(vip_toml(rig, 4, "tcp", check=check))
    poll("a first check of every backend", all_checked(rig, vip, BACKENDS))
    bound_down = check.fall * check.interval + check.timeout
    bound_up = check.rise * check.interval

    with Prober(rig, rig.spec.vip4) as p:
        t0 = time.time()
        for role in BACKENDS:
            p.wait_for(f"a connection greeted by {role}", lambda a, r=role: a.name == r, after=t0)
        assert not [a for a in p.since(t0) if a.error], "connections failed before anything was stopped"

        rig.stop_server(victim)
        t_stopped = time.time()
        t_event, ev = d.wait_event("backend-down", backend=rig.endpoint(victim))
        # Two seconds of connections after the verdict: none may fail (none reaches the victim).
        p.wait_for("connections 2 s after the verdict", lambda a: True, after=t_event + 2.0)
        during = p.since(t_stopped)
        failed = [a for a in during if a.error]
        assert failed, "no connection reached the stopped backend: the test measured nothing"
        t_last_fail = max(a.end for a in failed)
        after = [a for a in during if a.start > t_last_fail]

        rig.start_server(victim)
        t_started = time.time()
        t_up, _ = d.wait_event("backend-up", backend=rig.endpoint(victim))
        first = p.wait_for(f"a new connection greeted by {victim}", lambda a: a.name == victim, after=t_started)
        t_end = time.time()
        back = p.since(t_started)

    detect, logged, rejoin = t_last_fail - t_stopped, t_event - t_stopped, first.end - t_started
    figures = (f"detection: last connection reaching the stopped {victim} ended {detect:.3f}s after it exited, "
               f"backend-down logged after {logged:.3f}s ({len(failed)} refused); rejoin: first connection "
               f"to it {rejoin:.3f}s after it answered again, backend-up logged after {t_up - t_started:.3f}s; "
               f"design: down <= {bound_down:g}s, up in [{bound_up - check.interval:g}, {bound_up:g}]s")
    print(f"\n[health] {figures}")
    assert ev["check"] == "connection refused", ev
    assert detect <= bound_down + SLACK, figures
    assert logged <= bound_down + SLACK, figures
    assert len(after) >= 20 and all(a.name in ("be2", "be3") for a in after), Counter(a.name for a in after)
    assert rejoin <= bound_up + SLACK, figures
    # Hysteresis: one good check is not enough (a margin for when the server really started).
    assert rejoin >= (check.rise - 1) * check.interval - 0.2, figures
    assert not [a for a in back if a.error], [a for a in back if a.error][:5]
    assert {a.name for a in back if a.start > first.end} <= set(BACKENDS)
    assert t_end - t_started < 10
    rows = wait_health(rig, vip, {r: "up" for r in BACKENDS})
    assert rows[victim]["last_check"] == "connected" and rows[victim]["forced"] is None


def test_http_500_fails_an_http_check_but_not_a_tcp_check(
        rig: Rig, daemons: Callable[..., Daemon], http_backends: dict[str, Path]) -> None:
    """Two VIPs over the same backends: the IPv4 one checks GET /health on HTTP_PORT, the IPv6
    one checks TCP on the service port. be2's responder answers 500: only the HTTP-checked VIP
    drops it; with 200 again it comes back."""
    base = {"interval": 0.3, "timeout": 0.25, "rise": 2, "fall": 2}
    http_check = HealthCheck(type="http", port=HTTP_PORT, http_path="/health", http_status=(200,), **base)
    vip4, vip6, sick = rig.vip_name(4, "tcp"), rig.vip_name(6, "tcp"), "be2"
    d = daemons(vip_toml(rig, 4, "tcp", check=http_check)
                + vip_toml(rig, 6, "tcp", check=HealthCheck(type="tcp", **base)))
    poll("a first check of every backend", lambda: all_checked(rig, vip4, BACKENDS, "HTTP 200")()
         and all_checked(rig, vip6, BACKENDS)())

    http_backends[sick].write_text("500\n")
    t_event, ev = d.wait_event("backend-down", vip=vip4, backend=rig.endpoint(sick))
    assert ev["check"] == "HTTP 500", ev
    rows4 = wait_health(rig, vip4, {sick: "down"}, last_check="HTTP 500")
    assert {r: (rows4[r]["health"], rows4[r]["last_check"]) for r in ("be1", "be3")} == \
        {r: ("up", "HTTP 200") for r in ("be1", "be3")}, rows4
    rows6 = health(rig, vip6)
    assert {r: rows6[r]["health"] for r in BACKENDS} == {r: "up" for r in BACKENDS}, rows6
    assert rows6[sick]["last_check"] == "connected"

    n4, n6 = rig.tcp_names(rig.spec.vip4, count=30, timeout=30), rig.tcp_names(rig.spec.vip6, count=30, timeout=30)
    assert n4[FAILED] == 0 and set(n4) == {"be1", "be3"}, n4
    assert n6[FAILED] == 0 and set(n6) == set(BACKENDS), n6
    assert not d.events("backend-down", vip=vip6)

    http_backends[sick].write_text("200\n")
    d.wait_event("backend-up", vip=vip4, backend=rig.endpoint(sick))
    n4 = rig.tcp_names(rig.spec.vip4, count=30, timeout=30)
    assert n4[FAILED] == 0 and set(n4) == set(BACKENDS), n4


def test_a_black_holed_backend_fails_by_timeout_without_delaying_the_others(
        rig: Rig, daemons: Callable[..., Daemon], nft: Callable[[str, str], None]) -> None:
    """be2 drops every TCP packet to the service port (nftables, input hook, in its namespace): a
    check's SYN is never answered, so it fails only at its timeout. Design bound for the verdict:
    fall x interval + timeout. Meanwhile the other backends' checks keep their pace: over a few
    seconds each gets about one check per interval, every one fast, and the last one is recent."""
    check = HealthCheck(type="tcp", interval=0.5, timeout=0.4, rise=2, fall=2)
    vip, hole = rig.vip_name(4, "tcp"), "be2"
    key = {r: f"{vip}|{rig.endpoint(r)}" for r in BACKENDS}
    d = daemons(vip_toml(rig, 4, "tcp", check=check))
    poll("a first check of every backend", all_checked(rig, vip, BACKENDS))

    nft(hole, f"table inet lbxhealth {{\n chain input {{\n type filter hook input priority 0; policy accept;\n"
              f"  tcp dport {rig.spec.port} drop\n }}\n}}\n")
    t_hole = time.time()
    t_event, ev = d.wait_event("backend-down", backend=rig.endpoint(hole))
    assert ev["check"] == "timeout", ev
    assert float(ev["latency"]) >= check.timeout - 0.01, ev
    detect = t_event - t_hole
    bound = check.fall * check.interval + check.timeout
    assert detect <= bound + SLACK, f"black hole detected after {detect:.3f}s; design <= {bound:g}s"
    rows = wait_health(rig, vip, {hole: "down"}, last_check="timeout")
    assert rows[hole]["check_latency"] >= check.timeout - 0.01, rows[hole]

    c0, t0 = checks_json(rig), time.time()
    poll("3 s of checks under the black hole", lambda: time.time() - t0 >= 3.0 and checks_json(rig) != c0, timeout=10)
    c1, t1 = checks_json(rig), time.time()
    span = c1[key["be1"]]["at"] - c0[key["be1"]]["at"]
    for r in ("be1", "be3"):
        done = c1[key[r]]["checks"] - c0[key[r]]["checks"]
        expected = (c1[key[r]]["at"] - c0[key[r]]["at"]) / check.interval
        assert done >= expected - 1 and done >= 4, f"{r}: {done} checks in {span:.2f}s (one per {check.interval}s)"
        assert c1[key[r]]["last"] == "connected" and c1[key[r]]["latency"] < 0.2, c1[key[r]]
        # checks.json is rewritten once a second: the newest check is at most interval + 1 s old.
        assert t1 - c1[key[r]]["at"] <= check.interval + 1.0 + SLACK, (r, t1 - c1[key[r]]["at"])
    assert c1[key[hole]]["last"] == "timeout" and c1[key[hole]]["checks"] > c0[key[hole]]["checks"]
    print(f"\n[health] black hole: backend-down {detect:.3f}s after the drop rule (design <= {bound:g}s); "
          f"the others meanwhile: {c1[key['be1']]['checks'] - c0[key['be1']]['checks']} and "
          f"{c1[key['be3']]['checks'] - c0[key['be3']]['checks']} checks in {span:.2f}s")
    names = rig.tcp_names(rig.spec.vip4, count=30, timeout=30)
    assert names[FAILED] == 0 and set(names) == {"be1", "be3"}, names

    rig.run(hole, "nft", "delete", "table", "inet", "lbxhealth")
    d.wait_event("backend-up", backend=rig.endpoint(hole))


FLAP_SECONDS = 30.0
FLAP_STOPPED = 1.5     # seconds each stop lasts (before the restart, which takes a little more)
FLAP_RUNNING = 1.0     # seconds it then runs (counted from when it answers)


def test_a_flapping_backend_never_crashes_the_daemon_nor_gets_flows_while_down(
        servers: Rig, daemons: Callable[..., Daemon]) -> None:
    """For FLAP_SECONDS (30 s) be1's server is stopped for FLAP_STOPPED (1.5 s), started, runs for
    FLAP_RUNNING (1 s), and so on: it changes state every second or so, about 12 times down and
    up again. It is checked every 0.2 s (timeout 0.1, fall 2, rise 2), while a client opens a
    connection every 20 ms (round robin: every third goes to be1 while it is in the table).

    The precise claim: a connection fails only if it reached be1 while be1 was not listening
    (be2 and be3 never stop), and the checker takes be1 out within W = fall x interval + timeout
    (0.5 s) + SLACK / 2 (the apply on a busy machine) = 1 s of a stop. So every failed connection
    must have been under way at a stop instant s, or started within W after it: a.end >= s and
    a.start <= s + W. be1 stays down longer than W (the stop, then its restart until it answers),
    so a connection that reached it late in a down period, after the verdict should have taken
    it out, fails this; the figures say how many seconds of down time were checked that way.
    The stopped time is 1.5 s rather than 1 s so that this checked part is not a sliver.
    (While be1 starts up it is already out: it went out at most W after the stop.) The flow
    table keeps a refused connection's entry; on_backend_down = "migrate" removes it with the
    verdict, so a new connection that reused its source port cannot follow it to the dead be1.

    Also: the daemon lives through it with no traceback; its backend-down/backend-up events for
    be1 alternate, start with down, and there are many of them (the flapping was seen); be1 got
    connections between its stops (the claim is not vacuous); at the end be1 runs, is up in
    status, and gets new connections.
    """
    rig, flapper = servers, "be1"
    check = HealthCheck(type="tcp", interval=0.2, timeout=0.1, rise=2, fall=2)
    vip = rig.vip_name(4, "tcp")
    d = daemons(vip_toml(rig, 4, "tcp", check=check, on_backend_down="migrate"))
    poll("a first check of every backend", all_checked(rig, vip, BACKENDS))
    window = check.fall * check.interval + check.timeout + SLACK / 2
    stops: list[float] = []
    answering: list[float] = []            # when each restarted server answered again

    with Prober(rig, rig.spec.vip4, pace=0.02, limit=FLAP_SECONDS + 60) as p:
        t_begin = time.time()
        p.wait_for(f"a connection greeted by {flapper}", lambda a: a.name == flapper, after=t_begin)
        t_flap = time.monotonic()
        while time.monotonic() - t_flap < FLAP_SECONDS:
            stops.append(time.time())
            rig.stop_server(flapper)
            next_t = time.monotonic() + FLAP_STOPPED
            assert d.alive(), d.text()
            time.sleep(max(0.0, next_t - time.monotonic()))     # the flapping schedule, not a wait for state
            rig.start_server(flapper)
            answering.append(time.time())
            next_t = time.monotonic() + FLAP_RUNNING
            time.sleep(max(0.0, next_t - time.monotonic()))
        t_done = time.time()
        d.wait_event("backend-up", count=len(d.events("backend-down", backend=rig.endpoint(flapper))) or 1,
                     backend=rig.endpoint(flapper), timeout=20)
        final = p.wait_for(f"a new connection greeted by {flapper} after the flapping", lambda a: a.name == flapper,
                           after=t_done)
        p.wait_for("connections 1 s after that", lambda a: True, after=final.end + 1.0)

    attempts = [a for a in p.attempts if a.start >= t_begin]
    failed = [a for a in attempts if a.error]
    stray = [a for a in failed if not any(a.end >= s and a.start <= s + window for s in stops)]
    downs = d.events("backend-down", backend=rig.endpoint(flapper))
    ups = d.events("backend-up", backend=rig.endpoint(flapper))
    seq = [name for _, name in sorted([(t, "down") for t, _ in downs] + [(t, "up") for t, _ in ups])]
    served = [a for a in attempts if a.name == flapper and a.start < t_done]
    latest = max((min((a.start - s for s in stops if a.end >= s), default=99) for a in failed), default=0)
    checked = sum(max(0.0, up - (s + window)) for s, up in zip(stops, answering))
    figures = (f"{len(stops)} stops in {FLAP_SECONDS:g}s, {len(attempts)} connections, {len(failed)} failed, "
               f"the latest starting {latest:.3f}s after its stop (allowed {window:.2f}s; "
               f"{checked:.1f}s of down time beyond that checked), {len(served)} served by {flapper}, "
               f"{len(downs)} down / {len(ups)} up events")
    print(f"\n[health] flapping: {figures}")
    assert d.alive(), d.text()
    assert "Traceback" not in d.text(), d.text()
    assert not stray, f"{len(stray)} connections failed outside the detection window: " \
                      f"{[(round(a.start - t_begin, 3), a.error) for a in stray[:10]]}; stops at " \
                      f"{[round(s - t_begin, 3) for s in stops]}; {figures}"
    assert seq and seq[0] == "down" and all(a != b for a, b in zip(seq, seq[1:])), seq
    assert seq[-1] == "up", seq
    assert len(downs) >= len(stops) // 2, figures
    assert len(served) >= len(stops), figures
    assert failed, figures
    assert all(a.name in BACKENDS for a in attempts if a.start > final.end), "failures after the flapping ended"
    rows = wait_health(rig, vip, {r: "up" for r in BACKENDS})
    assert rows[flapper]["last_check"] == "connected"


def test_migrate_moves_a_dead_backends_udp_flows_and_keep_does_not(
        servers: Rig, daemons: Callable[..., Daemon]) -> None:
    """K fixed UDP 5-tuples (source ports B..B+K-1) to an IPv4 VIP with on_backend_down = "keep"
    and to an IPv6 VIP with "migrate", both Maglev over be1..be3 with a UDP check. One backend
    dies; once it is marked down the same 5-tuples are sent again: on "keep" its flows still go
    to it (unanswered; its packet counter grows by exactly their number), on "migrate" they are
    answered by the others; every other flow stays where it was on both."""
    rig, k = servers, 30
    check = HealthCheck(type="udp", interval=0.3, timeout=0.25, rise=2, fall=2)
    keep, migrate = rig.vip_name(4, "udp"), rig.vip_name(6, "udp")
    d = daemons(vip_toml(rig, 4, "udp", check=check, scheduler="maglev", on_backend_down="keep")
                + vip_toml(rig, 6, "udp", check=check, scheduler="maglev", on_backend_down="migrate"))
    poll("a first check of every backend", lambda: all_checked(rig, keep, BACKENDS, "reply (8 bytes)")()
         and all_checked(rig, migrate, BACKENDS, "reply (8 bytes)")())

    first4 = rig.udp_flows(rig.spec.vip4, k, 23000, try_timeout=0.5)
    first6 = rig.udp_flows(rig.spec.vip6, k, 23000, try_timeout=0.5)
    assert None not in first4.values() and None not in first6.values(), (first4, first6)
    shares4, shares6 = Counter(first4.values()), Counter(first6.values())
    victim = max(BACKENDS, key=lambda r: min(shares4[r], shares6[r]))
    assert shares4[victim] and shares6[victim], (shares4, shares6)

    rig.stop_server(victim)
    d.wait_event("backend-down", vip=keep, backend=rig.endpoint(victim, 4))
    d.wait_event("backend-down", vip=migrate, backend=rig.endpoint(victim, 6))
    before = health(rig, keep)[victim]["packets"]
    second4 = rig.udp_flows(rig.spec.vip4, k, 23000, try_timeout=0.5)
    second6 = rig.udp_flows(rig.spec.vip6, k, 23000, try_timeout=0.5)
    after = health(rig, keep)[victim]["packets"]

    on4 = [p for p, r in first4.items() if r == victim]
    on6 = [p for p, r in first6.items() if r == victim]
    print(f"\n[health] {victim} died: keep: its {len(on4)} flows -> {dict(Counter(second4[p] for p in on4))}; "
          f"migrate: its {len(on6)} flows -> {dict(Counter(second6[p] for p in on6))}")
    assert all(second4[p] is None for p in on4), {p: second4[p] for p in on4}
    assert after - before == len(on4), (before, after, len(on4))
    assert all(second6[p] in BACKENDS and second6[p] != victim for p in on6), {p: second6[p] for p in on6}
    assert all(second4[p] == first4[p] for p in first4 if p not in on4)
    assert all(second6[p] == first6[p] for p in first6 if p not in on6)


def test_all_backends_down_drops_or_passes_as_the_vip_says(
        rig: Rig, daemons: Callable[..., Daemon], nft: Callable[[str, str], None]) -> None:
    """Every backend fails its check (TCP to a closed port: refused). On the IPv4 UDP VIP
    (on_all_down = "drop") datagrams are dropped in XDP, counted as drop/no_backend, and the
    balancer's netfilter never sees them; on the IPv6 one ("pass") they go up the balancer's own
    stack, counted as pass/no_backend, and its prerouting hook counts them."""
    n = 20
    check = HealthCheck(type="tcp", port=9, interval=0.2, timeout=0.1, rise=1, fall=1)
    drop, pas = rig.vip_name(4, "udp"), rig.vip_name(6, "udp")
    d = daemons(vip_toml(rig, 4, "udp", check=check, on_all_down="drop")
                + vip_toml(rig, 6, "udp", check=check, on_all_down="pass"))
    for vip in (drop, pas):
        for role in BACKENDS:
            d.wait_event("backend-down", vip=vip, backend=rig.endpoint(role, 4 if vip == drop else 6))
    rows = wait_health(rig, drop, {r: "down" for r in BACKENDS}, last_check="connection refused")
    assert not any(b["in_table"] for b in rows.values()), rows
    nft(LB, f"table inet lbxhealth {{\n chain pre {{\n type filter hook prerouting priority -300; policy accept;\n"
            f"  ip daddr {rig.spec.vip4} udp dport {rig.spec.port} counter\n"
            f"  ip6 daddr {rig.spec.vip6} udp dport {rig.spec.port} counter\n }}\n}}\n")

    r0 = reasons(rig)
    res4 = rig.client("udp", rig.spec.vip4, count=n, timeout=30, try_timeout=0.2)
    res6 = rig.client("udp", rig.spec.vip6, count=n, timeout=30, try_timeout=0.2)
    r1 = reasons(rig)
    counters = [int(x) for x in re.findall(r"counter packets (\d+)", rig.run(LB, "nft", "list", "table", "inet",
                                                                             "lbxhealth").stdout)]
    keys = (("drop", "no_backend"), ("pass", "no_backend"), ("tx", "forward"))
    delta = {k: r1.get(k, 0) - r0.get(k, 0) for k in keys}
    print(f"\n[health] all down: {n} datagrams to each VIP; reason deltas {delta}; lb prerouting saw "
          f"v4 {counters[0]}, v6 {counters[1]}")
    assert res4["failed"] == n and res6["failed"] == n, (res4, res6)
    assert delta[("drop", "no_backend")] == n, delta
    assert delta[("pass", "no_backend")] == n, delta
    assert delta[("tx", "forward")] == 0, delta
    assert counters == [0, n], counters


def test_set_health_forces_a_backend_out_and_in(servers: Rig, daemons: Callable[..., Daemon]) -> None:
    """`backend set-health VIP BE down` takes a healthy backend out of new flows, `auto` gives
    it back to its check; `up` keeps a failing one in (its new connections are then refused:
    that is what forcing it up means), and `auto` takes it out again."""
    rig = servers
    check = HealthCheck(type="tcp", interval=0.3, timeout=0.25, rise=2, fall=2)
    vip = rig.vip_name(4, "tcp")
    d = daemons(vip_toml(rig, 4, "tcp", check=check))
    poll("a first check of every backend", all_checked(rig, vip, BACKENDS))

    def new_conns() -> Counter[str]:
        return rig.tcp_names(rig.spec.vip4, count=30, timeout=30, try_timeout=1.0)

    lbxdp(rig, "backend", "set-health", vip, rig.endpoint("be1"), "down")
    rows = health(rig, vip)
    assert rows["be1"]["health"] == "down" and rows["be1"]["forced"] == "down" and not rows["be1"]["in_table"]
    ls = {rig.role_of(r["backend"]): r for r in json.loads(lbxdp(rig, "backend", "ls", vip, "--json"))}
    assert ls["be1"]["state"] == "down (forced)", ls["be1"]
    names = new_conns()
    assert names[FAILED] == 0 and set(names) == {"be2", "be3"}, names

    lbxdp(rig, "backend", "set-health", vip, rig.endpoint("be1"), "auto")
    rows = health(rig, vip)
    assert rows["be1"]["health"] == "up" and rows["be1"]["forced"] is None and rows["be1"]["in_table"], rows["be1"]
    names = new_conns()
    assert names[FAILED] == 0 and set(names) == set(BACKENDS), names

    rig.stop_server("be2")
    d.wait_event("backend-down", backend=rig.endpoint("be2"))
    names = new_conns()
    assert names[FAILED] == 0 and set(names) == {"be1", "be3"}, names
    lbxdp(rig, "backend", "set-health", vip, rig.endpoint("be2"), "up")
    rows = health(rig, vip)
    assert rows["be2"]["health"] == "up" and rows["be2"]["forced"] == "up" and rows["be2"]["in_table"], rows["be2"]
    assert rows["be2"]["last_check"] == "connection refused", rows["be2"]
    names = new_conns()
    # Round robin (per CPU): about every third new connection goes to the dead be2 and is refused.
    assert "be2" not in names and sum(names.values()) == 30 and 5 <= names[FAILED] <= 15, names

    lbxdp(rig, "backend", "set-health", vip, rig.endpoint("be2"), "auto")
    rows = health(rig, vip)
    assert rows["be2"]["health"] == "down" and rows["be2"]["forced"] is None and not rows["be2"]["in_table"]
    names = new_conns()
    assert names[FAILED] == 0 and set(names) == {"be1", "be3"}, names
    assert len(d.events("backend-down", backend=rig.endpoint("be2"))) == 1   # overrides are not transitions


def test_metrics_show_health_and_count_checks(servers: Rig, daemons: Callable[..., Daemon]) -> None:
    """With --metrics, scraped from inside the balancer's namespace: lbxdp_backend_healthy is 0
    for the dead backend and 1 for the others; lbxdp_health_check_seconds_count grows."""
    rig, dead, listen = servers, "be3", "127.0.0.1:9842"
    check = HealthCheck(type="tcp", interval=0.3, timeout=0.25, rise=2, fall=2)
    vip = rig.vip_name(4, "tcp")
    d = daemons(vip_toml(rig, 4, "tcp", check=check), metrics=listen)
    d.wait_event("metrics")
    poll("a first check of every backend", all_checked(rig, vip, BACKENDS))

    def scrape() -> dict[str, dict[tuple, float]]:
        text = rig.run(LB, "curl", "-sf", "--max-time", "5", f"http://{listen}/metrics").stdout
        out: dict[str, dict[tuple, float]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def healthy(m: dict) -> dict[str, float]:
        return {rig.role_of(dict(k)["backend"]): v for k, v in m.get("lbxdp_backend_healthy", {}).items()
                if dict(k)["vip"] == vip}

    def counts(m: dict) -> dict[str, float]:
        c: Counter[str] = Counter()
        for k, v in m.get("lbxdp_health_check_seconds_count", {}).items():
            if dict(k)["vip"] == vip:
                c[rig.role_of(dict(k)["backend"])] += v
        return c

    m0 = scrape()
    assert healthy(m0) == {r: 1.0 for r in BACKENDS}, healthy(m0)
    rig.stop_server(dead)
    d.wait_event("backend-down", backend=rig.endpoint(dead))
    m1 = scrape()
    assert healthy(m1) == {"be1": 1.0, "be2": 1.0, dead: 0.0}, healthy(m1)
    fails = {dict(k)["result"]: v for k, v in m1["lbxdp_health_check_seconds_count"].items()
             if dict(k)["backend"] == rig.endpoint(dead)}
    assert fails.get("fail", 0) >= check.fall, fails
    m2 = poll("check counts to grow", lambda: (m := scrape()) and all(counts(m)[r] > counts(m1)[r] for r in BACKENDS)
              and m, timeout=10, every=0.3)
    print(f"\n[health] metrics: healthy {healthy(m2)}; checks {dict(counts(m1))} -> {dict(counts(m2))}")
    assert all(counts(m1)[r] >= counts(m0)[r] for r in BACKENDS)
