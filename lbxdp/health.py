"""Active health checks of backends (tcp, http, udp), with HAProxy's rise/fall hysteresis.

Pure asyncio, no kernel: the daemon hands a Checker its Targets and gets a callback on every
transition; it alone writes the verdict into the maps (balancer.py).

Decisions (HAProxy's, where HAProxy has one):
  starts healthy   A new target (or one whose check changed) starts UP, so traffic flows at once,
                   and needs `fall` consecutive failures to go down: HAProxy's `init-state
                   fully-up`. (HAProxy's default, `up`, drops a new server at its first failure:
                   one failed check as the daemon restarts should not take a backend out.)
                   Checker(initial_healthy=False) starts targets DOWN instead: `rise` consecutive
                   successes bring them up (`fully-down`).
  hysteresis       Consecutive counts: UP goes DOWN after `fall` failures in a row, DOWN goes UP
                   after `rise` successes in a row; any other result resets the opposite count.
                   HAProxy's single health counter (0 .. rise+fall-1, snapped to the top by a
                   success once up, to 0 by a failure once below rise) is exactly this.
  schedule         Each target is checked every `interval` seconds on a fixed grid, so a slow
                   check does not push the next ones later. The first check comes after a random
                   offset in [0, interval): 500 targets do not fire together. One target never
                   has two checks in flight: a check that ends after its next slot (timeout >
                   interval, or waiting for a free slot) is followed by the next one at once.
  timeout          bounds one check from the moment it has a slot (waiting for a slot under
                   max_concurrency is not the backend's fault). A black-holed backend holds one
                   slot for `timeout` and delays nobody else's check, as long as fewer than
                   max_concurrency backends are black-holed at once.
  verdict          tcp: the connection is established. http: the status code of the first line
                   is in http_status (the request says "Connection: close"; the rest of the
                   response is not read: the connection is closed after the status line).
                   udp: a reply arrives within timeout and contains udp_expect (when set); an
                   ICMP port unreachable fails at once as "connection refused", silence fails at
                   the timeout as "no reply (timeout)".
  failures         Nothing a backend does can raise out of a probe: every exception becomes a
                   failed Result whose detail says what happened. Callback exceptions are logged
                   and swallowed.
  callbacks        on_change(key, healthy, result) on every transition, on_result(key, result)
                   after every check, both from the checker's thread: keep them quick (hand the
                   event to a queue); a slow callback delays every check.
  set_targets      Keeps the state (and the schedule) of a target whose Target is unchanged
                   (key, address, port and check); any other target starts afresh. A removed
                   target gets no callback once set_targets has returned, except one already
                   under way: callers should ignore keys they no longer hold.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import ipaddress
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Iterable

log = logging.getLogger(__name__)



class CheckType(enum.StrEnum):
    TCP = "tcp"     # the connection is established
    HTTP = "http"   # the status line's code is in http_status
    UDP = "udp"     # a reply arrives (containing udp_expect, when set)


class Via(enum.StrEnum):
    """How an ipip/gue backend is probed (`[vip.health] via`; dsr backends are always probed directly)."""
    TUNNEL = "tunnel"   # VIP:port through the tunnel (lbxdp.probe): what the data path tests; the default
    DIRECT = "direct"   # the backend's own address:port, no tunnel


USER_AGENT = "lbxdp-health"
_MAX_STATUS_LINE = 4096


@dataclass(frozen=True)
class HealthCheck:
    type: CheckType                         # a string ("tcp") is taken as its CheckType
    port: int | None = None                 # None: the backend's port
    interval: float = 2.0                   # seconds between the starts of two checks
    timeout: float = 1.0                    # seconds one check may take
    rise: int = 2                           # consecutive successes to go up
    fall: int = 3                           # consecutive failures to go down
    http_method: str = "GET"
    http_path: str = "/"
    http_status: tuple[int, ...] = (200,)   # accepted status codes
    http_host: str | None = None            # Host header (default: the address, and :port unless 80)
    udp_payload: bytes = b"ping"
    udp_expect: bytes | None = None         # the reply must contain this (None: any reply)
    via: Via | None = None                  # ipip/gue backends: None = TUNNEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "http_status", tuple(self.http_status))
        if self.type in tuple(CheckType):
            object.__setattr__(self, "type", CheckType(self.type))
        if self.via is not None and self.via in tuple(Via):
            object.__setattr__(self, "via", Via(self.via))
        problems = [
            (not isinstance(self.type, CheckType),
             f"type {self.type!r} is not one of {', '.join(t.value for t in CheckType)}"),
            (self.port is not None and not 0 < self.port < 65536, f"port {self.port} is not in 1..65535"),
            (not self.interval > 0, f"interval {self.interval} is not positive"),
            (not self.timeout > 0, f"timeout {self.timeout} is not positive"),
            (self.rise < 1 or self.fall < 1, f"rise {self.rise} and fall {self.fall} must be at least 1"),
            (not self.http_status or not all(100 <= s <= 599 for s in self.http_status),
             f"http_status {self.http_status} must be HTTP codes (100..599)"),
            (not _token(self.http_method), f"http_method {self.http_method!r} is not one word"),
            (not _token(self.http_path) or not self.http_path.startswith("/"),
             f"http_path {self.http_path!r} must start with '/' and hold no space"),
            (self.http_host is not None and not _token(self.http_host), f"http_host {self.http_host!r} is not a host"),
            (self.via is not None and not isinstance(self.via, Via),
             f"via {self.via!r} is not one of {', '.join(v.value for v in Via)}"),
        ]
        for bad, why in problems:
            if bad:
                raise ValueError(f"health check: {why}")


def _token(s: str) -> bool:
    """One printable ASCII word: nothing that could end a request line or a header."""
    return bool(s) and s.isascii() and s.isprintable() and " " not in s


@dataclass(frozen=True)
class Target:
    key: Hashable       # stable id chosen by the caller (the daemon's: a model.BackendId), shown by str()
    address: str        # IP literal, v4 or v6
    port: int
    check: HealthCheck
    mark: int = 0       # SO_MARK of the probe socket (lbxdp.probe.mark: through the tunnel); 0 = none

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.address)          # ValueError for a name: no DNS in a check
        if not 0 < self.port < 65536:
            raise ValueError(f"health target {self.key}: port {self.port} is not in 1..65535")

    @property
    def check_port(self) -> int:
        return self.check.port or self.port


@dataclass(frozen=True)
class Result:
    ok: bool
    latency: float      # seconds, from the start of the check to its verdict
    detail: str         # "connected", "HTTP 500", "timeout", "connection refused", "no reply (timeout)", ...
    at: float           # time.time() of the verdict


@dataclass
class TargetState:
    healthy: bool       # starts as Checker(initial_healthy=...) says: True by default
    since: float        # time.time() when healthy last changed, or the target was added
    last: Result | None
    successes: int      # consecutive
    failures: int       # consecutive
    checks: int         # total


# --- probes: one check each, never raising but for cancellation ---------------------------------

async def probe(t: Target) -> Result:
    """Check t once, within t.check.timeout."""
    c, loop = t.check, asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(c.timeout):
            ok, detail = await _PROBES[c.type](t)
    except TimeoutError:
        ok, detail = False, "no reply (timeout)" if c.type is CheckType.UDP else "timeout"
    except ConnectionRefusedError:
        ok, detail = False, "connection refused"
    except OSError as e:
        ok, detail = False, (e.strerror or str(e) or type(e).__name__).lower()
    except Exception as e:      # noqa: BLE001 - a backend must never crash the checker
        ok, detail = False, f"error: {type(e).__name__}: {e}"
    return Result(ok, loop.time() - start, detail, time.time())


def _socket(t: Target) -> socket.socket:
    """A non-blocking TCP socket for t. tcp and http checks use bare sockets with loop.sock_*:
    asyncio.open_connection's transport and streams cost a third more CPU per check
    (scripts/bench_health.py: 500 tcp targets at 1 s, 7.6% of a core with streams, 5.6% bare)."""
    return _marked(socket.socket(socket.AF_INET6 if ":" in t.address else socket.AF_INET, socket.SOCK_STREAM), t)


def _marked(sock: socket.socket, t: Target) -> socket.socket:
    """sock non-blocking, with t's SO_MARK (a probe through the tunnel: bpf/probe.c keys on it)."""
    try:
        sock.setblocking(False)
        if t.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, t.mark)
    except BaseException:
        sock.close()
        raise
    return sock


async def _tcp(t: Target) -> tuple[bool, str]:
    with _socket(t) as sock:
        await asyncio.get_running_loop().sock_connect(sock, (t.address, t.check_port))
    return True, "connected"


async def _http(t: Target) -> tuple[bool, str]:
    c, loop = t.check, asyncio.get_running_loop()
    with _socket(t) as sock:
        await loop.sock_connect(sock, (t.address, t.check_port))
        await loop.sock_sendall(sock, f"{c.http_method} {c.http_path} HTTP/1.1\r\nHost: {c.http_host or _host(t)}\r\n"
                                      f"Connection: close\r\nUser-Agent: {USER_AGENT}\r\n\r\n".encode("ascii"))
        head = b""
        while b"\n" not in head and len(head) < _MAX_STATUS_LINE:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                break
            head += chunk
    line = head.split(b"\n", 1)[0]
    if not line:
        return False, "closed before the status line"
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        return False, f"not an HTTP status line: {line[:40]!r}"
    code = int(parts[1])
    return code in c.http_status, f"HTTP {code}"


def _host(t: Target) -> str:
    """The Host header for t: the address ([bracketed] if v6), with the port unless it is 80."""
    host = f"[{t.address}]" if ":" in t.address else t.address
    return host if t.check_port == 80 else f"{host}:{t.check_port}"


class _OneReply(asyncio.DatagramProtocol):
    """The first datagram (or error) on a connected UDP socket, as a future."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:    # ICMP unreachable: ConnectionRefusedError
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("socket closed"))


async def _udp(t: Target) -> tuple[bool, str]:
    c = t.check
    sock = _marked(socket.socket(socket.AF_INET6 if ":" in t.address else socket.AF_INET, socket.SOCK_DGRAM), t)
    try:
        sock.connect((t.address, t.check_port))
    except BaseException:
        sock.close()
        raise
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(_OneReply, sock=sock)
    try:
        transport.sendto(c.udp_payload)
        data = await proto.reply
    finally:
        transport.close()
    if c.udp_expect is not None and c.udp_expect not in data:
        return False, f"unexpected reply: {data[:40]!r}"
    return True, f"reply ({len(data)} bytes)"


_PROBES: dict[CheckType, Callable[[Target], Awaitable[tuple[bool, str]]]] = {
    CheckType.TCP: _tcp, CheckType.HTTP: _http, CheckType.UDP: _udp}


# --- the checker -------------------------------------------------------------------------------

class Checker:
    """Checks a set of targets on their own schedules, in one asyncio loop in a daemon thread.

    Thread-safe: set_targets, states, start and stop may be called from any thread.
    """

    def __init__(self, on_change: Callable[[str, bool, Result], None], max_concurrency: int = 64,
                 on_result: Callable[[str, Result], None] | None = None, initial_healthy: bool = True):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency {max_concurrency} must be at least 1")
        self._on_change, self._on_result = on_change, on_result
        self._max_concurrency, self._initial_healthy = max_concurrency, initial_healthy
        self._lock = threading.Lock()              # guards _targets, _states and _loop
        self._targets: dict[str, Target] = {}      # what set_targets asked for
        self._states: dict[str, TargetState] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # loop-thread only:
        self._tasks: dict[str, tuple[Target, asyncio.Task[None]]] = {}
        self._stopping: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None

    probe = staticmethod(probe)

    # --- any thread ---
    def set_targets(self, targets: Iterable[Target]) -> None:
        """Check exactly these targets from now on (see the module doc for what is kept)."""
        new: dict[str, Target] = {}
        for t in targets:
            if t.key in new:
                raise ValueError(f"health targets: key {t.key!r} appears twice")
            new[t.key] = t
        now = time.time()
        with self._lock:
            for key, t in new.items():
                if self._targets.get(key) == t:
                    new[key] = self._targets[key]       # the running task knows it by identity
                else:
                    self._states[key] = TargetState(self._initial_healthy, now, None, 0, 0, 0)
            for key in self._targets.keys() - new.keys():
                del self._states[key]
            self._targets = new
            loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._reconcile)
            except RuntimeError:                        # stopping: the loop is already closed
                pass

    def states(self) -> dict[str, TargetState]:
        """A copy of every target's state."""
        with self._lock:
            return {k: dataclasses.replace(s) for k, s in self._states.items()}

    def probe_now(self, t: Target) -> "concurrent.futures.Future[Result]":
        """One check of t now, outside its schedule and its rise/fall (passive health's
        confirmation, lbxdp.passive): a future of its Result, from the checker's loop."""
        with self._lock:
            loop = self._loop
        if loop is None:
            raise RuntimeError("the health checker is not running")
        return asyncio.run_coroutine_threadsafe(probe(t), loop)

    def mark_down(self, key: Hashable, r: Result) -> bool:
        """Set a target DOWN without a callback (the caller applied it: passive health), so that
        `rise` successes in a row bring it back up. False if key is not a target."""
        with self._lock:
            s = self._states.get(key)
            if s is None:
                return False
            if s.healthy:
                s.healthy, s.since = False, r.at
            s.successes, s.last = 0, r
            return True

    def start(self) -> None:
        """Start checking, in a daemon thread of its own."""
        if self._thread is not None:
            raise RuntimeError("the health checker is already running")
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(ready),),
                                        name="lbxdp-health", daemon=True)
        self._thread.start()
        if not ready.wait(5.0):
            raise RuntimeError("the health checker's thread did not start")

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every check and join the thread (a no-op if not running)."""
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("the health checker cannot be stopped from its own callbacks")
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._stopping.set)   # type: ignore[union-attr]
            except RuntimeError:
                pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("health checker thread did not stop within %.1f s", timeout)
            return
        self._thread = None

    # --- the checker's thread ---
    async def _main(self, ready: threading.Event) -> None:
        self._stopping, self._slots = asyncio.Event(), asyncio.Semaphore(self._max_concurrency)
        self._tasks = {}
        with self._lock:
            self._loop = asyncio.get_running_loop()
        self._reconcile()
        ready.set()
        await self._stopping.wait()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}

    def _reconcile(self) -> None:
        """Make the running tasks match _targets: one task per target object."""
        if self._stopping is None or self._stopping.is_set():
            return
        with self._lock:
            wanted = dict(self._targets)
        for key, (t, task) in list(self._tasks.items()):
            if wanted.get(key) is not t:
                task.cancel()
                del self._tasks[key]
        loop = asyncio.get_running_loop()
        for key, t in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = (t, loop.create_task(self._watch(t), name=f"health {key}"))

    async def _watch(self, t: Target) -> None:
        """Check t every interval, forever (until cancelled)."""
        loop, every = asyncio.get_running_loop(), t.check.interval
        due = loop.time() + random.random() * every
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                async with self._slots:                 # type: ignore[union-attr]
                    result = await probe(t)
                self._record(t, result)
            except Exception:                           # noqa: BLE001 - a bug here must not end t's checks
                log.exception("health check of %s failed unexpectedly", t.key)
            due = max(due + every, loop.time())

    def _record(self, t: Target, r: Result) -> None:
        c = t.check
        with self._lock:
            if self._targets.get(t.key) is not t:       # removed or replaced while it was checked
                return
            s = self._states[t.key]
            s.checks, s.last = s.checks + 1, r
            if r.ok:
                s.successes, s.failures = s.successes + 1, 0
            else:
                s.successes, s.failures = 0, s.failures + 1
            changed = s.failures >= c.fall if s.healthy else s.successes >= c.rise
            if changed:
                s.healthy, s.since = not s.healthy, r.at
            healthy, run = s.healthy, (s.successes if r.ok else s.failures)
        if self._on_result is not None and self._current(t):
            self._call("on_result", self._on_result, t.key, r)
        if changed:
            log.info("%s is %s after %d %s in a row (%s, %.1f ms)", t.key, "UP" if healthy else "DOWN",
                     run, "successes" if r.ok else "failures", r.detail, r.latency * 1e3)
            if self._current(t):
                self._call("on_change", self._on_change, t.key, healthy, r)

    def _current(self, t: Target) -> bool:
        with self._lock:
            return self._targets.get(t.key) is t

    @staticmethod
    def _call(name: str, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:                               # noqa: BLE001 - a callback must not stop the checks
            log.exception("health %s callback raised (ignored)", name)
