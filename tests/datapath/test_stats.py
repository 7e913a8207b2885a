"""Per-VIP and per-backend counters: packets, bytes (whole frames) and new flows, exactly."""

from __future__ import annotations

from collections import defaultdict

import pytest

from lbxdp import abi
from lbxdp.maps import Stats

from .frames import BASE, EMPTY4, STATS4, XDP_DROP, XDP_PASS, XDP_TX, forwarded, tcp, with_backends
from .harness import Case, Lb, check, one_cpu

pytestmark = pytest.mark.root
R = abi.Reason


def delta(after: Stats, before: Stats) -> Stats:
    return Stats(after.packets - before.packets, after.bytes - before.bytes, after.new_flows - before.new_flows)


def test_vip_and_backend_counters_count_packets_bytes_and_new_flows(lb: Lb) -> None:
    vip = str(STATS4.address)
    p, q = STATS4.backends
    vid, ids = lb.vip_id(STATS4), {be: lb.backend_id(STATS4, be) for be in STATS4.backends}
    vip_before = lb.maps.vip_stats(vid)
    be_before = {be: lb.maps.backend_stats(i) for be, i in ids.items()}
    # Two flows: rr on one CPU puts the first on p, the second on q.
    traffic = [
        (tcp(vip, 80, 46001), p, 1),
        (tcp(vip, 80, 46001, flags="A", payload=b"a" * 100), p, 0),
        (tcp(vip, 80, 46001, flags="PA", payload=b"b" * 200), p, 0),
        (tcp(vip, 80, 46002), q, 1),
        (tcp(vip, 80, 46002, flags="PA", payload=b"c" * 1000), q, 0),
    ]
    want_be: dict = defaultdict(lambda: Stats())
    with one_cpu():
        for pkt, be, new in traffic:
            check(lb, Case(f"{pkt.summary()} -> {be.name}", pkt, XDP_TX, expect=forwarded(pkt, be)))
            w = want_be[be]
            want_be[be] = Stats(w.packets + 1, w.bytes + len(pkt), w.new_flows + new)
    # Traffic that is not forwarded for this VIP counts under its reason only.
    check(lb, Case("same address, other port", tcp(vip, 81, 46003), XDP_PASS, reason=R.PASS_NOT_VIP))
    assert delta(lb.maps.vip_stats(vid), vip_before) == Stats(5, sum(len(t[0]) for t in traffic), 2)
    for be, i in ids.items():
        assert delta(lb.maps.backend_stats(i), be_before[be]) == want_be[be], be.name


def test_frames_are_counted_at_their_full_length_with_a_vlan_tag(lb: Lb) -> None:
    vid, be = lb.vip_id(STATS4), STATS4.backends[0]
    before = lb.maps.vip_stats(vid)
    pkt = tcp(str(STATS4.address), 80, 46101, vlan=5, payload=b"z" * 33)
    check(lb, Case("tagged frame", pkt, XDP_TX, expect=forwarded(pkt, be)))
    assert len(pkt) == 14 + 4 + 20 + 20 + 33
    assert delta(lb.maps.vip_stats(vid), before) == Stats(1, len(pkt), 1)


def test_a_vip_with_no_backend_counts_its_drops_under_the_reason_only(lb: Lb) -> None:
    """Per-VIP counters count what was forwarded; what was dropped is in the reason counters."""
    vid = lb.vip_id(EMPTY4)
    before = lb.maps.vip_stats(vid)
    check(lb, Case("syn to the empty vip", tcp(str(EMPTY4.address), 80, 46201), XDP_DROP,
                   reason=R.DROP_NO_BACKEND))
    assert lb.maps.vip_stats(vid) == before


def test_a_retired_backend_keeps_its_traffic_in_its_vip_and_in_tx_forward(lb: Lb) -> None:
    """The program counts a forwarded packet in its backend's entry only (bpf/stats.h); a VIP's
    counters and the tx_forward reason are sums (lbxdp.maps). Removing a backend must move none
    of them down (Prometheus would read a reset), and its id's next owner starts from zero."""
    vip = str(STATS4.address)
    p, q = STATS4.backends
    vid, pid = lb.vip_id(STATS4), lb.backend_id(STATS4, p)
    before, reasons0 = lb.maps.vip_stats(vid), lb.maps.reasons()
    frames = [tcp(vip, 80, 46301 + i, payload=b"x" * i) for i in range(8)]
    with one_cpu():
        for f in frames:
            lb.run(f)
    sent = Stats(len(frames), sum(map(len, frames)), len(frames))
    assert delta(lb.maps.vip_stats(vid), before) == sent
    assert lb.reason_delta(reasons0) == {R.TX_FORWARD: (sent.packets, sent.bytes)}
    on_p = lb.maps.backend_stats(pid)
    assert on_p.packets, "no packet reached the backend to retire: the test shows nothing"

    lb.apply(with_backends(BASE, STATS4, (q,)))   # p retired
    assert delta(lb.maps.vip_stats(vid), before) == sent
    assert lb.reason_delta(reasons0) == {R.TX_FORWARD: (sent.packets, sent.bytes)}
    assert lb.maps.backend_stats(pid) == Stats()

    lb.apply(BASE)                                # p again: a new entry, from zero
    assert lb.maps.backend_stats(lb.backend_id(STATS4, p)) == Stats()
    assert delta(lb.maps.vip_stats(vid), before) == sent
    with one_cpu():
        assert lb.run(frames[0]).retval == XDP_TX
    assert delta(lb.maps.vip_stats(vid), before).packets == sent.packets + 1

    lb.apply(BASE.__class__(vips=tuple(v for v in BASE.vips if v.key != STATS4.key)))   # the VIP goes
    assert lb.reason_delta(reasons0) == {R.TX_FORWARD: (sent.packets + 1, sent.bytes + len(frames[0]))}
    lb.apply(BASE)                                # a new VIP under that key: its own counters
    assert lb.maps.vip_stats(lb.vip_id(STATS4)) == Stats()
