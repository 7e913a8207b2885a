"""Passive health of DSR VIPs (issue 13, bpf/select.h passive_handshake()): what the balancer sees
of a handshake without the replies. A VIP with [vip.passive_health] (LBX_VIP_F_PASSIVE) sends every
TCP SYN half-open, even on a settled Maglev table; a SYN meeting its own half-open entry is the
client retransmitting (a failure of that backend: lbx_nat_be consecutive and syn_retx), the
handshake's ACK is a success (synack, consecutive back to 0) and ends the half-open entry. A VIP
without passive health is unchanged: its Maglev SYNs are forwarded by the table, nothing inserted.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from scapy.layers.l2 import Ether

from lbxdp import abi, model

from .frames import BASE, XDP_TX, backends, forwarded, plus, tcp, vip
from .harness import Lb

pytestmark = pytest.mark.root

PLAIN = vip("10.10.0.50", 80, model.Protocol.TCP, backends("10.10.50.", 4, 0x50), model.Scheduler.MAGLEV)
PASSIVE = dataclasses.replace(
    vip("10.10.0.51", 80, model.Protocol.TCP, backends("10.10.51.", 4, 0x51), model.Scheduler.MAGLEV),
    passive_health=model.PassiveHealth(failures=3, timeout=1.0, max_ejected=0.5))


@pytest.fixture
def plb(lb: Lb) -> Lb:
    lb.apply(plus(BASE, PLAIN, PASSIVE))
    lb.maps.clear_half_open()
    for v in (PLAIN, PASSIVE):
        for b in v.backends:
            lb.maps.m[abi.Map.NAT_BE].zero(lb.backend_id(v, b))
    return lb


def send(lb: Lb, pkt, v: model.Vip) -> model.Backend:
    """Run pkt once: forwarded exactly to one of v's backends; returns which."""
    out = lb.run(pkt)
    [be] = [b for b in v.backends if b.mac == Ether(out.data).dst]
    assert (out.retval, out.data) == (XDP_TX, bytes(forwarded(pkt, be)))
    return be


def sig(lb: Lb, v: model.Vip, b: model.Backend) -> tuple[int, int, int]:
    s = lb.maps.nat_backend(lb.backend_id(v, b))
    return s.consecutive, s.syn_retx, s.synack


def test_the_vip_flag_follows_the_config(plb: Lb) -> None:
    metas = plb.maps.vips()
    assert metas[PASSIVE.key].flags & abi.VIP_F_PASSIVE
    assert not metas[PLAIN.key].flags & abi.VIP_F_PASSIVE


def test_a_retransmitted_syn_is_a_failure_of_its_backend_and_the_ack_a_success(plb: Lb) -> None:
    addr = str(PASSIVE.address)
    be = send(plb, tcp(addr, 80, 51001), PASSIVE)
    assert plb.maps.half_open_entries() == 1, "a passive-health VIP's SYN goes half-open"
    assert sig(plb, PASSIVE, be) == (0, 0, 0), "a first SYN is no verdict"
    for n in (1, 2, 3):
        assert send(plb, tcp(addr, 80, 51001), PASSIVE) == be, "a retransmission keeps its backend"
        assert sig(plb, PASSIVE, be) == (n, n, 0)
    others = [b for b in PASSIVE.backends if b != be]
    assert all(sig(plb, PASSIVE, b) == (0, 0, 0) for b in others), "another backend was charged"
    assert plb.maps.nat_backend(plb.backend_id(PASSIVE, be)).last_failure > 0
    # the handshake's ACK: a success, the flow recorded, its half-open entry gone
    assert send(plb, tcp(addr, 80, 51001, flags="A"), PASSIVE) == be
    assert sig(plb, PASSIVE, be) == (0, 3, 1)
    assert (plb.maps.flow_count(), plb.maps.half_open_entries()) == (1, 0)
    # established packets count nothing more
    for _ in range(3):
        assert send(plb, tcp(addr, 80, 51001, flags="PA", payload=b"x"), PASSIVE) == be
    assert sig(plb, PASSIVE, be) == (0, 3, 1)


def test_flows_to_one_backend_count_in_a_row_until_one_completes(plb: Lb) -> None:
    addr = str(PASSIVE.address)
    chosen = {}
    for port in range(51100, 51160):
        chosen.setdefault(send(plb, tcp(addr, 80, port), PASSIVE), []).append(port)
    be, ports = max(chosen.items(), key=lambda kv: len(kv[1]))
    assert len(ports) >= 3
    for p in ports[:3]:
        send(plb, tcp(addr, 80, p), PASSIVE)
    assert sig(plb, PASSIVE, be)[:2] == (3, 3)
    send(plb, tcp(addr, 80, ports[0], flags="A"), PASSIVE)
    assert sig(plb, PASSIVE, be) == (0, 3, 1)


def test_a_vip_without_passive_health_inserts_no_half_open_entry(plb: Lb) -> None:
    addr = str(PLAIN.address)
    be = send(plb, tcp(addr, 80, 52001), PLAIN)
    send(plb, tcp(addr, 80, 52001), PLAIN)
    assert plb.maps.half_open_entries() == 0, "a settled Maglev VIP's SYN was recorded"
    assert send(plb, tcp(addr, 80, 52001, flags="A"), PLAIN) == be
    assert all(sig(plb, PLAIN, b) == (0, 0, 0) for b in PLAIN.backends)


def pend(lb: Lb, v: model.Vip, b: model.Backend) -> tuple[int, int, int]:
    s = lb.maps.nat_backend(lb.backend_id(v, b))
    return s.pending, s.syn_sent, s.pending_since


def test_first_syns_are_pending_with_the_first_ones_time_until_a_handshake_ack(plb: Lb) -> None:
    """passive_syn(): the signal that needs no client retransmission (the daemon compares
    pending_since with CLOCK_MONOTONIC and the VIP's timeout)."""
    addr = str(PASSIVE.address)
    chosen: dict[model.Backend, list[int]] = {}
    for port in range(53100, 53140):
        chosen.setdefault(send(plb, tcp(addr, 80, port), PASSIVE), []).append(port)
    be, ports = max(chosen.items(), key=lambda kv: len(kv[1]))
    n = len(ports)
    pending, sent, since = pend(plb, PASSIVE, be)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert (pending, sent) == (n, n)
    assert now - 2 * 10**9 < since <= now + 10**7, (since, now)   # CLOCK_MONOTONIC, the coarse tick
    assert sum(pend(plb, PASSIVE, b)[1] for b in PASSIVE.backends) == 40
    # a retransmission is not a new handshake: pending and the first one's time stay
    send(plb, tcp(addr, 80, ports[0]), PASSIVE)
    assert pend(plb, PASSIVE, be) == (n, n, since)
    # the handshake's ACK ends the run (pending 0, no time); the next SYN starts a new one
    send(plb, tcp(addr, 80, ports[1], flags="A"), PASSIVE)
    assert pend(plb, PASSIVE, be) == (0, n, 0)
    port = next(p for p in range(53200, 53300) if send(plb, tcp(addr, 80, p), PASSIVE) == be)
    pending, sent, since2 = pend(plb, PASSIVE, be)
    assert (pending, sent) == (1, n + 1) and since2 >= since, (port, pending, sent, since2, since)


def test_a_vip_without_passive_health_counts_no_pending_handshake(plb: Lb) -> None:
    addr = str(PLAIN.address)
    for port in range(52100, 52110):
        send(plb, tcp(addr, 80, port), PLAIN)
    assert all(pend(plb, PLAIN, b) == (0, 0, 0) for b in PLAIN.backends)
