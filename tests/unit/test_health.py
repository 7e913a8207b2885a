"""lbxdp.health against real loopback servers: probes, rise/fall, scheduling, concurrency, lifecycle.

No root. Every server is started by the test that uses it, on 127.0.0.1 or ::1, in the `servers`
fixture's own asyncio loop (a thread), and closed by it. Checkers come from the `checkers` fixture,
which stops them. Waits poll for a state with a deadline; the only sleeps are measurement windows
and the flapping server's toggles.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from lbxdp import health
from lbxdp.health import Checker, HealthCheck, Result, Target

V4, V6 = "127.0.0.1", "::1"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((V6, 0))
        return True
    except OSError:
        return False


FAMILIES = [V4, pytest.param(V6, marks=pytest.mark.skipif(not _has_ipv6(), reason="no ::1"))]


# --- servers -----------------------------------------------------------------------------------

class Servers:
    """An asyncio loop in a thread that runs the test's loopback servers; close() shuts them all."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self.thread.start()
        self.closers: list[Callable[[], None]] = []
        self.active = 0             # open connections now (http servers)
        self.max_active = 0
        self.requests: list[bytes] = []
        self.eofs = 0               # connections the checker closed on a silent server

    def run(self, coro: Any, timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tcp(self, host: str = V4, port: int = 0) -> tuple[int, Callable[[], None]]:
        """A server that accepts and closes; returns its port and a function that closes it."""
        async def start() -> asyncio.Server:
            return await asyncio.start_server(lambda r, w: w.close(), host, port)
        return self._keep(self.run(start()))

    def http(self, status: int | None = 200, delay: float = 0.0, host: str = V4,
             raw: bytes | None = None) -> int:
        """An HTTP server answering `status` after `delay` (None: never answers), counting connections."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                if status is None:
                    await reader.read()             # until the checker gives up and closes
                    self.eofs += 1
                    return
                await asyncio.sleep(delay)
                self.active -= 1                    # before the answer: the checker may reuse its slot at once
                writer.write(raw or f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                if status is None:
                    self.active -= 1
                writer.close()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(handle, host, 0)
        return self._keep(self.run(start()))[0]

    def udp(self, reply: Callable[[bytes], bytes | None], host: str = V4) -> int:
        """A UDP server answering reply(datagram) (None: stays silent)."""
        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                answer = reply(data)
                if answer is not None:
                    self.transport.sendto(answer, addr)

        async def start() -> asyncio.DatagramTransport:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Proto, local_addr=(host, 0))
            return transport
        transport = self.run(start())
        self.closers.append(lambda: self.loop.call_soon_threadsafe(transport.close))
        return transport.get_extra_info("sockname")[1]

    def _keep(self, server: asyncio.Server) -> tuple[int, Callable[[], None]]:
        def close() -> None:
            self.loop.call_soon_threadsafe(server.close)
        self.closers.append(close)
        return server.sockets[0].getsockname()[1], close

    def close(self) -> None:
        """Close every server, then cancel the handlers still running (a slow or silent one)."""
        async def shutdown() -> None:
            for close in self.closers:
                close()
            await asyncio.sleep(0)
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in handlers:
                t.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    """Function scope: a thread with an asyncio loop for loopback servers; all closed at the end."""
    s = Servers()
    yield s
    s.close()


def free_port(kind: int = socket.SOCK_STREAM, host: str = V4) -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- checkers and what they report -------------------------------------------------------------

@dataclass
class Recorder:
    """Every callback, in the order the checker made them, with the monotonic time of the call."""
    events: list[tuple[Any, ...]] = field(default_factory=list)   # ("result"|"change", key, ..., t)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_result(self, key: str, r: Result) -> None:
        with self.lock:
            self.events.append(("result", key, r, time.monotonic()))

    def on_change(self, key: str, healthy: bool, r: Result) -> None:
        with self.lock:
            self.events.append(("change", key, healthy, r, time.monotonic()))

    def of(self, key: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [e for e in self.events if e[1] == key]

    def results(self, key: str) -> list[Result]:
        return [e[2] for e in self.of(key) if e[0] == "result"]

    def changes(self, key: str) -> list[bool]:
        return [e[2] for e in self.of(key) if e[0] == "change"]

    def oks_until_change(self, key: str, n: int) -> list[bool]:
        """ok of every result of key up to the one that made its n-th change (1-based)."""
        oks, seen = [], 0
        for e in self.of(key):
            if e[0] == "result":
                oks.append(e[2].ok)
            elif (seen := seen + 1) == n:
                return oks
        raise AssertionError(f"{key} made fewer than {n} changes")


MakeChecker = Callable[..., tuple[Checker, Recorder]]


@pytest.fixture
def checkers() -> Iterator[MakeChecker]:
    """Function scope: make(*targets, **Checker kwargs) starts a Checker wired to a Recorder;
    every checker made is stopped at the end."""
    made: list[Checker] = []

    def make(*targets: Target, **kw: Any) -> tuple[Checker, Recorder]:
        rec = Recorder()
        c = Checker(kw.pop("on_change", rec.on_change), on_result=kw.pop("on_result", rec.on_result), **kw)
        c.set_targets(targets)
        made.append(c)
        c.start()
        return c, rec
    yield make
    for c in made:
        c.stop()


def wait_until(pred: Callable[[], Any], timeout: float = 3.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}")


def expected_changes(results: list[Result], rise: int, fall: int, healthy: bool = True) -> list[tuple[int, bool]]:
    """(index of the result, new state) of each transition the rise/fall rule predicts."""
    out, run_ok, run = [], None, 0
    for i, r in enumerate(results):
        run = run + 1 if r.ok == run_ok else 1
        run_ok = r.ok
        if healthy and not r.ok and run >= fall or not healthy and r.ok and run >= rise:
            healthy = not healthy
            out.append((i, healthy))
    return out


def assert_valid_transitions(rec: Recorder, key: str, rise: int, fall: int, healthy: bool = True) -> list[bool]:
    """Each change comes right after the result that completed `rise` successes / `fall` failures,
    and no other change is made. Call it once the checker is stopped: a running one may have
    reported a result and not yet its change."""
    seen, results = [], []
    for e in rec.of(key):
        if e[0] == "result":
            results.append(e[2])
        else:
            assert e[3] is results[-1], "a change is reported with the result that caused it"
            seen.append((len(results) - 1, e[2]))
    assert seen == expected_changes(results, rise, fall, healthy)
    return [s for _, s in seen]


def tcp(port: int, host: str = V4, key: str | None = None, **kw: Any) -> Target:
    kw = {"interval": 0.05, "timeout": 0.5} | kw
    return Target(key or f"{host}:{port}", host, port, HealthCheck("tcp", **kw))


def probe(t: Target) -> Result:
    return asyncio.run(health.probe(t))


# --- probes, one check at a time ----------------------------------------------------------------

@pytest.mark.parametrize("host", FAMILIES)
def test_tcp_probe_connects(servers: Servers, host: str) -> None:
    port, _ = servers.tcp(host)
    r = probe(tcp(port, host))
    assert (r.ok, r.detail) == (True, "connected")
    assert 0 < r.latency < 0.5 and abs(r.at - time.time()) < 1


@pytest.mark.parametrize("host", FAMILIES)
def test_tcp_probe_refused(host: str) -> None:
    r = probe(tcp(free_port(host=host), host))
    assert (r.ok, r.detail) == (False, "connection refused")


@pytest.mark.parametrize("status,accepted,ok", [
    (200, (200,), True), (500, (200,), False), (301, (200, 301), True), (204, (200,), False)])
def test_http_probe_status(servers: Servers, status: int, accepted: tuple[int, ...], ok: bool) -> None:
    port = servers.http(status)
    r = probe(Target("h", V4, port, HealthCheck("http", timeout=1, http_status=accepted)))
    assert (r.ok, r.detail) == (ok, f"HTTP {status}")


def test_http_probe_sends_method_path_and_host(servers: Servers) -> None:
    port = servers.http(200)
    check = HealthCheck("http", http_method="HEAD", http_path="/healthz?deep=1", http_host="svc.example")
    assert probe(Target("h", V4, port, check)).ok
    assert servers.requests[-1] == (b"HEAD /healthz?deep=1 HTTP/1.1\r\nHost: svc.example\r\n"
                                    b"Connection: close\r\nUser-Agent: lbxdp-health\r\n\r\n")


@pytest.mark.parametrize("host,expect", [
    (V4, "127.0.0.1:{port}"), pytest.param(V6, "[::1]:{port}", marks=FAMILIES[1].marks)])
def test_http_probe_default_host_is_the_address(servers: Servers, host: str, expect: str) -> None:
    port = servers.http(200, host=host)
    assert probe(Target("h", host, port, HealthCheck("http"))).ok
    assert f"\r\nHost: {expect.format(port=port)}\r\n".encode() in servers.requests[-1]


def test_http_probe_rejects_a_non_http_answer(servers: Servers) -> None:
    port = servers.http(raw=b"SSH-2.0-OpenSSH\r\n")
    r = probe(Target("h", V4, port, HealthCheck("http")))
    assert not r.ok and r.detail.startswith("not an HTTP status line")


def test_http_probe_on_a_silent_server_times_out_at_timeout(servers: Servers) -> None:
    port = servers.http(None)
    r = probe(Target("h", V4, port, HealthCheck("http", timeout=0.3)))
    assert (r.ok, r.detail) == (False, "timeout")
    assert 0.3 <= r.latency < 0.45
    wait_until(lambda: servers.eofs == 1, what="the checker to close its connection")


@pytest.mark.parametrize("host", FAMILIES)
@pytest.mark.parametrize("expect,ok,detail", [
    (None, True, "reply (9 bytes)"), (b"pong", True, "reply (9 bytes)"),
    (b"nope", False, "unexpected reply: b'pong:ping'")])
def test_udp_probe_reply(servers: Servers, host: str, expect: bytes | None, ok: bool, detail: str) -> None:
    port = servers.udp(lambda d: b"pong:" + d, host)
    r = probe(Target("u", host, port, HealthCheck("udp", timeout=1, udp_expect=expect)))
    assert (r.ok, r.detail) == (ok, detail)


def test_udp_probe_without_reply_times_out(servers: Servers) -> None:
    port = servers.udp(lambda d: None)
    r = probe(Target("u", V4, port, HealthCheck("udp", timeout=0.3)))
    assert (r.ok, r.detail) == (False, "no reply (timeout)")
    assert 0.3 <= r.latency < 0.45


@pytest.mark.parametrize("host", FAMILIES)
def test_udp_probe_port_unreachable_fails_at_once(host: str) -> None:
    r = probe(Target("u", host, free_port(socket.SOCK_DGRAM, host), HealthCheck("udp", timeout=1)))
    assert (r.ok, r.detail) == (False, "connection refused")
    assert r.latency < 0.5          # the ICMP error, not the timeout


def test_probe_turns_any_exception_into_a_failed_result(monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(t: Target) -> tuple[bool, str]:
        raise ValueError("boom")
    monkeypatch.setitem(health._PROBES, "tcp", boom)
    r = probe(tcp(1))
    assert (r.ok, r.detail) == (False, "error: ValueError: boom")


@pytest.mark.parametrize("kw", [
    {"type": "icmp"}, {"type": "tcp", "interval": 0}, {"type": "tcp", "timeout": -1}, {"type": "tcp", "rise": 0},
    {"type": "tcp", "port": 70000}, {"type": "http", "http_path": "/a b"}, {"type": "http", "http_path": "x"},
    {"type": "http", "http_status": ()}, {"type": "http", "http_host": "a\r\nX: y"}])
def test_bad_checks_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HealthCheck(**kw)


def test_targets_take_ip_literals_only() -> None:
    with pytest.raises(ValueError):
        Target("t", "backend.example", 80, HealthCheck("tcp"))


def test_checks_are_hashable_and_compare_by_value() -> None:
    a = HealthCheck("http", http_status=[200, 204])     # type: ignore[arg-type] - a TOML array
    b = HealthCheck("http", http_status=(200, 204))
    assert a == b and hash(a) == hash(b)


# --- the checker: rise/fall ----------------------------------------------------------------------

def test_refused_goes_down_after_exactly_fall_then_up_after_exactly_rise(
        servers: Servers, checkers: MakeChecker) -> None:
    port = free_port()
    t = tcp(port, rise=2, fall=3)
    c, rec = checkers(t)
    assert c.states()[t.key].healthy            # starts healthy
    wait_until(lambda: rec.changes(t.key) == [False], what="down")
    assert rec.oks_until_change(t.key, 1) == [False] * 3                  # exactly `fall` failures
    assert rec.results(t.key)[0].detail == "connection refused" and c.states()[t.key].healthy is False

    servers.tcp(port=port)                      # the backend comes back on the same port
    wait_until(lambda: rec.changes(t.key) == [False, True], what="up")
    assert rec.oks_until_change(t.key, 2)[-3:] == [False, True, True]     # exactly `rise` successes
    up_result = [e for e in rec.of(t.key) if e[0] == "change"][-1][3]
    s = c.states()[t.key]
    assert s.healthy and s.failures == 0 and s.since == up_result.at
    c.stop()
    assert_valid_transitions(rec, t.key, rise=2, fall=3)


def test_http_500_goes_down_200_stays_up(servers: Servers, checkers: MakeChecker) -> None:
    ok = Target("ok", V4, servers.http(200), HealthCheck("http", interval=0.05, timeout=0.5, fall=2))
    bad = Target("bad", V4, servers.http(500), HealthCheck("http", interval=0.05, timeout=0.5, fall=2))
    c, rec = checkers(ok, bad)
    wait_until(lambda: rec.changes("bad") == [False] and len(rec.results("ok")) >= 3, what="bad down")
    assert rec.changes("ok") == [] and c.states()["ok"].healthy
    assert c.states()["bad"].last.detail == "HTTP 500"
    c.stop()
    assert_valid_transitions(rec, "bad", rise=2, fall=2)


def test_initial_healthy_false_needs_rise_successes(servers: Servers, checkers: MakeChecker) -> None:
    port, _ = servers.tcp()
    t = tcp(port, rise=3)
    c, rec = checkers(t, initial_healthy=False)
    assert c.states()[t.key].healthy is False
    wait_until(lambda: rec.changes(t.key) == [True], what="up")
    assert rec.oks_until_change(t.key, 1) == [True] * 3


# --- the checker: schedule, timeouts, concurrency -----------------------------------------------

def test_black_holed_targets_do_not_delay_the_others(servers: Servers, checkers: MakeChecker) -> None:
    silent = servers.http(None)
    holes = [Target(f"hole{i}", V4, silent, HealthCheck("http", interval=0.1, timeout=0.3)) for i in range(5)]
    port, _ = servers.tcp()
    fine = tcp(port, key="fine", interval=0.05)
    c, rec = checkers(fine, *holes)
    wait_until(lambda: all(rec.results(h.key) for h in holes), what="a first timeout of every black hole")
    window = time.time()
    time.sleep(1.1)                                         # the measurement window: [window, window + 1)
    starts = [r.at - r.latency for r in rec.results("fine")]
    done = sum(window <= s < window + 1 for s in starts)
    assert 19 <= done <= 21, f"{done} checks started in 1 s at a 0.05 s interval"
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert abs(statistics.median(gaps) - 0.05) < 0.01 and max(gaps) < 0.12
    for h in holes:
        r = rec.results(h.key)[0]
        assert (r.ok, r.detail) == (False, "timeout") and 0.3 <= r.latency < 0.45


def test_first_checks_are_spread_over_the_interval(servers: Servers, checkers: MakeChecker) -> None:
    port, _ = servers.tcp()
    targets = [tcp(port, key=f"t{i}", interval=0.5) for i in range(40)]
    started = time.time()
    _, rec = checkers(*targets)
    firsts = [wait_until(lambda k=t.key: rec.results(k), what="first checks")[0] for t in targets]
    offsets = sorted(r.at - r.latency - started for r in firsts)
    assert offsets[0] >= 0 and offsets[-1] < 0.6
    assert offsets[-1] - offsets[0] > 0.25, f"40 first checks all within {offsets[-1] - offsets[0]:.3f} s"


def test_concurrency_is_bounded(servers: Servers, checkers: MakeChecker) -> None:
    targets = [Target(f"slow{i}", V4, servers.http(200, delay=0.15), HealthCheck("http", interval=0.1, timeout=1))
               for i in range(10)]
    c, rec = checkers(*targets, max_concurrency=3)
    wait_until(lambda: sum(s.checks for s in c.states().values()) >= 15, timeout=4, what="15 checks")
    assert servers.max_active == 3
    # a check waiting for a slot is not timed out: the wait is not the backend's fault
    assert all(r.ok for t in targets for r in rec.results(t.key))


# --- the checker: set_targets, callbacks, flapping, stop ----------------------------------------

def test_set_targets_keeps_unchanged_resets_changed_drops_removed(
        servers: Servers, checkers: MakeChecker) -> None:
    port, _ = servers.tcp()
    dead = free_port()
    a, b, gone = tcp(port, key="a"), tcp(dead, key="b", fall=2), tcp(port, key="gone")
    c, rec = checkers(a, b, gone)
    wait_until(lambda: rec.changes("b") == [False] and len(rec.results("a")) >= 3, what="b down")
    a_before = c.states()["a"]

    b2 = tcp(dead, key="b", fall=3)                     # same key, another check
    before = time.time()
    c.set_targets([tcp(port, key="a"), b2, tcp(port, key="new")])   # an equal, not identical, a
    set_at = time.monotonic()
    now = c.states()
    assert set(now) == {"a", "b", "new"}
    assert now["a"].checks >= a_before.checks and now["a"].since == a_before.since
    assert now["b"].healthy and now["b"].since >= before and now["new"].healthy

    wait_until(lambda: rec.changes("b") == [False, False] and rec.results("new"), what="b down again")
    assert [r.ok for r in rec.results("b")][-3:] == [False] * 3       # the new fall=3 decides
    assert c.states()["a"].checks > a_before.checks
    assert not [e for e in rec.of("gone") if e[-1] > set_at + 0.05], "no callback for a removed target"


def test_raising_callbacks_do_not_stop_the_checker(servers: Servers, checkers: MakeChecker,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    calls = {"change": 0, "result": 0}

    def bad_change(*_: Any) -> None:
        calls["change"] += 1
        raise RuntimeError("on_change bug")

    def bad_result(*_: Any) -> None:
        calls["result"] += 1
        raise RuntimeError("on_result bug")

    port = free_port()
    t = tcp(port, rise=1, fall=1)
    c, _ = checkers(t, on_change=bad_change, on_result=bad_result)
    wait_until(lambda: not c.states()[t.key].healthy, what="down")
    servers.tcp(port=port)
    wait_until(lambda: c.states()[t.key].healthy, what="up again")
    checks = c.states()[t.key].checks
    wait_until(lambda: calls["result"] >= checks + 3, what="more checks")
    assert calls["change"] == 2
    assert any("on_change callback raised" in r.message for r in caplog.records)


def test_flapping_backend_gives_only_valid_transitions(servers: Servers, checkers: MakeChecker) -> None:
    port, close = servers.tcp()
    t = tcp(port, rise=2, fall=3)
    c, rec = checkers(t)
    for i in range(10):                                     # toggled every 0.2 s for 2 s
        time.sleep(0.2)
        if i % 2 == 0:
            close()
        else:
            _, close = servers.tcp(port=port)
    close()
    checks = c.states()[t.key].checks
    wait_until(lambda: c.states()[t.key].checks > checks, what="checks to go on")
    c.stop()
    changes = assert_valid_transitions(rec, t.key, rise=2, fall=3)
    assert len(changes) >= 4 and changes == [False, True] * (len(changes) // 2) + [False] * (len(changes) % 2)


def test_stop_cancels_checks_in_flight_and_ends_the_thread(servers: Servers) -> None:
    silent = servers.http(None)
    port, _ = servers.tcp()
    c = Checker(lambda *_: None)
    c.set_targets([Target("hole", V4, silent, HealthCheck("http", interval=0.05, timeout=3)),
                   tcp(port, key="fine")])
    c.start()
    wait_until(lambda: servers.requests and c.states()["fine"].checks, what="a check of each, one in flight")
    tasks = [task for _, task in c._tasks.values()]
    started = time.monotonic()
    c.stop()
    assert time.monotonic() - started < 1.0                 # not the 3 s timeout
    assert all(task.done() for task in tasks)
    assert not [th for th in threading.enumerate() if th.name == "lbxdp-health"]
    wait_until(lambda: servers.eofs == 1, what="the in-flight connection to be closed")
    after = c.states()
    time.sleep(0.1)                                         # 2 intervals: no check may run
    assert c.states() == after
    c.set_targets([])                                       # harmless once stopped
    c.stop()                                                # and so is a second stop
    assert c.states() == {}
