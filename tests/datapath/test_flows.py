"""Flows over time: the connection table, backend-set changes, and the two schedulers.

These tests send several frames and change the config between them, always through
Balancer.apply; every frame is still checked as a Case (verdict, exact output, reason counter).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
from scapy.layers.l2 import Ether

from lbxdp import abi, model

from .frames import (BASE, CHURN4, CHURN4_SPARE, GONE4, HASH4, RR4, XDP_DROP, XDP_PASS, XDP_TX, backends,
                     forwarded, plus, tcp, vip, with_backends, without)
from .harness import Case, Lb, check, one_cpu

pytestmark = pytest.mark.root
R = abi.Reason


def backend_of(vip: model.Vip, frame: bytes, extra: tuple[model.Backend, ...] = ()) -> model.Backend:
    """The backend (of vip's config, or extra) whose MAC the output frame is addressed to."""
    dst = Ether(frame).dst
    [be] = [b for b in vip.backends + extra if b.mac == dst]
    return be


def send_to_any(lb: Lb, desc: str, pkt, allowed: tuple[model.Backend, ...]) -> model.Backend:
    """Run pkt, which must be forwarded to one of `allowed`; check it exactly against that one."""
    out = lb.run(pkt).data
    candidates = [b for b in allowed if b.mac == Ether(out).dst]
    assert candidates, f"{desc}: sent to {Ether(out).dst}, not to any of {[b.name for b in allowed]}"
    check(lb, Case(desc, pkt, XDP_TX, expect=forwarded(pkt, candidates[0])))  # same flow, same answer
    return candidates[0]


def test_established_flows_keep_their_backend_when_the_set_changes(lb: Lb) -> None:
    vip, (a, b, c) = str(CHURN4.address), CHURN4.backends
    with one_cpu():
        placed = {}
        for sport in range(42001, 42007):  # rr on one CPU: a, b, c, a, b, c
            syn = tcp(vip, 80, sport)
            placed[sport] = backend_of(CHURN4, check(lb, Case("syn", syn, XDP_TX,
                                                              expect=forwarded(syn, (a, b, c)[(sport - 42001) % 3]))))
        # c leaves, a spare joins, and a and b move to other slots of the new table.
        lb.apply(with_backends(BASE, CHURN4, (CHURN4_SPARE, b, a)))
        vid = lb.vip_id(CHURN4)
        new_flows = lb.maps.vip_stats(vid).new_flows
        for sport, be in placed.items():
            if be is c:
                continue
            seg = tcp(vip, 80, sport, flags="A", payload=b"more")
            check(lb, Case(f"flow {sport} stays on {be.name}", seg, XDP_TX, expect=forwarded(seg, be)))
        assert lb.maps.vip_stats(vid).new_flows == new_flows, "a flow that kept its backend counted as new"
        # New flows do use the new table: one each on the spare, b and a.
        fresh = [backend_of(CHURN4, lb.run(tcp(vip, 80, sport)).data, (CHURN4_SPARE,))
                 for sport in range(42101, 42104)]
        assert sorted(be.name for be in fresh) == sorted(be.name for be in (CHURN4_SPARE, b, a))


def test_a_flow_whose_backend_was_removed_moves_to_a_live_one(lb: Lb) -> None:
    vip, (a, b, c) = str(CHURN4.address), CHURN4.backends
    syn = tcp(vip, 80, 42201)
    check(lb, Case("syn goes to the first backend", syn, XDP_TX, expect=forwarded(syn, a)))
    lb.apply(with_backends(BASE, CHURN4, (b, c)))
    assert a.address not in {e.address for e in lb.maps.backends().values() if e.vip_id == lb.vip_id(CHURN4)}
    vid = lb.vip_id(CHURN4)
    before = lb.maps.vip_stats(vid)
    seg = tcp(vip, 80, 42201, flags="A", payload=b"after the change")
    moved = send_to_any(lb, "the flow's next segment goes to a live backend", seg, (b, c))
    # It started over: one new flow, and the connection table now names the new backend.
    assert lb.maps.vip_stats(vid).new_flows == before.new_flows + 1
    again = tcp(vip, 80, 42201, flags="A", payload=b"and stays")
    check(lb, Case("and stays there", again, XDP_TX, expect=forwarded(again, moved)))
    assert lb.maps.vip_stats(vid).new_flows == before.new_flows + 1


def test_established_flows_are_dropped_when_the_vip_loses_every_backend(lb: Lb) -> None:
    vip, (a, _, _) = str(CHURN4.address), CHURN4.backends
    syn = tcp(vip, 80, 42301)
    check(lb, Case("syn goes to the first backend", syn, XDP_TX, expect=forwarded(syn, a)))
    lb.apply(with_backends(BASE, CHURN4, ()))
    seg = tcp(vip, 80, 42301, flags="A", payload=b"x")
    check(lb, Case("then the vip has no backend", seg, XDP_DROP, reason=R.DROP_NO_BACKEND))


def test_rr_spreads_new_flows_exactly_evenly_on_one_cpu(lb: Lb) -> None:
    """30 new flows over 3 backends: exactly 10 each.

    Exact only on one CPU: the rotation position is per CPU (no atomics), so a process that
    moved between CPUs would run two interleaved rotations, each even but not their sum.
    """
    vip = str(RR4.address)
    before = {be: lb.maps.backend_stats(lb.backend_id(RR4, be)).new_flows for be in RR4.backends}
    with one_cpu():
        got = Counter(backend_of(RR4, check(lb, Case(f"flow {i}", p, XDP_TX, expect=forwarded(p, RR4.backends[i % 3]))))
                      for i, p in enumerate(tcp(vip, 80, 43000 + i) for i in range(30)))
    assert {be.name: n for be, n in got.items()} == {be.name: 10 for be in RR4.backends}
    for be in RR4.backends:
        assert lb.maps.backend_stats(lb.backend_id(RR4, be)).new_flows - before[be] == 10


def test_hash_picks_the_same_backend_for_a_flow_after_the_table_forgets_it(lb: Lb) -> None:
    """A 5-tuple's backend is a function of the 5-tuple: table resets and CPUs do not change it."""
    vip = str(HASH4.address)
    syn = tcp(vip, 80, 44001)
    ack = tcp(vip, 80, 44001, flags="A")
    first = send_to_any(lb, "syn to the hash vip", syn, HASH4.backends)
    check(lb, Case("its ack records the flow", ack, XDP_TX, expect=forwarded(ack, first)))
    for cpu in sorted(os.sched_getaffinity(0)) * 2:
        assert lb.clear_flows() == 1, "the flow table should hold exactly this flow"
        with one_cpu(cpu):
            check(lb, Case(f"the same syn after a table reset, on cpu {cpu}", syn, XDP_TX,
                           expect=forwarded(syn, first)))
            check(lb, Case(f"its ack after a table reset, on cpu {cpu}", ack, XDP_TX,
                           expect=forwarded(ack, first)))


def assert_even_spread(got: Counter, backends: tuple[model.Backend, ...]) -> None:
    """Every backend used, each within 4 standard deviations of a uniform random assignment.

    The hash is deterministic, so this cannot flake: it fails only for a hash that is not
    uniform on these inputs.
    """
    n, p = sum(got.values()), 1 / len(backends)
    mean, sd = n * p, (n * p * (1 - p)) ** 0.5
    assert set(got) == {be.name for be in backends}, got
    assert all(abs(c - mean) <= 4 * sd for c in got.values()), f"{dict(got)}: mean {mean:.0f}, sd {sd:.1f}"


def test_hash_spreads_one_clients_flows_over_every_backend(lb: Lb) -> None:
    vip = str(HASH4.address)
    flows = [tcp(vip, 80, sport) for sport in range(44100, 44500)]
    assert_even_spread(Counter(send_to_any(lb, "flow", p, HASH4.backends).name for p in flows), HASH4.backends)


def test_hash_spreads_a_nat_pool_over_every_backend(lb: Lb) -> None:
    """16 addresses x 16 ports. The first flow_hash() XORed the raw source port into the source
    address's last bytes, so this pool hashed to 16 values and split 128/64/32/32."""
    vip = str(HASH4.address)
    flows = [tcp(vip, 80, sport, src=f"100.64.0.{a}") for a in range(16) for sport in range(1024, 1040)]
    assert_even_spread(Counter(send_to_any(lb, "flow", p, HASH4.backends).name for p in flows), HASH4.backends)


def test_slot_naming_a_deleted_backend_drops(lb: Lb) -> None:
    """The race apply() orders its writes to avoid: a live table slot whose backend is gone.

    Provoked with the control plane's own primitive, deactivating the VIP's only backend while
    the table still names it; both a new flow and an established one are dropped, not sent to
    a stale MAC.
    """
    vip, [be] = str(GONE4.address), GONE4.backends
    syn = tcp(vip, 80, 45001)
    check(lb, Case("syn before the race", syn, XDP_TX, expect=forwarded(syn, be)))
    lb.maps.deactivate_backend(lb.backend_id(GONE4, be))
    seg = tcp(vip, 80, 45001, flags="A", payload=b"x")
    check(lb, Case("established flow in the race window", seg, XDP_DROP, reason=R.DROP_BACKEND_GONE))
    check(lb, Case("new flow in the race window", tcp(vip, 80, 45002), XDP_DROP, reason=R.DROP_BACKEND_GONE))


def test_a_flow_of_a_deleted_vip_does_not_follow_its_ids_to_a_new_vip(lb: Lb) -> None:
    """Established flows skip the VIP lookup, so the backend entry's generation must stop them.

    GONE4 is deleted; a new VIP at another address then gets GONE4's VIP id and its backend gets
    GONE4's backend id (the ids below them are filled first, with VIPs and backends that take
    them). GONE4's old flow must pass as traffic for no VIP, not go to the new VIP's backend.
    A VIP on another port of GONE4's address keeps the address's filter bit set throughout, so
    the filter cannot hide the flow from the connection table.
    """
    addr, [be] = str(GONE4.address), GONE4.backends
    keeper = vip(addr, 443, model.Protocol.TCP, ())
    lb.apply(plus(BASE, keeper))
    syn = tcp(addr, 80, 48001)
    check(lb, Case("syn to GONE4", syn, XDP_TX, expect=forwarded(syn, be)))
    vid, bid = lb.vip_id(GONE4), lb.backend_id(GONE4, be)
    lb.apply(plus(without(BASE, GONE4), keeper))
    free_vids = sorted(set(range(lb.maps.max_vips)) - {m.id for m in lb.maps.vips().values()})
    free_bids = sorted(set(range(1, lb.maps.max_backends)) - set(lb.maps.backends()))
    vid_fill, bid_fill = free_vids.index(vid), free_bids.index(bid)
    fillers = tuple(vip(f"10.10.10.{i + 1}", 80, model.Protocol.TCP, ()) for i in range(vid_fill))
    heir = vip("10.10.0.8", 80, model.Protocol.TCP, backends("10.10.11.", bid_fill + 1, 0x0C))
    lb.apply(plus(without(BASE, GONE4), keeper, *fillers, heir))
    assert (lb.vip_id(heir), lb.backend_id(heir, heir.backends[-1])) == (vid, bid), "the ids were not reused"
    seg = tcp(addr, 80, 48001, flags="A", payload=b"x")
    check(lb, Case("GONE4's old flow after its ids went to another vip", seg, XDP_PASS, reason=R.PASS_NOT_VIP))


def test_an_interrupted_apply_leaves_no_backend_that_outlives_its_vip(lb: Lb) -> None:
    """apply() deletes a VIP before it deactivates the VIP's backends; if it stops in between,
    the next apply() deactivates those orphans, so the VIP's flows stop being forwarded."""
    addr, [be] = str(GONE4.address), GONE4.backends
    keeper = vip(addr, 443, model.Protocol.TCP, ())  # keeps the address's filter bit set
    lb.apply(plus(BASE, keeper))
    syn = tcp(addr, 80, 48101)
    check(lb, Case("syn to GONE4", syn, XDP_TX, expect=forwarded(syn, be)))
    vid = lb.vip_id(GONE4)
    lb.maps.delete_vip(GONE4.key)  # step 4 of an apply that was killed right after this write
    lb.apply(plus(without(BASE, GONE4), keeper))
    assert [e for e in lb.maps.backends().values() if e.vip_id == vid] == []
    seg = tcp(addr, 80, 48101, flags="A", payload=b"x")
    check(lb, Case("GONE4's flow after the next apply", seg, XDP_PASS, reason=R.PASS_NOT_VIP))


def test_changing_a_backends_mac_keeps_its_flows(lb: Lb) -> None:
    """Rewriting the same (VIP, backend) keeps its generation: flows stay, and follow the new MAC."""
    a = CHURN4.backends[0]
    syn = tcp(str(CHURN4.address), 80, 48201)
    check(lb, Case("syn to the first backend", syn, XDP_TX, expect=forwarded(syn, a)))
    moved = dataclasses.replace(a, mac="02:be:07:00:00:aa")
    lb.apply(with_backends(BASE, CHURN4, (moved,) + CHURN4.backends[1:]))
    vid = lb.vip_id(CHURN4)
    new_flows = lb.maps.vip_stats(vid).new_flows
    seg = tcp(str(CHURN4.address), 80, 48201, flags="A", payload=b"x")
    check(lb, Case("the flow follows the backend's new mac", seg, XDP_TX, expect=forwarded(seg, moved)))
    assert lb.maps.vip_stats(vid).new_flows == new_flows
