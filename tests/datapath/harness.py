"""Run frames through the compiled program and explain any difference from what a Case expects.

A Case is one table row: a description, an input frame, the expected verdict, the expected
output frame (None: the frame must leave unchanged) and the one reason counter that must go up.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import pytest
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lbxdp import abi, bpfsys, loader, model
from lbxdp.balancer import Balancer, Runtime
from lbxdp.maps import Maps

from .frames import LB_MAC, VERDICT_NAMES, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, forwarded

_VERDICT_OF_REASON = {"tx": XDP_TX, "pass": XDP_PASS, "drop": XDP_DROP, "abort": XDP_ABORTED}


@dataclass(frozen=True)
class Case:
    desc: str
    pkt: Packet | bytes
    verdict: int
    expect: Packet | bytes | None = None  # None: output == input
    reason: abi.Reason = abi.Reason.TX_FORWARD

    def __post_init__(self) -> None:
        # A row whose reason names another verdict is a typo in the table, not a test.
        assert _VERDICT_OF_REASON[self.reason.verdict] == self.verdict, \
            f"{self.desc}: reason {self.reason.name} does not go with {VERDICT_NAMES[self.verdict]}"
        assert self.verdict != XDP_TX or self.expect is not None, f"{self.desc}: a TX row needs expect"

    @property
    def frame(self) -> bytes:
        return bytes(self.pkt)

    @property
    def want(self) -> bytes:
        return self.frame if self.expect is None else bytes(self.expect)


def new_flow(desc: str, pkt: Packet, vip: model.Vip) -> Case:
    """A row: a new flow to `vip` is forwarded to the VIP's first backend (slot 0 of a fresh
    round-robin table)."""
    return Case(desc, pkt, XDP_TX, expect=forwarded(pkt, vip.backends[0]), reason=abi.Reason.TX_FORWARD)


class Lb:
    """One compiled program, its maps, and the control plane that fills them."""

    def __init__(self, prog: loader.Program):
        self.prog = prog
        self.maps = Maps(prog.maps)
        self.balancer = Balancer(self.maps)
        self.runner = bpfsys.TestRunner(prog.fd)
        self.maps.set_own_mac(LB_MAC)   # what control.attach does with the interface's MAC

    def run(self, frame: Packet | bytes) -> bpfsys.TestRun:
        return self.runner.run(bytes(frame))

    def open(self, first: Packet) -> bpfsys.TestRun:
        """Open a flow as a client does, so that the connection table records it (bpf/select.h's
        handshake gate): a TCP SYN and then its ACK, or two UDP datagrams. Returns the first's run."""
        out = self.run(first)
        second = first.copy()
        if TCP in second:
            second[TCP].flags = "A"
        self.run(second)
        return out

    def apply(self, cfg: model.Config, rt: Runtime = Runtime()) -> None:
        """Balancer.apply with every MAC in the config; rt: drains and slow starts."""
        self.balancer.apply(cfg, macs={}, rt=rt)

    def vip_id(self, vip: model.Vip) -> int:
        return self.maps.vips()[vip.key].id

    def backend_id(self, vip: model.Vip, backend: model.Backend) -> int:
        vid = self.vip_id(vip)
        [bid] = [e.id for e in self.maps.backends().values()
                 if e.vip_id == vid and (e.address, e.port) == (backend.address, backend.port)]
        return bid

    def clear_flows(self) -> int:
        """Empty the connection table; returns how many entries it held."""
        keys = list(self.maps.flow_map.keys())
        for k in keys:
            self.maps.flow_map.delete(k)
        return len(keys)

    def reason_delta(self, before: dict[abi.Reason, tuple[int, int]]) -> dict[abi.Reason, tuple[int, int]]:
        after = self.maps.reasons()
        return {r: (after[r][0] - before[r][0], after[r][1] - before[r][1])
                for r in after if after[r] != before[r]}


def check(lb: Lb, case: Case) -> bytes:
    """Run case through the program; fail with a full explanation on any difference. Returns the output."""
    before = lb.maps.reasons()
    got = lb.run(case.frame)
    delta = lb.reason_delta(before)
    problems = []
    if got.retval != case.verdict:
        problems.append(f"verdict {VERDICT_NAMES.get(got.retval, got.retval)}, "
                        f"expected {VERDICT_NAMES[case.verdict]}")
    if got.data != case.want:
        problems.append("output frame differs from the expected one")
    want_delta = {case.reason: (1, len(case.frame))}
    if delta != want_delta:
        problems.append(f"reason counters moved by {_fmt_delta(delta)}, expected {_fmt_delta(want_delta)}")
    if problems:
        pytest.fail(explain(case, got.data, problems), pytrace=False)
    return got.data


def _fmt_delta(d: dict[abi.Reason, tuple[int, int]]) -> str:
    return "{" + ", ".join(f"{r.name}: +{p} pkt/+{b} B" for r, (p, b) in d.items()) + "}"


def decode(frame: bytes) -> str:
    try:
        return Ether(frame).show2(dump=True)
    except Exception as e:  # a malformed frame is exactly what some rows feed in
        return f"(scapy cannot decode it: {e})"


def hexdiff(got: bytes, want: bytes, width: int = 16) -> str:
    """Side by side, 16 bytes a line; '^^' under each byte that differs."""
    lines = [f"{'off':>4}  {'got':<{width * 3}} {'expected':<{width * 3}}"]
    for off in range(0, max(len(got), len(want)), width):
        g, w = got[off:off + width], want[off:off + width]
        lines.append(f"{off:04x}  {g.hex(' '):<{width * 3}} {w.hex(' '):<{width * 3}}")
        if g != w:
            marks = "".join("^^ " if i >= len(g) or i >= len(w) or g[i] != w[i] else "   "
                            for i in range(max(len(g), len(w))))
            lines.append(f"{'':4}  {marks:<{width * 3}} {marks}")
    if len(got) != len(want):
        lines.append(f"length: got {len(got)}, expected {len(want)}")
    return "\n".join(lines)


def explain(case: Case, got: bytes, problems: list[str]) -> str:
    rebuild = case.pkt.command() if isinstance(case.pkt, Packet) else f"bytes.fromhex({case.frame.hex()!r})"
    return "\n".join([
        f"case: {case.desc}",
        *(f"  - {p}" for p in problems),
        "--- input", Ether(case.frame).summary() if isinstance(case.pkt, Packet) else "(raw bytes)",
        "--- got", decode(got),
        "--- expected", decode(case.want),
        "--- hex diff (got vs expected)", hexdiff(got, case.want),
        "--- rebuild the input with scapy", rebuild,
    ])


@contextlib.contextmanager
def one_cpu(cpu: int | None = None) -> Iterator[int]:
    """Keep this process on one CPU: per-CPU state (round-robin positions) then behaves as one.

    BPF_PROG_TEST_RUN runs the program on the calling CPU (migration disabled for the run), but
    between two calls the process may move; the round-robin position is per CPU, so spreading
    over CPUs would interleave two independent rotations.
    """
    old = os.sched_getaffinity(0)
    cpu = min(old) if cpu is None else cpu
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, old)

