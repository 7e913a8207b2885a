"""Selection tables, set up through the real control plane: weights, backups, drains, slow start,
any-port VIPs, the schedulers over weighted sequences, and switching one table for another.

Each test adds its own VIP to frames.BASE (the `lb` fixture puts BASE back before the next test)
and configures drains and slow starts only through balancer.Runtime. Tests that need thousands
of new flows build them with frames.new_flows (hand-built frames, checked against scapy below)
and check every output frame exactly, in bulk (spread()).

Tolerance of the share tests. A table holds each backend's share to within a few slots of 65537
(lbxdp/ring.py; checked below too), and flow_hash() is uniform, so the number of N new flows that
a backend with share p gets is binomial(N, p): each count may be off by 4 standard deviations,
4 * sqrt(N p (1 - p)), at most 1.4% of N for N = 20000. The hash is deterministic, so these tests
cannot flake: they fail only if a share or the hash is wrong.
"""

from __future__ import annotations

import array
import dataclasses
import ipaddress
import os
from collections import Counter
from typing import Any, Iterable

import pytest

from lbxdp import abi, bpfsys, model
from lbxdp.balancer import WEIGHT_SCALE, Balancer, Runtime
from lbxdp.maps import Maps, new_table

from .frames import (BASE, XDP_DROP, XDP_PASS, XDP_TX, backends, forwarded, mac_bytes, new_flows, plus, tcp,
                     tcp_bytes, udp)
from .harness import Case, Lb, check, explain, one_cpu

pytestmark = pytest.mark.root
R = abi.Reason
MAGLEV, RR, HASH = model.Scheduler.MAGLEV, model.Scheduler.RR, model.Scheduler.HASH
SLOTS = model.DEFAULT_TABLE_SIZE


# --- VIPs of this file: 10.10.0.<n>, backends 10.10.<n>.i, MAC tag <n>, n = 30.. ----------------------
def weighted(n: int, weights: Iterable[int], port: int = 8080, **fields: Any) -> tuple[model.Backend, ...]:
    """Backends 10.10.<n>.1.. with these weights (and any other Backend fields)."""
    ws = list(weights)
    plain = backends(f"10.10.{n}.", len(ws), n, port)
    return tuple(dataclasses.replace(b, weight=w, **fields) for b, w in zip(plain, ws))


def table_vip(n: int, bes: tuple[model.Backend, ...], sched: model.Scheduler = MAGLEV, port: int = 80,
              **fields: Any) -> model.Vip:
    return model.Vip(ipaddress.ip_address(f"10.10.0.{n}"), port, model.Protocol.TCP, scheduler=sched,
                     backends=bes, **fields)


def with_vip(v: model.Vip) -> model.Config:
    """BASE plus v (replacing any VIP with v's key)."""
    return plus(model.Config(tuple(x for x in BASE.vips if x.key != v.key)), v)


def ref(v: model.Vip, b: model.Backend) -> tuple[model.VipKey, Any, int]:
    return (v.key, b.address, b.port)


# --- sending many flows ---------------------------------------------------------------------------------
def opened(lb: Lb, addr: str, n: int, allowed: Iterable[model.Backend], first: int = 0) -> dict[bytes, model.Backend]:
    """spread() n new flows' SYNs, then their ACKs: the handshakes complete, so the connection
    table records the flows (bpf/select.h's handshake gate). Returns where each SYN went."""
    placed = spread(lb, new_flows(addr, 80, n, first=first), allowed)
    acked = spread(lb, new_flows(addr, 80, n, first=first, flags="A"), allowed)
    assert [b.name for b in placed.values()] == [b.name for b in acked.values()], "an ACK left its SYN's backend"
    return placed


def spread(lb: Lb, frames: list[bytes], allowed: Iterable[model.Backend]) -> dict[bytes, model.Backend]:
    """Send each frame: every one must be forwarded, exactly (only the MACs rewritten), to one of
    `allowed`, and the reason counters must show exactly that many forwards. Returns where each
    frame went."""
    by_mac = {mac_bytes(b.mac or ""): b for b in allowed}
    before = lb.maps.reasons()
    placed = {}
    for f in frames:
        r = lb.run(f)
        be = by_mac.get(r.data[:6])
        if r.retval != XDP_TX or be is None or r.data[6:] != f[:6] + f[12:]:
            first = next(iter(by_mac.values()))
            pytest.fail(explain(Case("one of many flows", f, XDP_TX, expect=forwarded(f, first)), r.data, [
                f"verdict {r.retval}, sent to {r.data[:6].hex(':')}; expected XDP_TX to one of "
                f"{[b.name for b in by_mac.values()]}, only the MACs rewritten (expected below: {first.name})"]),
                pytrace=False)
        placed[f] = be
    assert lb.reason_delta(before) == {R.TX_FORWARD: (len(frames), sum(map(len, frames)))}
    return placed


def counts(placed: dict[bytes, model.Backend]) -> Counter[str]:
    return Counter(b.name for b in placed.values())


def assert_shares(got: Counter[str], shares: dict[str, float]) -> None:
    """Each backend's count within 4 standard deviations of its share (see the module docstring);
    a backend with share 0 gets nothing."""
    n = sum(got.values())
    assert set(got) <= {k for k, p in shares.items() if p > 0}, f"flows went to {dict(got)}, shares {shares}"
    bad = {k: (got[k], round(n * p)) for k, p in shares.items()
           if abs(got[k] - n * p) > 4 * (n * p * (1 - p)) ** 0.5}
    assert not bad, f"backend: (flows, expected) off by more than 4 sd, of {n} flows: {bad}"


def table_shares(lb: Lb, v: model.Vip) -> Counter[str]:
    """Slots of the VIP's live table, by backend name."""
    names = {lb.backend_id(v, b): b.name for b in v.backends}
    return Counter(names[i] for i in lb.maps.table(lb.vip_id(v)))


def shares_of(weights: dict[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def test_hand_built_frames_are_scapys() -> None:
    for flags in ("S", "A", "PA"):
        for sport, src in ((20000, "100.64.0.0"), (65535, "100.127.255.255"), (1, "192.0.2.10")):
            assert tcp_bytes("10.10.0.30", 80, sport, src, flags) == bytes(tcp("10.10.0.30", 80, sport, src=src,
                                                                               flags=flags))


# --- weights -----------------------------------------------------------------------------------------------
def test_maglev_splits_new_flows_in_proportion_to_weights(lb: Lb) -> None:
    bes = weighted(30, (1, 2, 3, 4))
    v = table_vip(30, bes)
    lb.apply(with_vip(v))
    want = shares_of({b.name: b.weight for b in bes})
    slots = table_shares(lb, v)
    assert all(abs(slots[k] - SLOTS * p) <= 4 for k, p in want.items()), f"table: {dict(slots)}"
    assert_shares(counts(spread(lb, new_flows(str(v.address), 80, 20000), bes)), want)


def test_a_table_switch_keeps_established_flows(lb: Lb) -> None:
    """Remove a backend, add one and change a weight in one apply: the flows of the backends that
    stay keep them; the removed backend's flows move to a live one; new flows use the new table."""
    a, b, c, d, e, f = weighted(31, (1,) * 6)
    v = table_vip(31, (a, b, c, d, e))
    lb.apply(with_vip(v))
    addr, n = str(v.address), 1000
    placed = opened(lb, addr, n, v.backends)
    assert set(placed.values()) == set(v.backends)
    after = dataclasses.replace(v, backends=(dataclasses.replace(a, weight=3), b, c, d, f))
    lb.apply(with_vip(after))
    vid = lb.vip_id(v)
    new_before = lb.maps.vip_stats(vid).new_flows
    moved = spread(lb, new_flows(addr, 80, n, flags="A"), after.backends)
    for syn, ack in zip(placed, moved):
        if placed[syn] is not e:
            assert moved[ack].address == placed[syn].address, f"a flow left {placed[syn].name} for {moved[ack].name}"
    # Only e's flows started over (they count as new flows of the VIP), on any live backend.
    assert lb.maps.vip_stats(vid).new_flows - new_before == sum(1 for be in placed.values() if be is e)
    fresh = counts(spread(lb, new_flows(addr, 80, 7000, first=n), after.backends))
    assert_shares(fresh, shares_of({x.name: x.weight for x in after.backends}))


# --- backups, drains, slow start ---------------------------------------------------------------------------
def test_backup_takes_new_flows_only_while_no_primary_can(lb: Lb) -> None:
    p1, p2, bk = weighted(32, (1, 1, 1))
    bk = dataclasses.replace(bk, backup=True)
    v = table_vip(32, (p1, p2, bk))
    lb.apply(with_vip(v))
    addr = str(v.address)
    assert set(table_shares(lb, v)) == {p1.name, p2.name}, "the backup is in the table"
    placed = opened(lb, addr, 1000, (p1, p2))
    assert counts(placed).keys() == {p1.name, p2.name}
    acks = new_flows(addr, 80, 1000, flags="A")

    # Every primary draining: new flows go to the backup; the primaries keep their flows.
    lb.apply(with_vip(v), Runtime(draining=frozenset({ref(v, p1), ref(v, p2)})))
    assert set(spread(lb, new_flows(addr, 80, 300, first=1000), (bk,)).values()) == {bk}
    kept = spread(lb, acks, (p1, p2))
    assert [kept[a] for a in acks] == list(placed.values()), "a drained primary lost an established flow"

    # Every primary at weight 0 (not draining): the same.
    zero = dataclasses.replace(v, backends=(dataclasses.replace(p1, weight=0), dataclasses.replace(p2, weight=0), bk))
    lb.apply(with_vip(zero))
    assert set(table_shares(lb, zero)) == {bk.name}
    spread(lb, new_flows(addr, 80, 300, first=2000), (bk,))
    kept = spread(lb, acks, (p1, p2))
    assert [kept[a].name for a in acks] == [b.name for b in placed.values()]

    # A primary back: the backup gets no new flow again.
    lb.apply(with_vip(v))
    assert counts(spread(lb, new_flows(addr, 80, 300, first=3000), (p1, p2))).keys() == {p1.name, p2.name}


def test_a_draining_backend_gets_no_new_flows_and_keeps_its_own(lb: Lb) -> None:
    a, b, c = bes = weighted(33, (1, 1, 1))
    v = table_vip(33, bes)
    lb.apply(with_vip(v))
    addr = str(v.address)
    placed = opened(lb, addr, 900, bes)
    assert counts(placed)[b.name] > 0
    lb.apply(with_vip(v), Runtime(draining=frozenset({ref(v, b)})))
    assert set(table_shares(lb, v)) == {a.name, c.name}
    acks = new_flows(addr, 80, 900, flags="A")
    kept = spread(lb, acks, bes)
    assert [kept[x] for x in acks] == list(placed.values())
    assert_shares(counts(spread(lb, new_flows(addr, 80, 4000, first=900), (a, c))), {a.name: 0.5, c.name: 0.5})


def test_slow_start_ramps_a_new_backends_share(lb: Lb) -> None:
    """One second into a 10 s slow start, the new backend weighs 10% of its weight (Runtime.weight),
    so it gets 10% of its full share of new flows; from joined + 10 s on, all of it."""
    bes = weighted(34, (1,) * 5)
    new = bes[-1]
    v = table_vip(34, bes, slow_start=10.0)
    joined = 1000.0
    ramping = Runtime(joined={ref(v, new): joined}, now=joined + 1)
    assert ramping.weight(v, new) == WEIGHT_SCALE // 10
    lb.apply(with_vip(v), ramping)
    weights = {b.name: ramping.weight(v, b) for b in bes}
    slots = table_shares(lb, v)
    assert abs(slots[new.name] - SLOTS * weights[new.name] / sum(weights.values())) <= 4, f"table: {dict(slots)}"
    addr = str(v.address)
    assert_shares(counts(spread(lb, new_flows(addr, 80, 20000), bes)), shares_of(weights))

    lb.apply(with_vip(v), Runtime(joined={ref(v, new): joined}, now=joined + 10))
    assert abs(table_shares(lb, v)[new.name] - SLOTS / 5) <= 4
    fresh = counts(spread(lb, new_flows(addr, 80, 10000, first=20000), bes))
    assert_shares(fresh, {b.name: 1 / 5 for b in bes})


# --- VIPs with no usable backend ---------------------------------------------------------------------------
NOBODY = {
    "every backend at weight 0": lambda v: (dataclasses.replace(v, backends=tuple(
        dataclasses.replace(b, weight=0) for b in v.backends)), Runtime()),
    "every backend draining": lambda v: (v, Runtime(draining=frozenset(ref(v, b) for b in v.backends))),
}


@pytest.mark.parametrize("how", NOBODY)
def test_a_vip_with_no_usable_backend_drops_new_flows_and_keeps_established_ones(lb: Lb, how: str) -> None:
    bes = weighted(35, (1, 1))
    v = table_vip(35, bes)
    lb.apply(with_vip(v))
    addr = str(v.address)
    placed = opened(lb, addr, 8, bes)
    nobody, rt = NOBODY[how](v)
    lb.apply(with_vip(nobody), rt)
    assert lb.maps.vips()[v.key].table_size == 0
    check(lb, Case("a new flow to a vip with no usable backend", tcp(addr, 80, 45500, src="192.0.2.99"),
                   XDP_DROP, reason=R.DROP_NO_BACKEND))
    for ack, be in zip(new_flows(addr, 80, 8, flags="A"), placed.values()):
        check(lb, Case(f"an established flow of {be.name}", ack, XDP_TX, expect=forwarded(ack, be)))


# --- any-port VIPs -----------------------------------------------------------------------------------------
ANY_ADDR = "10.10.0.36"
[ANY_BE] = backends("10.10.36.", 1, 36, port=0)   # port 0: the packet keeps its port
[EXACT_BE] = backends("10.10.37.", 1, 37, port=443)
ANY_VIP = model.Vip(ipaddress.ip_address(ANY_ADDR), 0, model.Protocol.TCP, scheduler=RR, backends=(ANY_BE,))
EXACT_VIP = model.Vip(ipaddress.ip_address(ANY_ADDR), 443, model.Protocol.TCP, scheduler=RR, backends=(EXACT_BE,))


def _any(desc: str, pkt: Any, be: model.Backend) -> Case:
    return Case(desc, pkt, XDP_TX, expect=forwarded(pkt, be))


ANY_PORT_CASES = [
    _any("tcp to port 80 of an any-port vip is forwarded, port kept", tcp(ANY_ADDR, 80, 46001), ANY_BE),
    _any("tcp to port 8443 of an any-port vip is forwarded, port kept", tcp(ANY_ADDR, 8443, 46002), ANY_BE),
    _any("tcp to port 1 of an any-port vip is forwarded", tcp(ANY_ADDR, 1, 46003), ANY_BE),
    _any("tcp to port 65535 of an any-port vip is forwarded", tcp(ANY_ADDR, 65535, 46004), ANY_BE),
    _any("a data segment to an any-port vip keeps port and payload",
         tcp(ANY_ADDR, 5432, 46005, flags="PA", payload=b"select 1"), ANY_BE),
    _any("the exact-port vip on the same address wins over the any-port one", tcp(ANY_ADDR, 443, 46006), EXACT_BE),
    Case("udp to an address with only a tcp any-port vip passes", udp(ANY_ADDR, 53, 46007), XDP_PASS,
         reason=R.PASS_NOT_VIP),
]


@pytest.mark.parametrize("case", ANY_PORT_CASES, ids=[c.desc for c in ANY_PORT_CASES])
def test_any_port_vip(lb: Lb, case: Case) -> None:
    lb.apply(plus(BASE, ANY_VIP, EXACT_VIP))
    check(lb, case)


# --- rr and hash over weighted sequences -------------------------------------------------------------------
def test_rr_with_weights_3_to_1_is_exactly_3_to_1_on_one_cpu(lb: Lb) -> None:
    a, b = bes = weighted(38, (3, 1))
    v = table_vip(38, bes, RR)
    lb.apply(with_vip(v))
    table = lb.maps.table(lb.vip_id(v))
    ids = {lb.backend_id(v, x): x for x in bes}
    assert sorted(ids[i].name for i in table) == sorted([a.name] * 3 + [b.name]), "the weighted sequence"
    frames = new_flows(str(v.address), 80, 40)
    with one_cpu():
        placed = spread(lb, frames, bes)
    assert [placed[f] for f in frames] == [ids[table[i % len(table)]] for i in range(40)], "not in table order"
    assert counts(placed) == {a.name: 30, b.name: 10}


def test_hash_spreads_new_flows_by_weight(lb: Lb) -> None:
    bes = weighted(39, (3, 1))
    v = table_vip(39, bes, HASH)
    lb.apply(with_vip(v))
    got = counts(spread(lb, new_flows(str(v.address), 80, 4000), bes))
    assert_shares(got, shares_of({b.name: b.weight for b in bes}))


# --- switching tables --------------------------------------------------------------------------------------
class ProbedMap:
    """A bpfsys.Map whose writes are logged, with `probe` called before and after each one."""

    def __init__(self, m: Any, log: list[str], probe: Any):
        self._m, self._log, self._probe = m, log, probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def _write(self, what: str, fn: Any, *args: Any) -> Any:
        self._probe(f"before {self._m.name} {what}")
        self._log.append(f"{self._m.name} {what}")
        out = fn(*args)
        self._probe(f"after {self._m.name} {what}")
        return out

    def update(self, *args: Any) -> None:
        self._write("update", self._m.update, *args)

    def update_batch(self, *args: Any) -> None:
        self._write("update_batch", self._m.update_batch, *args)

    def delete(self, *args: Any) -> bool:
        return self._write("delete", self._m.delete, *args)


def test_switching_maglev_to_rr_and_back_never_sees_a_slot_outside_the_table(lb: Lb) -> None:
    """A 65537-slot Maglev table and a 3-slot round robin: the VIP's size must shrink before the
    table does and grow after it. A new flow and an established one are sent before and after
    every map write that apply() makes, and the flows right after each switch: all forwarded."""
    bes = weighted(40, (1, 1, 1))
    maglev, rr = table_vip(40, bes), table_vip(40, bes, RR)
    addr = str(maglev.address)
    lb.apply(with_vip(maglev))
    est = tcp(addr, 80, 47000, src="192.0.2.77")
    home = spread(lb, [bytes(est)], bes)[bytes(est)]
    sport = iter(range(47001, 48000))
    probes = []

    def probe(when: str) -> None:
        syn = tcp(addr, 80, next(sport), src="192.0.2.78")
        r, again = lb.run(syn), lb.run(est)
        probes.append((when, r.retval, again.retval))
        assert r.retval == XDP_TX and r.data in {forwarded(syn, b) for b in bes}, \
            f"{when}: a new flow got verdict {r.retval} (probes so far: {probes})"
        assert again.retval == XDP_TX and again.data == forwarded(est, home), f"{when}: the established flow moved"

    log: list[str] = []
    spy = Maps({**lb.prog.maps, **{m: ProbedMap(lb.prog.maps[m], log, probe) for m in (abi.Map.VIPS, abi.Map.TABLES)}})
    meta, swap = f"{abi.Map.VIPS.value} update", f"{abi.Map.TABLES.value} update_batch"
    before = lb.maps.reasons()
    for n, (cfg, shrinks) in enumerate(((rr, True), (maglev, False), (rr, True), (maglev, False))):
        log.clear()
        Balancer(spy).apply(with_vip(cfg), macs={})
        assert log == ([meta, swap] if shrinks else [swap, meta]), log
        spread(lb, new_flows(addr, 80, 50, first=50 * n), bes)
    assert set(lb.reason_delta(before)) == {R.TX_FORWARD}
    assert len(probes) == 16


def test_rr_position_past_a_shrunk_table_starts_again_at_slot_0(lb: Lb) -> None:
    bes = weighted(41, (1,) * 5)
    v = table_vip(41, bes, RR)
    lb.apply(with_vip(v))
    addr = str(v.address)
    with one_cpu():
        spread(lb, new_flows(addr, 80, 4), bes)   # this CPU's position: 4
        small = dataclasses.replace(v, backends=bes[:3])
        lb.apply(with_vip(small))
        frames = new_flows(addr, 80, 4, first=4)
        placed = spread(lb, frames, bes[:3])
    assert [placed[f] for f in frames] == [bes[0], bes[1], bes[2], bes[0]]


def test_reapplying_the_same_config_keeps_the_table(lb: Lb) -> None:
    """The table tag: nothing is rebuilt or written for an unchanged VIP; a weight change is."""
    bes = weighted(42, (1, 1, 1))
    v = table_vip(42, bes)
    lb.apply(with_vip(v))
    vid = lb.vip_id(v)
    inner = lb.maps.tables_map.lookup(vid).value
    log: list[str] = []
    spy = Maps({**lb.prog.maps, **{m: ProbedMap(lb.prog.maps[m], log, lambda when: None)
                                  for m in (abi.Map.VIPS, abi.Map.TABLES)}})
    assert Balancer(spy).apply(with_vip(v), macs={}).empty and log == []
    assert lb.maps.tables_map.lookup(vid).value == inner
    heavier = dataclasses.replace(v, backends=(dataclasses.replace(bes[0], weight=2),) + bes[1:])
    Balancer(spy).apply(with_vip(heavier), macs={})
    assert lb.maps.tables_map.lookup(vid).value != inner
    assert table_shares(lb, heavier)[bes[0].name] == pytest.approx(SLOTS / 2, abs=4)


@pytest.mark.parametrize("slots", [1, 3, 4, 5, 251, 65537])
def test_a_packed_table_reads_back_slot_for_slot(slots: int) -> None:
    """bpf/abi.h LBX_TABLE_SLOTS_PER_WORD: four 16-bit backend ids per 8-byte value, written as
    memory (BPF_F_MMAPABLE) or by batch update; the last value's unused slots are not slots."""
    ids = array.array("I", (1 + (i * 40503) % 16383 for i in range(slots)))
    for flags in (bpfsys.BPF_F_INNER_MAP, bpfsys.BPF_F_INNER_MAP | bpfsys.BPF_F_MMAPABLE):
        fd = new_table("lbx_test", ids, flags)
        try:
            assert bpfsys.map_info(fd).max_entries == (slots + 3) // 4
            assert bpfsys.table_read(fd) == ids
        finally:
            os.close(fd)


def test_a_table_written_as_memory_reads_back_like_one_written_by_batch_update() -> None:
    """Maps.write_tables writes through a shared mapping when the template is BPF_F_MMAPABLE
    (u32 values at 8-byte strides) and by batch update for pins made before that flag."""
    values = array.array("I", ((i * 2654435761) & 0xFFFFFFFF for i in range(SLOTS)))
    for flags, mmapable in ((bpfsys.BPF_F_INNER_MAP, False), (bpfsys.BPF_F_INNER_MAP | bpfsys.BPF_F_MMAPABLE, True)):
        fd = bpfsys.array_create("lbx_test", len(values), flags=flags)
        try:
            bpfsys.array_fill(fd, values, mmapable=mmapable)
            assert bpfsys.array_read(fd) == values
        finally:
            os.close(fd)
