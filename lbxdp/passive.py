"""Passive health of NAT backends (issue 12, [vip.passive_health]): the decisions, as pure
functions and one small tracker, with no kernel and no clock of their own (tests/unit).

What the data path gives (bpf/nat.h, lbx_nat_be per backend entry): `consecutive` failed
handshakes since the last SYN-ACK (an RST answering a SYN, a client's SYN retransmitted while
SYN_SENT), reset to 0 by a SYN-ACK, and running totals (syn_rst, syn_retx, synack). The daemon's
GC adds handshakes still without a SYN-ACK after `timeout` seconds (conntrack.Gc.syn_timeout).
A dsr/ipip/gue VIP (issue 13, bpf/select.h) sees no SYN-ACK: the handshake's final ACK stands for
it, and `pending` counts new handshakes since the last one, `pending_since` the first one's
CLOCK_MONOTONIC time. Once that first one is `timeout` old without an ACK, the `pending`
handshakes in a row count as failed (unfinished): the backend has finished none for `timeout`
while they came, which needs no client retransmission (Linux's first comes after 1 s).

The semantics (HAProxy `observe layer4` with `on-error mark-down`, nginx `max_fails`):
  suspect   `failures` failed handshakes in a row (since the control plane last accounted for
            this backend: its baseline) make the backend *suspected*. Nothing changes yet.
  confirm   a suspected backend gets one immediate active check of the service the clients
            use (a TCP handshake to the backend's address:port): passing clears the suspicion
            (and the count starts over), failing confirms it. A spoofed SYN flood can make a
            healthy backend's counters look bad; it cannot make the backend fail a check.
  cap       a confirmed backend is marked down only while fewer than floor(max_ejected x the
            VIP's backends) of that VIP's backends are down for passive health; past the cap
            it stays up (ejection-capped) and its count starts over. With one backend and the
            default 0.5 the cap is 0: passive health never takes the last backend out alone.
  recover   a backend down for passive health comes back through the active checker's `rise`
            (the checker's state is set down when it is ejected), like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping

from .health import CheckType, HealthCheck

IMPLICIT_CHECK = HealthCheck(CheckType.TCP)
"""The active check of a passive-health backend whose VIP configures none: a TCP handshake to
the backend's port every 2 s (rise 2, fall 3). Recovery needs an active checker."""


@dataclass(frozen=True)
class Signals:
    """lbx_nat_be[id] as read (maps.NatBackendState), plus the GC's timed-out handshakes."""
    consecutive: int = 0
    syn_rst: int = 0
    syn_retx: int = 0
    synack: int = 0
    timeouts: int = 0        # handshakes past `timeout` without a SYN-ACK (control plane, ever)
    pending: int = 0         # dsr/ipip/gue: new handshakes since the last one's final ACK
    pending_since: int = 0   # ... the first of them, CLOCK_MONOTONIC ns (0: none)


@dataclass(frozen=True)
class Failures:
    """Failed handshakes since a baseline, with what they were."""
    total: int = 0
    rst: int = 0
    retx: int = 0
    timeout: int = 0
    unfinished: int = 0      # dsr/ipip/gue: handshakes in a row without their ACK, the first past `timeout`

    def text(self) -> str:
        return (f"{self.total} failed handshakes ({self.rst} rst, {self.retx} syn retransmitted, {self.timeout} timed out, "
                f"{self.unfinished} unfinished)")


def rebase(base: Signals, now: Signals) -> Signals:
    """base moved to just after the last SYN-ACK, if one came since base (synack moved, or the
    program's count went back): only the failures after it are in a row. The program's
    `consecutive` is then the count itself; of the rst/retx added since base, at most that many
    are after the SYN-ACK. Timed-out handshakes count from the rebase on."""
    if now.synack == base.synack and now.consecutive >= base.consecutive:
        return base
    c = now.consecutive
    rst = min(now.syn_rst - base.syn_rst, c)
    retx = min(now.syn_retx - base.syn_retx, c - rst)
    return Signals(0, now.syn_rst - rst, now.syn_retx - retx, now.synack, now.timeouts)


def unfinished(base: Signals, now: Signals, now_ns: int, timeout: float | None) -> int:
    """The pending handshakes (dsr/ipip/gue) that count as failed at now_ns: all of them once the
    first is `timeout` seconds old (none before; none without a timeout), less those already
    accounted for by base in the same run (the same first SYN)."""
    if timeout is None or not now.pending or not now.pending_since or now_ns - now.pending_since < timeout * 1e9:
        return 0
    return max(0, now.pending - (base.pending if base.pending_since == now.pending_since else 0))


def failures_since(base: Signals, now: Signals, now_ns: int = 0, timeout: float | None = None) -> Failures:
    """Failed handshakes in a row since base (rebased past any SYN-ACK since). A handshake whose
    SYN was retransmitted and which then timed out counts twice: suspicion only triggers an
    active check, so over-counting costs a probe, never an ejection. Unfinished handshakes (dsr:
    `unfinished`) are the same handshakes as their retransmissions seen another way: the larger
    of the two counts."""
    b = rebase(base, now)
    timeout_n = now.timeouts - b.timeouts
    u = unfinished(b, now, now_ns, timeout)
    return Failures(max(now.consecutive - b.consecutive + timeout_n, u), now.syn_rst - b.syn_rst,
                    now.syn_retx - b.syn_retx, timeout_n, u)


def ejection_cap(backends: int, max_ejected: float) -> int:
    """How many of a VIP's `backends` passive health may hold down at once (floor; a tiny
    epsilon so that 0.3 x 10 is 3, not 2 by binary rounding)."""
    return max(0, math.floor(backends * max_ejected + 1e-9))


def may_eject(backends: int, passive_down: int, max_ejected: float) -> bool:
    return passive_down < ejection_cap(backends, max_ejected)


@dataclass(frozen=True)
class Verdict:
    """What to do with confirmed backends of one round."""
    eject: tuple[Hashable, ...] = ()
    capped: tuple[Hashable, ...] = ()


def decide(confirmed: Iterable[tuple[Hashable, Hashable, int]], vip_backends: Mapping[Hashable, int],
           passive_down: Mapping[Hashable, int], max_ejected: Mapping[Hashable, float]) -> Verdict:
    """confirmed: (vip, backend, failures) whose active confirmation failed. Ejects them in
    order of most failures first (then by name), each while its VIP stays under the cap;
    the rest are capped."""
    down = dict(passive_down)
    eject, capped = [], []
    for vip, be, _ in sorted(confirmed, key=lambda c: (-c[2], str(c[0]), str(c[1]))):
        if may_eject(vip_backends.get(vip, 0), down.get(vip, 0), max_ejected.get(vip, 0.0)):
            eject.append(be)
            down[vip] = down.get(vip, 0) + 1
        else:
            capped.append(be)
    return Verdict(tuple(eject), tuple(capped))


@dataclass
class Tracker:
    """Per backend: the baseline its failures count from, and whether it waits for its
    confirmation. The daemon feeds it signals; it says who is newly suspected."""
    failures: Mapping[Hashable, int] = field(default_factory=dict)   # backend -> threshold (its VIP's)
    timeout: Mapping[Hashable, float] = field(default_factory=dict)  # dsr/ipip/gue backend -> its VIP's timeout
    base: dict[Hashable, Signals] = field(default_factory=dict)
    pending: set[Hashable] = field(default_factory=set)
    quiet: dict[Hashable, int] = field(default_factory=dict)         # backend -> no suspicion before (ns)

    def observe(self, signals: Mapping[Hashable, Signals], exempt: Iterable[Hashable] = (),
                now_ns: int = 0) -> dict[Hashable, Failures]:
        """Backends newly suspected (not already pending, not exempt: down already, not quiet)
        and their failures, at now_ns (CLOCK_MONOTONIC; 0 leaves unfinished handshakes out). A
        backend seen for the first time starts from its current signals; an exempt one's
        baseline follows its signals (it comes back with a clean count)."""
        exempt = set(exempt)
        out = {}
        for be, sig in signals.items():
            if be not in self.base or be in exempt:
                self.base[be] = sig
                continue
            self.base[be] = rebase(self.base[be], sig)
            if be in self.pending or now_ns < self.quiet.get(be, 0):
                continue
            f = failures_since(self.base[be], sig, now_ns, self.timeout.get(be))
            if f.total >= self.failures.get(be, 1 << 30):
                self.pending.add(be)
                out[be] = f
        for be in set(self.base) - set(signals):
            del self.base[be]
            self.pending.discard(be)
            self.quiet.pop(be, None)
        return out

    def settle(self, be: Hashable, now: Signals, quiet_until: int = 0) -> None:
        """The backend's suspicion is over (cleared, capped or ejected): count from now on, and
        suspect it again no sooner than quiet_until (ns; a cleared one under a spoofed flood
        would otherwise be checked at every poll)."""
        self.pending.discard(be)
        self.base[be] = now
        self.quiet[be] = quiet_until
