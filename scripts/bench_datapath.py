#!/usr/bin/env python3
"""Per-packet cost of the XDP data path, measured the way Katran measures it: BPF_PROG_TEST_RUN.

Every call runs the program ONCE (repeat=1). The kernel's own repeat would re-run the program
on the buffer the previous run already rewrote (for a forwarded frame: new MACs), and a
new-flow frame would find its flow in the connection table from the second run on, so it would
measure the established path instead. duration_ns is the kernel's time for that one run (taken
with ktime_get_ns around the program inside the kernel, so the syscall is not in it); a case's
figure is the mean over --calls calls, and the table shows the median (and min/max) of --reps
such means. The process is pinned to one CPU, so per-CPU maps and caches stay on it.

The floor is bpf/stub.c (return XDP_PASS) run the same way: what BPF_PROG_TEST_RUN itself
costs per run. Nothing here is a test; it prints figures (and --json for machines).

    sudo .venv/bin/python scripts/bench_datapath.py                 # 200k calls x 3 reps
    sudo .venv/bin/python scripts/bench_datapath.py --calls 500000 --reps 5 --cpu 1 --json
    sudo .venv/bin/python scripts/bench_datapath.py --baseline-dir /tmp/old/bpf   # before/after in one run
    sudo .venv/bin/python scripts/bench_datapath.py --fib      # + a per-packet bpf_fib_lookup (scripts/fib_lookup.c)
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from lbxdp import abi, bpfsys, loader, model
from lbxdp.balancer import Balancer
from lbxdp.maps import HandshakeTable, Maps, nat_now
from lbxdp.lab.traffic import inet_checksum

LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
VIP4, VIP6, NOT_VIP4 = "10.99.0.1", "fd99::1", "198.51.100.7"
CLIENT4, CLIENT6 = "100.64.0.1", "2001:db8::1"
WARMUP = 2000
XDP_PASS, XDP_TX = 2, 3

ACL_PREFIXES = 1000   # per family, in the admission rows' VIP scope

# (name, target ratio to the floor)
TARGETS = {"tcp established v4": 2.0, "non-vip pass v4": 1.3, "decap: ipip v4": 1.3, "decap: gue v6": 1.3,
           "decap: non-tunnel pass v4": 1.3,
           "nat: snat tcp established v4 (client -> backend)": 2.5, "nat: snat tcp established v4 (backend -> client)": 2.5,
           "nat: dnat tcp established v4 (client -> backend)": 2.5, "nat: dnat tcp established v4 (backend -> client)": 2.5}
# (case, the row it is compared with, at most this many ns more): issue 12's new NAT flow
TARGETS_NS = [("nat: snat tcp syn new flow v4", "tcp syn new flow v4, not under flood", 150.0),
              ("nat: dnat tcp syn new flow v4", "tcp syn new flow v4, not under flood", 150.0),
              # issue 13: a recorded new flow (its opening counted) vs the same on Maglev
              ("sched (no gate): leastconn tcp syn new flow v4 (recorded)",
               "sched (no gate): maglev tcp syn new flow v4 (recorded)", 60.0),
              # issue 11: admission's price on a new flow (the paired form: scripts/gate_variants/multi.py --admission)
              ("admit: tcp syn new flow v4, source limit", "admit: tcp syn new flow v4, no rules", 30.0),
              ("admit: tcp syn new flow v6, source limit", "admit: tcp syn new flow v6, no rules", 30.0),
              (f"admit: tcp syn new flow v4, {ACL_PREFIXES} prefixes", "admit: tcp syn new flow v4, no rules", 40.0),
              (f"admit: tcp syn new flow v6, {ACL_PREFIXES} prefixes", "admit: tcp syn new flow v6, no rules", 40.0)]
# (case, at most this many ns): issue 11's flood SYN (a new flow under flood: nothing recorded)
TARGETS_ABS = {"tcp syn new flow v4": 200.0, "tcp syn new flow v6": 200.0}


def config() -> model.Config:
    """Two TCP VIPs (v4, v6) and a UDP one, 8 backends each, Maglev (65537 slots, the default);
    and a v4 TCP VIP on port 81 with round robin, to show what the scheduler costs a new flow."""
    def backends(prefix: str, tag: int) -> tuple[model.Backend, ...]:
        return tuple(model.Backend(ipaddress.ip_address(f"{prefix}{i + 1}"), 8080, mac=f"02:be:{tag:02x}:00:00:{i + 1:02x}")
                     for i in range(8))
    ip = ipaddress.ip_address
    return model.Config(vips=(
        model.Vip(ip(VIP4), 80, model.Protocol.TCP, backends=backends("10.99.1.", 1)),
        model.Vip(ip(VIP6), 80, model.Protocol.TCP, backends=backends("fd99:1::", 2)),
        model.Vip(ip(VIP4), 53, model.Protocol.UDP, backends=backends("10.99.2.", 3)),
        model.Vip(ip(VIP4), 81, model.Protocol.TCP, scheduler=model.Scheduler.RR, backends=backends("10.99.3.", 4)),
    # no flood threshold: the recorded-new-flow rows insert hundreds of thousands a second
    ), balancer=model.BalancerOptions(flood_threshold=2**32 - 1))


# --- frames ---------------------------------------------------------------------------------------
def frame(src: str, dst: str, sport: int, dport: int, proto: int, payload: bytes = b"", tcp_flags: int = 0x02) -> bytes:
    """Ethernet + IPv4/IPv6 + a TCP SYN or a UDP datagram, with correct checksums.

    Built by hand, not with scapy: the new-flow cases need hundreds of thousands of distinct
    frames, and scapy takes ~100 us each. tests/datapath builds the same frames with scapy.
    """
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, tcp_flags, 8192, 0, 0) + payload
        csum_off = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        csum_off = 6
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(l4))
        iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, s.packed, d.packed)
        l3, ethertype = iph[:10] + struct.pack("!H", inet_checksum(iph)) + iph[12:], 0x0800
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(l4), proto)
        l3, ethertype = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s.packed, d.packed), 0x86DD
    c = inet_checksum(pseudo + l4)
    if proto == 17 and c == 0:
        c = 0xFFFF
    l4 = l4[:csum_off] + struct.pack("!H", c) + l4[csum_off + 2:]
    mac = bytes.fromhex
    return mac(LB_MAC.replace(":", "")) + mac(CLIENT_MAC.replace(":", "")) + struct.pack("!H", ethertype) + l3 + l4


def new_flow_frames(n: int, dst: str, client: str, dport: int = 80, tcp_flags: int = 0x02) -> list[bytes]:
    """n TCP SYNs (or, tcp_flags=0x10, bare ACKs) to dst:dport, each from its own (source address, source port)."""
    base = int(ipaddress.ip_address(client))
    cls = type(ipaddress.ip_address(client))
    return [frame(str(cls(base + (i >> 14))), dst, 1024 + (i & 0x3FFF), dport, 6, tcp_flags=tcp_flags) for i in range(n)]


# --- measuring ------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    runner: bpfsys.TestRunner
    frames: list[bytes]          # one per call (new flows), or a single frame sent every call
    verdict: int
    before_rep: Callable[[], None] = lambda: None  # e.g. empty the connection table
    # An established case's proof that its flow is in the connection table after the warm-up:
    # without it a flow the gate did not record (bpf/select.h) measures the table's path instead.
    recorded: Callable[[], bool] | None = None


@dataclass
class Result:
    case: str
    ns_median: float
    ns_min: float
    ns_max: float
    reps_ns: list[float]
    ratio_to_floor: float = 0.0


def measure(case: Case, calls: int) -> float:
    """Mean kernel-reported ns per run over `calls` single runs (after a short warm-up)."""
    case.before_rep()
    run, frames = case.runner.run, case.frames
    single = len(frames) == 1
    for i in range(WARMUP):
        r = run(frames[0] if single else frames[calls + i])
        if r.retval != case.verdict:
            raise SystemExit(f"{case.name}: verdict {r.retval}, expected {case.verdict}; is the setup right?")
    if case.recorded is not None and not case.recorded():
        raise SystemExit(f"{case.name}: the flow is not in the connection table after the warm-up; is the setup right?")
    total = 0
    if single:
        f = frames[0]
        for _ in range(calls):
            total += run(f).duration_ns
    else:
        for i in range(calls):
            total += run(frames[i]).duration_ns
    return total / calls


def interleaved(cases: list[Case], reps: int, calls: int) -> dict[str, list[float]]:
    """Every case measured once per repetition, in turn (the scratch drivers of
    scripts/gate_variants: builds that share the machine's state rep by rep)."""
    out: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(reps):
        for c in cases:
            out[c.name].append(measure(c, calls))
    return out


def labelled(cases: list[Case], label: str) -> list[Case]:
    """cases with their names prefixed by `label: ` (one build's rows among several)."""
    for c in cases:
        c.name = f"{label}: {c.name}"
    return cases


def release(progs: list[loader.Program], stub: Any, pins: list[Path]) -> None:
    """Unload the scratch drivers' programs and the stub, remove their pin directories."""
    for p in progs:
        p.close()
    if stub is not None:
        stub.cleanup()
    for d in pins:
        shutil.rmtree(d, ignore_errors=True)


def print_medians(reps: dict[str, list[float]], head: str) -> None:
    print(head)
    for k, v in reps.items():
        print(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} |")


def machine() -> dict[str, str | int]:
    model_name = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    clock = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    return {"nproc": os.cpu_count() or 0, "kernel": platform.release(), "cpu": model_name,
            "clocksource": clock.read_text().strip() if clock.exists() else "unknown"}


def clear_flows(maps: Maps) -> None:
    for k in list(maps.flow_map.keys()):
        maps.flow_map.delete(k)


def recorded(maps: Maps, sport: int, dport: int) -> Callable[[], bool]:
    """Whether the connection table has a flow from sport to dport (the established cases' ports
    are used by no other case)."""
    import socket
    sp, dp = socket.htons(sport), socket.htons(dport)

    def check() -> bool:
        for keys, _, n in maps.flow_map.batches():
            if any(keys[i].sport == sp and keys[i].dport == dp for i in range(n)):
                return True
        return False
    return check


def program_cases(label: str, prog: loader.Program, new_flows: dict[str, list[bytes]], syn4: bytes) -> list[Case]:
    """The cases of one compiled program, filled by the control plane; label prefixes their names."""
    maps = Maps(prog.maps)
    Balancer(maps).apply(config(), macs={})
    maps.set_own_mac(LB_MAC)   # what attach does with the interface's MAC (no-op for older sources)
    lb = bpfsys.TestRunner(prog.fd)

    def clear() -> None:
        clear_flows(maps)
        maps.set_flood_threshold(2**32 - 1)

    def flood() -> None:
        # Under a new-flow flood (this CPU over the threshold from its first SYN) a pure SYN skips
        # the connection table (select.h: established()); a no-op for programs before issue 11.
        clear_flows(maps)
        maps.set_flood_threshold(1)

    def no_flood() -> None:   # the established flows are recorded by their first packet
        maps.set_flood_threshold(2**32 - 1)
    return [
        # Since issue 11 a SYN is never recorded (select.h): on Maglev this is the flood SYN's cost;
        # on rr it is a half-open insert. A bare ACK of an unknown flow is a recorded new flow.
        Case(f"{label}tcp syn new flow v4", lb, new_flows["v4"], XDP_TX, flood),
        Case(f"{label}tcp syn new flow v4, not under flood", lb, new_flows["v4"], XDP_TX, clear),
        Case(f"{label}tcp syn new flow v4, rr", lb, new_flows["rr"], XDP_TX, flood),
        Case(f"{label}tcp ack new flow v4 (recorded)", lb, new_flows["ack4"], XDP_TX, clear),
        Case(f"{label}tcp established v4", lb, [frame(CLIENT4, VIP4, 999, 80, 6, tcp_flags=0x10)], XDP_TX,
             no_flood, recorded=recorded(maps, 999, 80)),
        Case(f"{label}tcp syn new flow v6", lb, new_flows["v6"], XDP_TX, flood),
        Case(f"{label}udp established v4", lb, [frame(CLIENT4, VIP4, 999, 53, 17, b"query")], XDP_TX,
             no_flood, recorded=recorded(maps, 999, 53)),
        Case(f"{label}non-vip pass v4", lb, [frame(CLIENT4, NOT_VIP4, 999, 80, 6)], XDP_PASS),
    ]


def encap_cases(prog: loader.Program, new_flows: dict[str, list[bytes]]) -> list[Case]:
    """Forwarding by encapsulation (bpf/encap.h) on the current program: the same VIPs on port
    82 in ipip (v4 in v4) and gue (v6 in v6) mode, 8 backends each, against the dsr rows above."""
    from lbxdp.maps import OwnAddresses
    ip = ipaddress.ip_address

    def backends(prefix: str, tag: int) -> tuple[model.Backend, ...]:
        return tuple(model.Backend(ip(f"{prefix}{i + 1}"), 82, mac=f"02:be:{tag:02x}:00:00:{i + 1:02x}")
                     for i in range(8))
    maps = Maps(prog.maps)
    # The bench's [balancer] options too: without them the flood threshold falls back to the
    # default and the established rows' flows, inserted after 200k others, were not recorded.
    cfg = dataclasses.replace(config(), vips=config().vips + (
        model.Vip(ip(VIP4), 82, model.Protocol.TCP, model.Mode.IPIP, backends=backends("10.99.5.", 5)),
        model.Vip(ip(VIP6), 82, model.Protocol.TCP, model.Mode.GUE, backends=backends("fd99:5::", 6))))
    Balancer(maps).apply(cfg, macs={})
    maps.set_own_addresses(OwnAddresses(ip("10.99.255.1"), ip("fd99::ff:1")))
    lb = bpfsys.TestRunner(prog.fd)

    def clear() -> None:
        clear_flows(maps)
        maps.set_flood_threshold(2**32 - 1)
    return [
        Case("encap: ipip tcp syn new flow v4", lb, new_flows["ipip"], XDP_TX, clear),
        Case("encap: ipip tcp established v4", lb, [frame(CLIENT4, VIP4, 998, 82, 6, tcp_flags=0x10)], XDP_TX,
             recorded=recorded(maps, 998, 82)),
        Case("encap: gue tcp established v6", lb, [frame(CLIENT6, VIP6, 997, 82, 6, tcp_flags=0x10)], XDP_TX,
             recorded=recorded(maps, 997, 82)),
    ]


def nat_cases(prog: loader.Program, new_flows: dict[str, list[bytes]], full: bool = False) -> list[Case]:
    """NAT mode (issue 12, bpf/nat.h, return_path.h): the v4 VIP on port 85 with snat = true and
    on port 86 without (DNAT), 8 backends each (backend port 8080). The pool is large (1024-65535
    per backend) so that the new-flow rows never run out.
    full=False: prog's conntrack holds every connection of a repetition and is emptied before it
    (a table the GC keeps below capacity); the established rows send an ACK of a connection opened
    (SYN, then the backend's SYN-ACK) before each repetition; the "ack completing a handshake"
    rows send, per call, the ACK of one of the new-flow rows' handshakes (SYN and SYN-ACK run
    before the repetition), which moves its entries from the handshake table (lbx_nat_new) to the
    conntrack; the UDP rows (a DNAT VIP on port 87) send each call a new flow's first datagram,
    and the second datagram of one of them, which assures it (the same move). full=True: only the
    new-flow rows, on the default capacities, which they fill: then every new connection's two
    inserts also evict two entries (the LRU's cost at capacity; since SYNs open in the handshake
    table, an array, there the two slot writes overwrite two older handshakes)."""
    ip = ipaddress.ip_address
    snat4 = "10.99.255.1"

    def backends(prefix: str, tag: int) -> tuple[model.Backend, ...]:
        return tuple(model.Backend(ip(f"{prefix}{i + 1}"), 8080, mac=f"02:be:{tag:02x}:00:00:{i + 1:02x}")
                     for i in range(8))
    maps = Maps(prog.maps)
    base = config()
    cfg = dataclasses.replace(base, vips=base.vips + (
        model.Vip(ip(VIP4), 85, model.Protocol.TCP, model.Mode.NAT, backends=backends("10.99.7.", 7), snat=True),
        model.Vip(ip(VIP4), 86, model.Protocol.TCP, model.Mode.NAT, backends=backends("10.99.8.", 8)),
        model.Vip(ip(VIP4), 87, model.Protocol.UDP, model.Mode.NAT, backends=backends("10.99.9.", 9))),
        balancer=dataclasses.replace(base.balancer, snat_v4=ip(snat4), snat_ports=(1024, 65535)))
    Balancer(maps).apply(cfg, macs={})
    maps.set_own_mac(LB_MAC)
    lb = bpfsys.TestRunner(prog.fd)
    if full:
        return [Case("nat: snat tcp syn new flow v4, conntrack full (LRU evicts)", lb, new_flows["nat85"], XDP_TX),
                Case("nat: dnat tcp syn new flow v4, conntrack full (LRU evicts)", lb, new_flows["nat86"], XDP_TX)]
    def clear() -> None:
        for ct in maps.nat_tables():
            if isinstance(ct, HandshakeTable):   # every check word zeroed: no per-key lookup
                ct.clear()
                continue
            for k in list(ct.keys()):
                ct.delete(k)
    fwd = {85: [b""], 86: [b""]}
    reply = {85: [b""], 86: [b""]}

    def establish(dport: int) -> Callable[[], None]:
        def setup() -> None:
            client_port = 900 + dport
            if lb.run(frame(CLIENT4, VIP4, client_port, dport, 6)).retval != XDP_TX:
                raise SystemExit(f"nat: the SYN to port {dport} was not forwarded; is the setup right?")
            # the reply key is the forward entry's rewritten tuple, reversed (bpf/nat.h)
            now = nat_now()
            [e] = [e for e in maps.nat_entries() if e.dir is abi.NatDir.FWD and e.sport == client_port
                   and e.dport == dport and not e.expired(now)]
            synack = frame(str(e.new_dst), str(e.new_src), e.new_dport, e.new_sport, 6, tcp_flags=0x12)
            if lb.run(synack).retval != XDP_TX:
                raise SystemExit("nat: the SYN-ACK was not translated; is the setup right?")
            reply[dport][0] = frame(str(e.new_dst), str(e.new_src), e.new_dport, e.new_sport, 6, tcp_flags=0x10)
            fwd[dport][0] = frame(CLIENT4, VIP4, client_port, dport, 6, tcp_flags=0x10)
        return setup

    def acks(dport: int) -> list[bytes]:
        """The ACKs of the row's new-flow SYNs (the same tuples; TCP flags are byte 47)."""
        out = []
        for f in new_flows[f"nat{dport}"]:
            assert f[47] == 0x02, "not an untagged IPv4 SYN"
            out.append(f[:47] + b"\x10" + f[48:])
        return out

    def handshakes(dport: int) -> Callable[[], None]:
        """Before each repetition: the conntrack emptied, then every SYN of the row's tuples and its
        backend's SYN-ACK run, so that each call's ACK completes a handshake (bpf/nat.h nat_assure:
        its two entries move from lbx_nat_new to lbx_nat)."""
        def setup() -> None:
            clear()
            for f in new_flows[f"nat{dport}"]:
                lb.run(f)
            for e in maps.nat_entries():
                if e.dir is abi.NatDir.FWD and e.dport == dport:
                    lb.run(frame(str(e.new_dst), str(e.new_src), e.new_dport, e.new_sport, 6, tcp_flags=0x12))
        return setup
    # UDP to port 87: the new-flow rows' tuples, as datagrams (ports are bytes 34-37 of the frame)
    udp = [frame(ipaddress.ip_address(int.from_bytes(f[26:30], "big")).compressed, VIP4,
                 int.from_bytes(f[34:36], "big"), 87, 17) for f in new_flows["nat86"]]

    def first_datagrams() -> None:
        """Before each repetition: the conntrack emptied, then every flow's first datagram, so that
        each call's datagram is a flow's second, which assures it (bpf/nat.h nat_assure)."""
        clear()
        for f in udp:
            lb.run(f)
    return [
        Case("nat: dnat udp new flow v4", lb, udp, XDP_TX, clear),
        Case("nat: dnat udp second datagram (assures the flow) v4", lb, udp, XDP_TX, first_datagrams,
             lambda: any(e.assured for e in maps.nat_entries(limit=4))),
        Case("nat: snat tcp syn new flow v4", lb, new_flows["nat85"], XDP_TX, clear),
        Case("nat: dnat tcp syn new flow v4", lb, new_flows["nat86"], XDP_TX, clear),
        Case("nat: snat tcp established v4 (client -> backend)", lb, fwd[85], XDP_TX, establish(85)),
        Case("nat: snat tcp established v4 (backend -> client)", lb, reply[85], XDP_TX, establish(85)),
        Case("nat: dnat tcp established v4 (client -> backend)", lb, fwd[86], XDP_TX, establish(86)),
        Case("nat: dnat tcp established v4 (backend -> client)", lb, reply[86], XDP_TX, establish(86)),
        Case("nat: snat tcp ack completing a handshake v4", lb, acks(85), XDP_TX, handshakes(85),
             lambda: any(e.assured for e in maps.nat_entries(limit=4))),
        Case("nat: dnat tcp ack completing a handshake v4", lb, acks(86), XDP_TX, handshakes(86),
             lambda: any(e.assured for e in maps.nat_entries(limit=4))),
    ]




def acl_rules(client: str, n: int | None = None) -> model.Admission:
    """n prefixes of client's family (lengths /12../32 or /24../64, random but seeded), half allow
    and half deny, none covering client but two: a deny of its /10 (/32) and an allow of its /16
    (/48) inside it, so client's new flows take the longest-match-allows path."""
    import random
    rnd, n = random.Random(11), n or ACL_PREFIXES
    c = ipaddress.ip_address(client)
    bits, lens = (32, (12, 32)) if c.version == 4 else (128, (24, 64))
    wide, narrow = ((10, 16) if c.version == 4 else (32, 48))
    cover = {ipaddress.ip_network(f"{c}/{wide}", strict=False), ipaddress.ip_network(f"{c}/{narrow}", strict=False)}
    nets: set = set()
    while len(nets) < n - 2:
        length = rnd.randint(*lens)
        net = ipaddress.ip_network((rnd.getrandbits(bits) >> (bits - length) << (bits - length), length))
        if c not in net and not any(net.overlaps(x) for x in cover):
            nets.add(net)
    ordered = sorted(nets, key=lambda x: (x.version, x.network_address, x.prefixlen))
    return model.Admission(allow=(min(cover, key=lambda x: -x.prefixlen), *ordered[0::2]),
                           deny=(max(cover, key=lambda x: -x.prefixlen), *ordered[1::2]))


def admission_cases(prog: loader.Program, new_flows: dict[str, list[bytes]]) -> list[Case]:
    """New flows through admit.h (bpf/acl.h, bpf/limit.h) on the current program: beside config()'s
    VIPs, four with the same 8 backends and scheduler (Maglev) on port 83 and 84: v4:83 and v6:83 with a
    per-source limit that admits everything (rate 10M/s, burst 10M; the frames come from ~13
    sources (v6: one /64), so nearly every flow finds its source's bucket: the admitted path), v4:84 and v6:84
    with ACL_PREFIXES prefixes of their family each (the client's on an allow rule). The v4:80 and
    v6:80 rows of this program are the same VIP shape without rules; established and non-VIP rows
    never reach admission."""
    ip = ipaddress.ip_address
    base = config()
    like = {4: base.vips[0], 6: base.vips[1]}
    limit = model.Admission(new_flow_limit=model.NewFlowLimit(model.MAX_NEW_FLOW_RATE, model.MAX_NEW_FLOW_BURST))
    extra = (model.Vip(ip(VIP4), 83, model.Protocol.TCP, backends=like[4].backends, admission=limit),
             model.Vip(ip(VIP6), 83, model.Protocol.TCP, backends=like[6].backends, admission=limit),
             model.Vip(ip(VIP4), 84, model.Protocol.TCP, backends=like[4].backends, admission=acl_rules(CLIENT4)),
             model.Vip(ip(VIP6), 84, model.Protocol.TCP, backends=like[6].backends, admission=acl_rules(CLIENT6)))
    maps = Maps(prog.maps)
    Balancer(maps).apply(model.Config(vips=base.vips + extra, balancer=base.balancer), macs={})
    maps.set_own_mac(LB_MAC)
    lb = bpfsys.TestRunner(prog.fd)

    def clear() -> None:
        clear_flows(maps)
    return [
        Case("admit: tcp syn new flow v4, no rules", lb, new_flows["v4"], XDP_TX, clear),
        Case("admit: tcp syn new flow v4, source limit", lb, new_flows["lim4"], XDP_TX, clear),
        Case(f"admit: tcp syn new flow v4, {ACL_PREFIXES} prefixes", lb, new_flows["acl4"], XDP_TX, clear),
        Case("admit: tcp syn new flow v6, no rules", lb, new_flows["v6"], XDP_TX, clear),
        Case("admit: tcp syn new flow v6, source limit", lb, new_flows["lim6"], XDP_TX, clear),
        Case(f"admit: tcp syn new flow v6, {ACL_PREFIXES} prefixes", lb, new_flows["acl6"], XDP_TX, clear),
        Case("admit: tcp established v4, source limit", lb, [frame(CLIENT4, VIP4, 999, 83, 6, tcp_flags=0x10)], XDP_TX,
             recorded=recorded(maps, 999, 83)),
        Case("admit: non-vip pass v4", lb, [frame(CLIENT4, NOT_VIP4, 999, 80, 6)], XDP_PASS),
    ]


SCHED_PORTS = {"maglev": 80, "source": 87, "leastconn": 88, "maglev+caps": 89, "rr": 81}   # rr: config()'s v4:81


def sched_cases(prog: loader.Program, new_flows: dict[str, list[bytes]], gate: bool = True, label: str = "",
                pairs: bool = False) -> list[Case]:
    """Issue 13's schedulers (bpf/sched.h) on a program of their own: beside config()'s VIPs
    (v4:80 is Maglev, the reference), v4:87 source, v4:88 leastconn and v4:89 Maglev with a cap
    on every backend that is never reached (the cap check and the count on every new flow), the
    same 8 backends. Two rows each: a SYN not under flood (Maglev and source: forwarded by the
    table alone; leastconn and capped: their choice goes into the half-open table, like rr's)
    and a bare ACK of an unknown flow (recorded; leastconn and capped: counted in lbx_conns).
    gate=False: prog is built with -DLBX_NO_HANDSHAKE_GATE, every first packet is recorded by its
    VIP's choice, so a SYN row is the scheduler's own cost (choice, record, count) without the
    half-open path that the gate gives every VIP whose choice cannot be repeated."""
    ip = ipaddress.ip_address
    base = config()
    bes = base.vips[0].backends
    capped = tuple(dataclasses.replace(b, max_conns=2**32 - 1) for b in bes)
    extra = (model.Vip(ip(VIP4), 87, model.Protocol.TCP, scheduler=model.Scheduler.SOURCE, backends=bes),
             model.Vip(ip(VIP4), 88, model.Protocol.TCP, scheduler=model.Scheduler.LEASTCONN, backends=bes),
             model.Vip(ip(VIP4), 89, model.Protocol.TCP, backends=capped))
    maps = Maps(prog.maps)
    Balancer(maps).apply(model.Config(vips=base.vips + extra, balancer=base.balancer), macs={})
    maps.set_own_mac(LB_MAC)
    lb = bpfsys.TestRunner(prog.fd)

    def clear() -> None:
        clear_flows(maps)
        maps.set_flood_threshold(2**32 - 1)
    cases = []
    for name, port in SCHED_PORTS.items():
        if not gate:
            cases.append(Case(f"sched (no gate): {name} tcp syn new flow v4 (recorded)", lb, new_flows[f"syn{port}"],
                              XDP_TX, clear))
            continue
        cases += [Case(f"{label}sched: {name} tcp syn new flow v4", lb, new_flows[f"syn{port}"], XDP_TX, clear),
                  Case(f"{label}sched: {name} tcp ack new flow v4 (recorded)", lb, new_flows[f"ack{port}"], XDP_TX, clear)]
        if pairs:   # a handshake: each SYN, then its ACK (on rr, leastconn, caps: a half-open hit)
            hs = [f for sa in zip(new_flows[f"syn{port}"], new_flows[f"ack{port}"]) for f in sa]
            cases.append(Case(f"{label}sched: {name} tcp syn then its ack v4 (mean of the two)", lb,
                              hs[:len(new_flows[f"syn{port}"])], XDP_TX, clear))
    return cases


DECAP_HOST4, DECAP_HOST6 = "192.0.2.50", "2001:db8::50"


def decap_table() -> dict:
    from lbxdp import decap
    ip = ipaddress.ip_address
    return decap.build_table([decap.Entry(ip(DECAP_HOST4), abi.DECAP_F_HOST), decap.Entry(ip(DECAP_HOST6), abi.DECAP_F_HOST),
                              decap.Entry(ip(VIP4), abi.DECAP_F_VIP, 0), decap.Entry(ip(VIP6), abi.DECAP_F_VIP, 1)])


def compile_decap(pin_dir: Path, src: Path | None) -> loader.Program:
    """lbxdp_decap compiled as `lbxdp decap attach` compiles it for decap_table() (fresh maps:
    it reads table half 1; an older source ignores the -D switches and reads lbxd_ctl)."""
    from lbxdp import decap
    defines = decap.program_defines(decap_table(), 6080, False, 1)
    return loader.compile_program(loader.BuildConfig(pin_dir=pin_dir, src_dir=src, defines=defines), loader.DECAP)


def decap_cases(prog: loader.Program, label: str = "") -> list[Case]:
    """lbxdp_decap (bpf/decap.c) filled as `lbxdp decap attach` fills it: a tunnelled SYN opened
    (IPIP over v4, GUE over v6: the longest parse), and traffic that is no tunnel; label prefixes
    the names."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    from lbxdp import decap
    host4, host6 = DECAP_HOST4, DECAP_HOST6
    decap.flip(prog.maps, decap.stage(prog.maps, decap_table(), 6080, False, 1))
    eth = Ether(dst=LB_MAC, src=CLIENT_MAC)
    syn4 = IP(src=CLIENT4, dst=VIP4) / TCP(sport=999, dport=80, flags="S")
    syn6 = IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=999, dport=80, flags="S")
    run = bpfsys.TestRunner(prog.fd)
    return [
        Case(f"{label}decap: ipip v4", run, [bytes(eth / IP(src="192.0.2.1", dst=host4) / syn4)], XDP_PASS),
        Case(f"{label}decap: gue v6", run, [bytes(eth / IPv6(src="2001:db8::1", dst=host6) / UDP(sport=5000, dport=6080) / syn6)],
             XDP_PASS),
        Case(f"{label}decap: ipip v4 to no vip (both lookups, no strip)", run,
             [bytes(eth / IP(src="192.0.2.1", dst=host4) / IP(src=CLIENT4, dst=NOT_VIP4) / TCP(sport=999, dport=80))],
             XDP_PASS),
        Case(f"{label}decap: non-tunnel pass v4", run, [frame(CLIENT4, host4, 999, 22, 6)], XDP_PASS),
    ] + ([] if label else decap_bound_cases(bytes(eth / IP(src="192.0.2.1", dst=host4) / syn4)))


_BOUNDS: list[object] = []   # the bcc module of scripts/decap_bounds.c, alive as long as its programs


def decap_bound_cases(ipip4: bytes) -> list[Case]:
    """The least a decapsulating program must do to the IPIP frame (scripts/decap_bounds.c, scratch
    programs never attached, no maps): parse Ethernet + IPv4 and return; that and open it (move the
    Ethernet header, bpf_xdp_adjust_head)."""
    bcc = loader._import_bcc()
    _BOUNDS.append(b := bcc.BPF(src_file=str(Path(__file__).with_name("decap_bounds.c")).encode()))
    return [Case(f"decap bound: {desc} (scratch program)", bpfsys.TestRunner(b.load_func(fn.encode(), bcc.BPF.XDP).fd),
                 [ipip4], XDP_PASS)
            for fn, desc in (("bound_parse", "parse ethernet + ipv4, return"),
                             ("bound_strip", "parse, move ethernet, adjust_head"))]


class FibLab:
    """A network namespace where the encap VIPs' backends (10.99.5.0/24, fd99:5::/64, as in
    encap_cases) are behind a gateway with a permanent neighbour entry on a veth, entered by this
    process so that BPF_PROG_TEST_RUN's ingress device (the ctx's ingress_ifindex, which
    bpf_fib_lookup needs to find the namespace) is that veth. Removed by close()."""

    GW4, GW6, GW_MAC = "10.250.0.254", "fd50::fe", "02:fe:00:00:00:fe"

    def __init__(self) -> None:
        import subprocess
        self.run = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)
        self.ns = f"lbxb{uuid.uuid4().hex[:8]}"
        self.orig = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.bpf = None
        self.run("netns", "add", self.ns)
        try:
            n = ("-n", self.ns)
            self.run(*n, "link", "add", "fiba", "type", "veth", "peer", "name", "fibb")
            self.run(*n, "addr", "add", "10.250.0.1/24", "dev", "fiba")
            self.run(*n, "addr", "add", "fd50::1/64", "dev", "fiba", "nodad")
            self.run(*n, "link", "set", "fiba", "up")
            self.run(*n, "link", "set", "fibb", "up")
            for knob in ("net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"):   # else FWD_DISABLED
                self.run("netns", "exec", self.ns, "sysctl", "-qw", knob)
            for gw in (self.GW4, self.GW6):
                self.run(*n, "neigh", "add", gw, "lladdr", self.GW_MAC, "dev", "fiba", "nud", "permanent")
            self.run(*n, "route", "add", "10.99.5.0/24", "via", self.GW4)
            self.run(*n, "-6", "route", "add", "fd99:5::/64", "via", self.GW6)
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            self.ifindex = loader.ifindex("fiba")
        except BaseException:
            self.close()
            raise

    def cases(self) -> list[Case]:
        import ctypes
        bcc = loader._import_bcc()

        def words(a: str) -> str:
            w = struct.unpack("=4I", ipaddress.ip_address(a).packed)
            return "(a)=" + "".join(f"(a)[{i}]={x}u;" for i, x in enumerate(w))
        v4 = lambda a: str(struct.unpack("=I", ipaddress.ip_address(a).packed)[0]) + "u"   # noqa: E731
        self.bpf = bcc.BPF(src_file=str(Path(__file__).with_name("fib_lookup.c")).encode(), cflags=[
            f"-DFIB_SRC4={v4('10.99.255.1')}", f"-DFIB_DST4={v4('10.99.5.1')}",
            f"-DFIB_SRC6{words('fd99::ff:1')}", f"-DFIB_DST6{words('fd99:5::1')}"])
        out = []
        for fn, f in (("fib_v4", frame(CLIENT4, VIP4, 999, 82, 6)), ("fib_v6", frame(CLIENT6, VIP6, 999, 82, 6))):
            runner = bpfsys.TestRunner(self.bpf.load_func(fn.encode(), bcc.BPF.XDP).fd)
            # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
            md = (ctypes.c_uint32 * 6)(0, len(f), 0, self.ifindex, 0, 0)
            runner._md = md   # kept alive with the runner
            runner._opts.ctx_in, runner._opts.ctx_size_in = ctypes.addressof(md), ctypes.sizeof(md)
            out.append(Case(f"fib: bpf_fib_lookup {fn[-2:]} + MACs (scratch program)", runner, [f], XDP_TX))
        return out

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
        _setns(self.orig)
        os.close(self.orig)
        self.run("netns", "del", self.ns)


def _setns(fd: int) -> None:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:   # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns")


def trace_cases(prog: loader.Program, new_flows: dict[str, list[bytes]], syn4: bytes) -> list[Case]:
    """Issue 15: the trace build (-DLBX_TRACE, bpf/trace.h), as `lbxdp trace` attaches it, on
    program_cases()'s rows: every packet also writes an event (flow, reason, 128 bytes of frame)
    to the ring. The ring is sized (LBX_TRACE_PAGES, trace_pages()) for every event of a
    repetition and emptied before each, so each run pays for a written event, not for a full
    ring. The normal build has no trace code: its program tag is printed beside the trace build's."""
    cases = program_cases("trace build: ", prog, new_flows, syn4)
    prog.bpf[b"lbx_trace_ring"].open_ring_buffer(lambda ctx, data, size: 0)

    def drained(before: Callable[[], None]) -> Callable[[], None]:
        def setup() -> None:
            prog.bpf.ring_buffer_consume()
            before()
        return setup
    for c in cases:
        c.before_rep = drained(c.before_rep)
    return cases


def trace_pages(calls: int) -> int:
    """Ring pages (a power of two) for calls + WARMUP events of 208 bytes (200 + the ring's header)."""
    need = -(-(calls + WARMUP) * 208 // 4096)
    return 1 << (need - 1).bit_length()


COMPILES: list[float] = []   # seconds per compile_program (bcc's clang + the verifier)


def compile_timed(build: loader.BuildConfig, source: loader.Source = loader.BALANCER) -> loader.Program:
    """loader.compile_program, timed: the figures print the compile time too (a 2 MiB map value
    type once made every compile ~46 s instead of ~5: bpf/maps.h, lbx_mbt_tmpl)."""
    t = time.monotonic()
    try:
        return loader.compile_program(build, source)
    finally:
        COMPILES.append(time.monotonic() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200_000, help="single runs per case and repetition (200000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (3)")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last one allowed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--flow-capacity", type=int, default=abi.FLOW_CAPACITY,
                    help=f"connection table size ({abi.FLOW_CAPACITY}, the default build); the new-flow "
                         "cases insert --calls flows, so a smaller table evicts")
    ap.add_argument("--bpf-dir", type=Path, default=None,
                    help="compile the C sources in this directory instead (e.g. an older bpf/ from git show)")
    ap.add_argument("--baseline-dir", type=Path, default=None,
                    help="also measure the C sources in this directory in the same run (rows marked 'before:'), "
                         "interleaved with the current ones, so that before/after share the machine's state")
    ap.add_argument("--no-admission", action="store_true",
                    help="skip the admission rows (a per-source limit, ACL tries: bpf/admit.h)")
    ap.add_argument("--admission-only", action="store_true",
                    help="only the floor and the admission rows (with --baseline-dir: of both sources)")
    ap.add_argument("--sched-only", action="store_true",
                    help="only the floor and the scheduler rows (issue 13: source, leastconn, caps vs Maglev)")
    ap.add_argument("--fib", action="store_true",
                    help="also measure a per-packet bpf_fib_lookup (scripts/fib_lookup.c) in a namespace of its own")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="give up after this long (900)")
    ap.add_argument("--trace", action="store_true",
                    help="also the trace build's rows (issue 15: -DLBX_TRACE, what `lbxdp trace` attaches)")
    args = ap.parse_args(argv)
    if not 1_000 <= args.calls <= 5_000_000 or not 1 <= args.reps <= 20:
        ap.error("--calls must be within 1000..5000000 and --reps within 1..20")
    if os.geteuid() != 0:
        ap.error("BPF_PROG_TEST_RUN needs root")
    cpu = max(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})

    pin_dirs: list[Path] = []
    progs: list[loader.Program] = []
    stub = None
    fib: FibLab | None = None
    deadline = time.monotonic() + args.max_seconds
    try:
        stub, stub_fd = loader.compile_stub()
        n = args.calls + WARMUP
        syn4 = frame(CLIENT4, VIP4, 999, 80, 6)
        cases = [Case("floor: xdp_stub (XDP_PASS)", bpfsys.TestRunner(stub_fd), [syn4], XDP_PASS)]
        new_flows = {"v4": new_flow_frames(n, VIP4, CLIENT4), "rr": new_flow_frames(n, VIP4, CLIENT4, 81),
                     "v6": new_flow_frames(n, VIP6, CLIENT6), "ipip": new_flow_frames(n, VIP4, CLIENT4, 82),
                     "ack4": new_flow_frames(n, VIP4, CLIENT4, tcp_flags=0x10),
                     "nat85": new_flow_frames(n, VIP4, CLIENT4, 85), "nat86": new_flow_frames(n, VIP4, CLIENT4, 86)}
        if not args.no_admission:
            new_flows |= {"lim4": new_flow_frames(n, VIP4, CLIENT4, 83), "acl4": new_flow_frames(n, VIP4, CLIENT4, 84),
                          "acl6": new_flow_frames(n, VIP6, CLIENT6, 84), "lim6": new_flow_frames(n, VIP6, CLIENT6, 83)}
        sources = [("", args.bpf_dir)] + ([("before: ", args.baseline_dir)] if args.baseline_dir else [])
        if not args.admission_only and (args.sched_only or (args.bpf_dir or loader.bpf_dir()).joinpath("sched.h").is_file()):
            for port in SCHED_PORTS.values():
                new_flows |= {f"syn{port}": new_flow_frames(n, VIP4, CLIENT4, port),
                              f"ack{port}": new_flow_frames(n, VIP4, CLIENT4, port, tcp_flags=0x10)}
            for gate in (True, False):
                pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
                progs.append(compile_timed(loader.BuildConfig(
                    pin_dir=pin_dirs[-1], src_dir=args.bpf_dir, flow_capacity=args.flow_capacity,
                    defines=() if gate else ("LBX_NO_HANDSHAKE_GATE",))))
                cases += sched_cases(progs[-1], new_flows, gate, pairs=bool(args.sched_only and args.baseline_dir))
            if args.sched_only and args.baseline_dir:   # before/after of the gated rows in one run
                pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
                progs.append(compile_timed(loader.BuildConfig(
                    pin_dir=pin_dirs[-1], src_dir=args.baseline_dir, flow_capacity=args.flow_capacity)))
                cases += sched_cases(progs[-1], new_flows, True, "before: ", pairs=True)
        if args.sched_only:
            sources = []
        for label, src in ([] if args.admission_only else sources):
            pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
            progs.append(compile_timed(loader.BuildConfig(pin_dir=pin_dirs[-1], src_dir=src,
                                                                   flow_capacity=args.flow_capacity)))
            cases += program_cases(label, progs[-1], new_flows, syn4)
            if not label:
                cases += encap_cases(progs[-1], new_flows)
        if ((args.bpf_dir or loader.bpf_dir()) / "nat.h").is_file() and not args.sched_only \
                and not args.admission_only:   # programs of their own (their own VIP set)
            roomy = 1 << (2 * n - 1).bit_length()   # every connection of a repetition: two entries each
            for full, defines in ((False, (f"LBX_NAT_CAPACITY={roomy}",)), (True, ())):
                pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
                progs.append(compile_timed(loader.BuildConfig(pin_dir=pin_dirs[-1], src_dir=args.bpf_dir,
                                                                       flow_capacity=args.flow_capacity,
                                                                       defines=defines)))
                cases += nat_cases(progs[-1], new_flows, full)
        # a program of its own per source (--baseline-dir: 'before: ' rows): its rules never touch the rows above
        for label, src in ([] if args.no_admission or args.sched_only else sources):
            pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
            progs.append(compile_timed(loader.BuildConfig(pin_dir=pin_dirs[-1], src_dir=src,
                                                                   flow_capacity=args.flow_capacity)))
            for c in admission_cases(progs[-1], new_flows):
                c.name = label + c.name
                cases.append(c)
        for label, src in ([] if args.admission_only else sources):
            if ((src or loader.bpf_dir()) / loader.DECAP.entry).is_file():
                pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
                progs.append(compile_decap(pin_dirs[-1], src))
                cases += decap_cases(progs[-1], label)
        if args.trace:
            pin_dirs.append(Path(f"/sys/fs/bpf/lbxdp-bench-{uuid.uuid4().hex[:12]}"))
            progs.append(compile_timed(loader.BuildConfig(
                pin_dir=pin_dirs[-1], src_dir=args.bpf_dir, flow_capacity=args.flow_capacity,
                defines=("LBX_TRACE", f"LBX_TRACE_PAGES={trace_pages(args.calls)}"))))
            cases += trace_cases(progs[-1], new_flows, syn4)
            normal = next((p for p in progs[:-1] if p.info.name.startswith("lbxdp_ingress")), None)
            tags = {"normal build": normal.info.tag if normal else "-", "trace build": progs[-1].info.tag}
            print("program tags: " + ", ".join(f"{k} {v}" for k, v in tags.items()), file=sys.stderr)
        if args.fib:
            fib = FibLab()
            cases += fib.cases()
        reps: dict[str, list[float]] = {c.name: [] for c in cases}
        for _ in range(args.reps):  # cases interleaved per repetition, so drift hits them all alike
            for c in cases:
                if time.monotonic() > deadline:
                    raise SystemExit(f"gave up after --max-seconds {args.max_seconds:.0f}")
                reps[c.name].append(measure(c, args.calls))
    finally:
        if fib is not None:
            fib.close()
        release(progs, stub, pin_dirs)

    results = [Result(name, statistics.median(v), min(v), max(v), v) for name, v in reps.items()]
    floor_ns = results[0].ns_median
    for r in results:
        r.ratio_to_floor = r.ns_median / floor_ns
    targets = [{"case": name, "max_ratio": t, "ratio": next(r.ratio_to_floor for r in results if r.case == name),
                "ok": next(r.ratio_to_floor for r in results if r.case == name) <= t} for name, t in TARGETS.items()
               if any(r.case == name for r in results)]
    by_name = {r.case: r for r in results}
    targets += [{"case": name, "vs": ref, "max_extra_ns": extra, "extra_ns": by_name[name].ns_median - by_name[ref].ns_median,
                 "ok": by_name[name].ns_median - by_name[ref].ns_median <= extra}
                for name, ref, extra in TARGETS_NS if name in by_name and ref in by_name]
    targets += [{"case": name, "max_ns": t, "ns": by_name[name].ns_median, "ok": by_name[name].ns_median <= t}
                for name, t in TARGETS_ABS.items() if name in by_name]
    info = {**machine(), "pinned_cpu": cpu, "calls": args.calls, "reps": args.reps,
            "flow_capacity": args.flow_capacity, "compile_s": [round(c, 2) for c in COMPILES],
            "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        print(json.dumps({"machine": info, "results": [asdict(r) for r in results], "targets": targets}, indent=2))
        return 0
    print(f"{info['cpu']}, {info['nproc']} CPUs, kernel {info['kernel']}, clocksource {info['clocksource']}; "
          f"pinned to CPU {cpu}; {args.calls} calls x {args.reps} reps, one run per call; "
          f"connection table of {args.flow_capacity}")
    if COMPILES:
        print(f"compile and load (bcc + verifier): {len(COMPILES)} programs, median {statistics.median(COMPILES):.1f} s, "
              f"max {max(COMPILES):.1f} s")
    print()
    print("| case | ns/packet (median) | min | max | x floor |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.case} | {r.ns_median:.1f} | {r.ns_min:.1f} | {r.ns_max:.1f} | {r.ratio_to_floor:.2f} |")
    print()
    for t in targets:
        if "max_ratio" in t:
            print(f"target {t['case']} <= {t['max_ratio']}x floor: {t['ratio']:.2f}x {'PASS' if t['ok'] else 'MISS'}")
        elif "max_ns" in t:
            print(f"target {t['case']} <= {t['max_ns']:.0f} ns: {t['ns']:.1f} ns {'PASS' if t['ok'] else 'MISS'}")
        else:
            print(f"target {t['case']} <= {t['vs']} + {t['max_extra_ns']:.0f} ns: {t['extra_ns']:+.1f} ns "
                  f"{'PASS' if t['ok'] else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
