"""lbxdp.explain against the program itself: for random tuples of every VIP kind, the dry run
(the normal program over the live read-only maps and scratch copies of the written ones) gives
the verdict, reason, backend and output frame that the real program then gives the same frame,
and running it leaves every map the program writes exactly as it was.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import time
from typing import Iterator

import pytest

from lbxdp import abi, explain, model, trace
from lbxdp.maps import Maps

from .frames import BASE, DNS4, DNS6, HASH4, LB_MAC, RR4, TCP_, UDP_, WEB4, WEB6, backends, plus, vip
from .harness import Lb, one_cpu

MAG4 = dataclasses.replace(vip("10.10.0.40", 443, TCP_, backends("10.10.40.", 5, 0x40), model.Scheduler.MAGLEV),
                           table_size=251)
MAG6 = dataclasses.replace(vip("fd10::40", 443, TCP_, backends("fd10:40::", 4, 0x41), model.Scheduler.MAGLEV),
                           table_size=65537)
MAGUDP = dataclasses.replace(vip("10.10.0.41", 53, UDP_, backends("10.10.41.", 3, 0x42), model.Scheduler.MAGLEV),
                             table_size=1021)
WEIGHTED = vip("10.10.0.42", 80, TCP_, tuple(dataclasses.replace(b, weight=w) for b, w in
                                             zip(backends("10.10.42.", 3, 0x43), (1, 2, 5))), model.Scheduler.HASH)
CFG = plus(BASE, MAG4, MAG6, MAGUDP, WEIGHTED)
VIPS = (WEB4, DNS4, WEB6, DNS6, HASH4, RR4, MAG4, MAG6, MAGUDP, WEIGHTED)
TUPLES = 10_000


@pytest.fixture(scope="module")
def dry(compiled_lb: Lb) -> Iterator[explain.DryRun]:
    """The dry run over the session program's maps: compiled once for this module (live maps
    shared, written ones copied); unloaded and its scratch pins removed after."""
    with explain.DryRun(compiled_lb.prog.maps) as d:
        yield d


@pytest.fixture
def lbx(lb: Lb) -> Lb:
    lb.apply(CFG)
    return lb


def probes(v: model.Vip, n: int, seed: int) -> list[explain.Probe]:
    """n packets to v from random clients; one in ten repeats an earlier tuple (then it is an
    established flow, or its handshake's next packet); TCP ones are SYNs or later segments."""
    rnd = random.Random(seed)
    out: list[explain.Probe] = []
    net = ipaddress.ip_network("100.64.0.0/10" if v.address.version == 4 else "2001:db8:1000::/36")
    for _ in range(n):
        if out and rnd.random() < 0.1:
            p = rnd.choice(out)
            out.append(dataclasses.replace(p, syn=False))
            continue
        src = net[rnd.randrange(1, net.num_addresses - 1)]
        out.append(explain.Probe(src, rnd.randrange(1024, 65536), v.address, v.port, v.protocol,
                                 syn=v.protocol is model.Protocol.TCP and rnd.random() < 0.5))
    return out


def written_state(m: Maps) -> dict[str, object]:
    """Everything the program writes, read back: counters, tables' contents, per-CPU state."""
    out: dict[str, object] = {}
    for name in explain.WRITTEN:
        mp = m.m.get(name)
        if mp is None or name == abi.Map.NAT_SCRATCH:   # scratch space, holds nothing between packets
            continue
        rows = []
        for keys, values, n in mp.batches():
            for i in range(n):
                v = values[i]
                rows.append((bytes(keys[i]), bytes(v)))
        out[name] = sorted(rows)
    return out


@pytest.mark.parametrize("v", VIPS, ids=lambda v: v.name)
def test_explain_agrees_with_the_program_on_random_tuples(lbx: Lb, dry: explain.DryRun, v: model.Vip) -> None:
    seen: dict[str, int] = {}
    with one_cpu():
        for i, p in enumerate(probes(v, TUPLES, seed=hash(v.name) & 0xFFFF)):
            verdict, reason, backend, out = dry.choose(p)
            # The counters as the program writes them (reasons() would sum 16,384 backend entries
            # per call): a forwarded packet counts in its backend only (bpf/stats.h), any other
            # exit under its reason.
            before = lbx.maps.counted_reasons()
            be_before = lbx.maps.backend_stats(backend).packets if backend is not None else 0
            got = lbx.run(explain.frame(p, LB_MAC))
            after = lbx.maps.counted_reasons()
            delta = {r for r in after if after[r] != before[r]}
            assert (verdict, out) == (got.retval, got.data), f"tuple {i} {p.name}: explain {verdict} " \
                f"{out.hex()} vs program {got.retval} {got.data.hex()}"
            if backend is not None:
                assert lbx.maps.backend_stats(backend).packets == be_before + 1, \
                    f"tuple {i} {p.name}: explain says backend entry {backend}, the program counted another"
            if reason is abi.Reason.TX_FORWARD:
                assert not delta, f"tuple {i} {p.name}: explain says {reason}, program {delta}"
            else:
                assert delta == {reason}, f"tuple {i} {p.name}: explain says {reason}, program {delta}"
            if backend is not None:
                seen[reason.name] = seen.get(reason.name, 0) + 1
    # the tuples did exercise forwarding (not just agree on drops)
    assert seen.get("TX_FORWARD", 0) > TUPLES // 2, seen


def test_explain_writes_nothing(lbx: Lb, dry: explain.DryRun) -> None:
    for p in probes(MAG4, 300, seed=1)[:300]:       # some established flows to find
        lbx.run(explain.frame(p, LB_MAC))
        lbx.run(explain.frame(dataclasses.replace(p, syn=False), LB_MAC))
    flows = lbx.maps.flow_count()
    assert flows > 100
    before = written_state(lbx.maps)
    for v in VIPS:
        for p in probes(v, 300, seed=2):
            dry.explain(p)
    assert lbx.maps.flow_count() == flows
    after = written_state(lbx.maps)
    changed = [n for n in before if before[n] != after[n]]
    assert not changed, f"explain changed live maps {changed}"


def test_explanation_names_the_path(lbx: Lb, dry: explain.DryRun) -> None:
    p = explain.Probe(ipaddress.ip_address("100.64.9.9"), 41000, MAG4.address, MAG4.port, TCP_, syn=True)
    e = dry.explain(p)
    assert (e.verdict, e.reason, e.via, e.vip) == ("tx", abi.Reason.TX_FORWARD, "table slot", MAG4.name)
    assert e.slot == explain.flow_hash(p) % 251 and e.backend is not None and e.table_choice == e.backend.name
    # the real program records the flow (SYN, then its ACK): now it is a connection-table hit
    lbx.run(explain.frame(p, LB_MAC))
    ack = dataclasses.replace(p, syn=False)
    lbx.run(explain.frame(ack, LB_MAC))
    e2 = dry.explain(ack)
    assert e2.via == "connection table" and e2.backend == e.backend
    assert [x.table for x in e2.entries] == ["connection table"] and e2.entries[0].live
    # not a VIP: passed, no backend
    e3 = dry.explain(dataclasses.replace(p, dst=ipaddress.ip_address("198.51.100.7")))
    assert (e3.verdict, e3.reason, e3.backend) == ("pass", abi.Reason.PASS_NOT_VIP, None)
    assert e.to_json()["backend"]["name"] == e.backend.name and "because:" in "\n".join(e.text())


@pytest.mark.parametrize("v, src", [(MAG4, "100.64.7.7"), (MAG6, "2001:db8:1000::7")], ids=["v4", "v6"])
def test_explain_sees_the_sources_limit(lb: Lb, dry: explain.DryRun, v: model.Vip, src: str) -> None:
    """A source that spent its burst (bpf/limit.h's per-CPU buckets, copied by explain from the
    set lbxdp.maps.src_limit_set names) is explained as refused, as the program then refuses it;
    another source (and, for v6, another /64) is not; the live buckets are left as they were."""
    lim = model.Admission(new_flow_limit=model.NewFlowLimit(1, 2))
    lb.apply(dataclasses.replace(CFG, vips=tuple(dataclasses.replace(x, admission=lim) if x.key == v.key else x
                                                 for x in CFG.vips)))
    a = ipaddress.ip_address(src)
    with one_cpu():
        for port in (41001, 41002):
            assert lb.run(explain.frame(explain.Probe(a, port, v.address, v.port, TCP_, syn=True), LB_MAC)).retval == 3
        third = explain.Probe(a, 41003, v.address, v.port, TCP_, syn=True)
        before = written_state(lb.maps)
        t0 = time.monotonic()
        e = dry.explain(third)
        got = lb.run(explain.frame(third, LB_MAC)).retval   # within the second a token takes to come back
        assert time.monotonic() - t0 < 0.9, "too slow to compare within one token's time"
        other = dry.explain(dataclasses.replace(third, src=a + (1 << 64 if a.version == 6 else 1)))
        after = written_state(lb.maps)
        assert (e.verdict, e.reason) == ("drop", abi.Reason.DROP_SRC_RATE)
        assert got == 1
        assert (other.verdict, other.reason) == ("tx", abi.Reason.TX_FORWARD)
        lim = (abi.Map.SRC_LIMIT, abi.Map.SRC_LIMIT4)   # a refused SYN takes no token: unchanged
        assert [after[n] for n in lim] == [before[n] for n in lim], "explain wrote a live bucket"


def test_parse_probe_forms() -> None:
    a = explain.parse_probe("10.0.0.5:40000 -> 10.112.0.10:80/tcp", syn=True)
    b = explain.parse_probe("10.0.0.5:40000 10.112.0.10:80/tcp", syn=True)
    c = explain.parse_probe("[fd00::5]:1234->[fd00::10]:53/udp")
    assert a == b and a.sport == 40000 and a.syn and c.protocol is UDP_ and c.sport == 1234
    assert explain.parse_probe("10.0.0.5 -> 10.112.0.10:80/tcp").sport == 40000
    for bad in ("10.0.0.5", "10.0.0.5 -> 10.1.1.1:80", "10.0.0.5 -> [fd00::1]:80/tcp", "x -> 10.1.1.1:80/tcp"):
        with pytest.raises(ValueError):
            explain.parse_probe(bad)


# --- trace: the -DLBX_TRACE build's events ------------------------------------------------------------

@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Lb, "trace.Ring"]]:
    """The trace build (-DLBX_TRACE) in its own pin dir, filled with CFG, and its ring's reader.
    Module scope; the program unloaded and the pins removed after."""
    from .conftest import compiled
    with compiled(defines=(trace.DEFINE,)) as prog:
        lb = Lb(prog)
        lb.apply(CFG)
        yield lb, trace.Ring(prog)


def test_trace_shows_a_flows_packets_with_their_reasons(traced: tuple[Lb, "trace.Ring"], tmp_path) -> None:
    lb, ring = traced
    ring.poll(0)   # nothing left from before
    p = explain.Probe(ipaddress.ip_address("100.64.7.7"), 42000, MAG4.address, MAG4.port, TCP_, syn=True)
    frames = [explain.frame(p, LB_MAC), explain.frame(dataclasses.replace(p, syn=False), LB_MAC),
              explain.frame(dataclasses.replace(p, dst=ipaddress.ip_address("198.51.100.7")), LB_MAC),
              explain.frame(p, LB_MAC)[:20]]
    outs = [lb.run(f) for f in frames]
    events = ring.poll(100)
    assert [(e.verdict, e.reason) for e in events] == [
        ("tx", abi.Reason.TX_FORWARD), ("tx", abi.Reason.TX_FORWARD), ("pass", abi.Reason.PASS_NOT_VIP),
        ("pass", abi.Reason.PASS_TRUNCATED)]
    first = events[0]
    assert (first.src, first.sport, first.dst, first.dport, first.protocol) == (p.src, 42000, MAG4.address, 443, "tcp")
    assert first.vip == MAG4.name and first.backend == events[1].backend
    assert first.backend in {b.name for b in MAG4.backends}
    # the DSR output went to that backend's MAC
    be = next(b for b in MAG4.backends if b.name == first.backend)
    assert outs[0].data[:6] == bytes.fromhex(be.mac.replace(":", ""))
    # the head is the frame as it arrived, not as it left
    assert first.head == frames[0][:128] and first.frame_len == len(frames[0])
    assert events[2].vip is None and events[2].backend is None
    assert ring.lost() == 0
    # filters
    only = trace.Filter(vip=MAG4.key, reasons=frozenset({abi.Reason.TX_FORWARD}))
    assert [only.match(e) for e in events] == [True, True, False, False]
    assert [trace.Filter(src=ipaddress.ip_network("100.64.0.0/16")).match(e) for e in events][:3] == [True] * 3
    # pcap: scapy reads back the frames as they arrived
    from scapy.utils import rdpcap
    path = tmp_path / "t.pcap"
    with open(path, "wb") as f:
        w = trace.PcapWriter(f)
        for e in events:
            w.write(e)
    pkts = rdpcap(str(path))
    assert [bytes(x) for x in pkts][:3] == frames[:3]
    assert pkts[0].wirelen == len(frames[0])


def test_trace_build_forwards_like_the_normal_build(traced: tuple[Lb, "trace.Ring"], lbx: Lb) -> None:
    """The hooks only observe: the same frames get the same verdicts and output frames."""
    lb, ring = traced
    for p in probes(MAG4, 200, seed=5) + probes(WEB6, 200, seed=6):
        a, b = lb.run(explain.frame(p, LB_MAC)), lbx.run(explain.frame(p, LB_MAC))
        assert (a.retval, a.data) == (b.retval, b.data), p.name
    assert len(ring.poll(100)) == 400


@pytest.mark.parametrize("weight", [None, 3], ids=["remove", "set-weight 3"])
def test_preview_predicts_what_the_change_moves(lbx: Lb, weight: int | None) -> None:
    from lbxdp import applied
    from .frames import with_backends
    for p in probes(MAG4, 400, seed=9):          # recorded flows of the VIP
        lbx.run(explain.frame(dataclasses.replace(p, syn=False), LB_MAC))
    target = MAG4.backends[1]
    pv = explain.preview(lbx.maps, applied.State(cfg=CFG), MAG4.key, (target.address, target.port), weight, 0.0)
    vid = lbx.vip_id(MAG4)
    gone = lbx.backend_id(MAG4, target)
    old = lbx.maps.table(vid)
    flows = [e for e in lbx.maps.flow_entries() if e.vip == MAG4.name]
    bes = tuple(dataclasses.replace(b, weight=weight) if b == target else b for b in MAG4.backends) \
        if weight is not None else tuple(b for b in MAG4.backends if b != target)
    lbx.apply(with_backends(CFG, MAG4, bes))
    new = lbx.maps.table(vid)
    assert (pv.slots, pv.slots_moved) == (len(old), sum(1 for a, b in zip(old, new) if a != b))
    assert 0 < pv.slots_moved < len(old)
    moved = [e for e in flows if old[explain.flow_hash(explain.Probe(e.src, e.sport, e.dst, e.dport, e.protocol)) % 251]
             != new[explain.flow_hash(explain.Probe(e.src, e.sport, e.dst, e.dport, e.protocol)) % 251]
             or (weight is None and e.backend_id == gone)]
    assert (pv.flows, pv.flows_moved) == (len(flows), len(moved))
    assert pv.flows_lost == (sum(1 for e in flows if e.backend_id == gone) if weight is None else 0)
    assert pv.to_json()["slot_share"] == round(pv.slots_moved / pv.slots, 6)
