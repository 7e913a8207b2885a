"""QUIC connection-ID routing (bpf/quic.h, issue 13) through the real program (BPF_PROG_TEST_RUN).

A QUIC VIP's backends have server ids; a server puts its id in bytes 1-2 of every connection ID
it issues. Crafted QUIC frames, v1 (RFC 9000) and v2 (RFC 9369, whose long-header types are
renumbered), from new source ports (a client that migrated): Handshake and short-header packets
reach the backend their id names; Initial and 0-RTT go by the VIP's table; Retry, unknown
versions, short connection IDs, unknown and down ids fall back to the table; each case is counted
in lbx_quic_stats (abi.QuicReason) and per VIP in lbx_quic_vip. A packet routed by id is not
recorded: a migrated connection's every packet goes by its id.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import pytest
from scapy.layers.l2 import Ether

from lbxdp import abi, model
from lbxdp.balancer import Runtime

from .frames import BASE, UDP_, XDP_TX, backends, plus, udp, vip

Q = abi.QuicReason
V1, V2 = abi.QUIC_V1, abi.QUIC_V2
# long-header type bits by version: v1 Initial 0, 0-RTT 1, Handshake 2, Retry 3; v2 Retry 0,
# Initial 1, 0-RTT 2, Handshake 3
TYPES = {V1: {"initial": 0, "0rtt": 1, "handshake": 2, "retry": 3},
         V2: {"initial": 1, "0rtt": 2, "handshake": 3, "retry": 0}}


def _quic_vip(addr: str, prefix: str, tag: int) -> model.Vip:
    bes = tuple(dataclasses.replace(b, server_id=sid)
                for b, sid in zip(backends(prefix, 4, tag, port=443), (0x0101, 0x0202, 0x0303, 0x0404)))
    return dataclasses.replace(vip(addr, 443, UDP_, bes, model.Scheduler.MAGLEV), table_size=4099, quic=True)


QUIC4 = _quic_vip("10.10.0.40", "10.10.40.", 0x40)
QUIC6 = _quic_vip("fd10::40", "fd10:40::", 0x41)
VIPS = {"v4": QUIC4, "v6": QUIC6}
_ports = itertools.count(20000)


def dcid(sid: int, n: int = 8) -> bytes:
    """A connection ID a server with this id issued: byte 0 its own, bytes 1-2 the id."""
    return bytes([0x5a, sid >> 8, sid & 0xff]) + bytes(range(3, n))


def long_hdr(version: int, kind: str, cid: bytes) -> bytes:
    first = 0xc0 | TYPES[version][kind] << 4 if version in TYPES else 0xc0
    return bytes([first]) + version.to_bytes(4, "big") + bytes([len(cid)]) + cid + bytes([4]) + b"scid" + bytes(40)


def short_hdr(cid: bytes) -> bytes:
    return bytes([0x41]) + cid + bytes(30)


def send(lb, v: model.Vip, payload: bytes, sport: int | None = None) -> model.Backend:
    """One datagram from a new source port; the backend it reached."""
    out = lb.run(udp(str(v.address), 443, next(_ports) if sport is None else sport, payload=payload))
    assert out.retval == XDP_TX, f"verdict {out.retval}"
    dst = Ether(out.data).dst
    [be] = [b for b in v.backends if b.mac == dst]
    return be


def stats_delta(lb, before: dict) -> dict:
    after = lb.maps.quic_stats()
    return {r: after[r] - before[r] for r in after if after[r] != before[r]}


@pytest.fixture
def qlb(lb):
    lb.apply(plus(BASE, QUIC4, QUIC6))
    return lb


@pytest.mark.root
@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("version", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("kind", ["handshake", "short"])
def test_known_id_reaches_its_backend_from_any_port(qlb, fam, version, kind):
    v = VIPS[fam]
    before = qlb.maps.quic_stats()
    for b in v.backends:
        for _ in range(10):
            pay = long_hdr(version, "handshake", dcid(b.server_id)) if kind == "handshake" else short_hdr(dcid(b.server_id))
            assert send(qlb, v, pay) == b
    assert stats_delta(qlb, before) == {Q.BY_ID: 40}


@pytest.mark.root
@pytest.mark.parametrize("version", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("kind", ["initial", "0rtt"])
def test_initial_and_0rtt_go_by_the_table(qlb, version, kind):
    """Every DCID names backend 0x0202, yet the table spreads them (the id is not read)."""
    before = qlb.maps.quic_stats()
    got = Counter(send(qlb, QUIC4, long_hdr(version, kind, dcid(0x0202))) for _ in range(200))
    assert len(got) == 4 and max(got.values()) < 120, got
    assert stats_delta(qlb, before) == {Q.INITIAL: 200}


@pytest.mark.root
def test_v1_type_bits_are_not_read_as_v2(qlb):
    """The same first byte means Handshake in v1 and 0-RTT in v2 (type 2): the version decides."""
    before = qlb.maps.quic_stats()
    assert send(qlb, QUIC4, long_hdr(V1, "handshake", dcid(0x0303))) == QUIC4.backends[2]
    pay = bytearray(long_hdr(V1, "handshake", dcid(0x0303)))
    pay[1:5] = V2.to_bytes(4, "big")            # type bits 2 under v2: 0-RTT, by the table
    got = Counter(send(qlb, QUIC4, bytes(pay)) for _ in range(100))
    assert len(got) > 1
    assert stats_delta(qlb, before) == {Q.BY_ID: 1, Q.INITIAL: 100}


@pytest.mark.root
@pytest.mark.parametrize("version", [V1, V2], ids=["v1", "v2"])
def test_retry_and_unknown_versions_fall_back(qlb, version):
    before = qlb.maps.quic_stats()
    got = Counter(send(qlb, QUIC4, long_hdr(version, "retry", dcid(0x0101))) for _ in range(100))
    got += Counter(send(qlb, QUIC4, long_hdr(0xff00001d, "handshake", dcid(0x0101))) for _ in range(100))
    got += Counter(send(qlb, QUIC4, long_hdr(0, "handshake", dcid(0x0101))) for _ in range(100))  # negotiation
    assert len(got) == 4, got
    assert stats_delta(qlb, before) == {Q.OTHER: 300}


@pytest.mark.root
@pytest.mark.parametrize("version", [V1, V2], ids=["v1", "v2"])
def test_unknown_id_falls_back_to_the_table(qlb, version):
    before = qlb.maps.quic_stats()
    got = Counter(send(qlb, QUIC4, short_hdr(dcid(0x0999))) for _ in range(100))
    got += Counter(send(qlb, QUIC4, long_hdr(version, "handshake", dcid(0))) for _ in range(100))
    # QUIC6's id 0x0101 is another VIP's: unknown here
    got += Counter(send(qlb, QUIC4, short_hdr(dcid(0x0101).replace(b"\x01\x01", b"\x01\x02", 1))) for _ in range(1))
    assert len(got) == 4, got
    assert stats_delta(qlb, before) == {Q.UNKNOWN_ID: 201}


@pytest.mark.root
def test_short_connection_ids_fall_back(qlb):
    before = qlb.maps.quic_stats()
    got = Counter(send(qlb, QUIC4, long_hdr(V1, "handshake", dcid(0x0101)[:2])) for _ in range(50))
    got += Counter(send(qlb, QUIC4, bytes([0x41, 0x5a, 0x01])) for _ in range(50))   # 2 DCID bytes left
    assert len(got) == 4, got
    assert stats_delta(qlb, before) == {Q.SHORT_CID: 100}


@pytest.mark.root
@pytest.mark.parametrize("version", [V1, V2], ids=["v1", "v2"])
def test_down_id_falls_back_and_comes_back(qlb, version):
    down = QUIC4.backends[1]
    qlb.apply(plus(BASE, QUIC4, QUIC6), Runtime(down=frozenset({QUIC4.id_of(down)})))
    before = qlb.maps.quic_stats()
    got = Counter(send(qlb, QUIC4, short_hdr(dcid(down.server_id))) for _ in range(60))
    got += Counter(send(qlb, QUIC4, long_hdr(version, "handshake", dcid(down.server_id))) for _ in range(60))
    assert down not in got and len(got) == 3, got
    assert stats_delta(qlb, before) == {Q.DOWN_ID: 120}
    qlb.apply(plus(BASE, QUIC4, QUIC6))
    assert send(qlb, QUIC4, short_hdr(dcid(down.server_id))) == down


def flows_of(lb, sport: int) -> int:
    """Connection-table entries from this source port (the tests' ports are their own)."""
    import socket
    return sum(1 for k in lb.maps.flow_map.keys() if k.sport == socket.htons(sport))


@pytest.mark.root
def test_a_routed_tuple_is_not_recorded(qlb):
    """A packet routed by id records nothing (no LRU insert, bpf/quic.h): each packet of the tuple
    goes by the id it carries again, counted each time, and the VIP counts no new flow."""
    before = qlb.maps.quic_stats()
    vid = qlb.vip_id(QUIC4)
    flows_before = qlb.maps.vip_stats(vid).new_flows
    b = QUIC4.backends[3]
    for _ in range(3):
        assert send(qlb, QUIC4, short_hdr(dcid(b.server_id)), sport=40001) == b
    assert send(qlb, QUIC4, long_hdr(V2, "handshake", dcid(b.server_id)), sport=40001) == b
    assert flows_of(qlb, 40001) == 0
    # the id, not a record, decides: another id on the same tuple reaches its own backend
    assert send(qlb, QUIC4, short_hdr(dcid(QUIC4.backends[0].server_id)), sport=40001) == QUIC4.backends[0]
    assert stats_delta(qlb, before) == {Q.BY_ID: 5}
    assert qlb.maps.vip_stats(vid).new_flows == flows_before


@pytest.mark.root
def test_a_recorded_tuple_stays_established(qlb):
    """A tuple the table recorded (its Initial, then a second datagram: the half-open entry of a
    VIP whose table just changed) keeps its backend; its short-header packets read no id."""
    sport = 40002
    first = send(qlb, QUIC4, long_hdr(V1, "initial", dcid(0x0101)), sport=sport)
    assert send(qlb, QUIC4, long_hdr(V1, "initial", dcid(0x0101)), sport=sport) == first
    assert flows_of(qlb, sport) == 1
    other = next(b for b in QUIC4.backends if b != first)
    before = qlb.maps.quic_stats()
    assert send(qlb, QUIC4, short_hdr(dcid(other.server_id)), sport=sport) == first
    assert stats_delta(qlb, before) == {}


@pytest.mark.root
def test_counters_per_vip(qlb):
    """lbx_quic_vip counts each QUIC VIP's packets apart; the program-wide counts are their sum."""
    v4, v6 = qlb.vip_id(QUIC4), qlb.vip_id(QUIC6)
    before, per_before = qlb.maps.quic_stats(), qlb.maps.quic_vip_stats([v4, v6])
    for _ in range(7):
        send(qlb, QUIC4, short_hdr(dcid(0x0202)))
    for _ in range(3):
        send(qlb, QUIC4, long_hdr(V1, "initial", dcid(0x0202)))
    for _ in range(5):
        send(qlb, QUIC6, short_hdr(dcid(0x0999)))
    per = qlb.maps.quic_vip_stats([v4, v6])
    d = {vid: {r: per[vid][r] - per_before[vid][r] for r in per[vid] if per[vid][r] != per_before[vid][r]}
         for vid in per}
    assert d == {v4: {Q.BY_ID: 7, Q.INITIAL: 3}, v6: {Q.UNKNOWN_ID: 5}}
    assert stats_delta(qlb, before) == {Q.BY_ID: 7, Q.INITIAL: 3, Q.UNKNOWN_ID: 5}


@pytest.mark.root
def test_a_reused_vip_id_starts_from_zero(qlb):
    vid = qlb.vip_id(QUIC4)
    send(qlb, QUIC4, short_hdr(dcid(0x0202)))
    assert qlb.maps.quic_vip_stats([vid])[vid][Q.BY_ID] > 0
    qlb.maps.reset_vip_counters(vid)
    assert not any(qlb.maps.quic_vip_stats([vid])[vid].values())


@pytest.mark.root
def test_a_vip_without_quic_reads_no_ids(qlb):
    plain = dataclasses.replace(QUIC4, quic=False, backends=tuple(dataclasses.replace(b, server_id=0)
                                                                  for b in QUIC4.backends))
    qlb.apply(plus(BASE, plain, QUIC6))
    before = qlb.maps.quic_stats()
    got = Counter(send(qlb, plain, short_hdr(dcid(0x0101))) for _ in range(100))
    assert len(got) == 4 and not stats_delta(qlb, before)
    assert not any(k[0] == qlb.vip_id(plain) for k in qlb.maps.quic_ids())


@pytest.mark.root
def test_a_changed_server_id_moves_the_map_entry(qlb):
    bes = list(QUIC4.backends)
    bes[0] = dataclasses.replace(bes[0], server_id=0x0777)
    v = dataclasses.replace(QUIC4, backends=tuple(bes))
    qlb.apply(plus(BASE, v, QUIC6))
    vid = qlb.vip_id(v)
    assert sorted(s for (i, s) in qlb.maps.quic_ids() if i == vid) == [0x0202, 0x0303, 0x0404, 0x0777]
    sids = qlb.maps.quic_sids()         # the direct slots follow: 0x0777 added, 0x0101 now QUIC6's alone
    assert sids[0x0777][:2] == (vid, qlb.backend_id(v, bes[0]))
    assert sids[0x0101][0] == qlb.vip_id(QUIC6)
    assert send(qlb, v, short_hdr(dcid(0x0777))) == bes[0]
    before = qlb.maps.quic_stats()
    send(qlb, v, short_hdr(dcid(0x0101)))
    assert stats_delta(qlb, before) == {Q.UNKNOWN_ID: 1}


@pytest.mark.root
def test_an_id_two_vips_use_is_direct_for_one_and_hashed_for_the_other(qlb):
    """QUIC4 and QUIC6 use the same four ids: lbx_quic_sid holds the lower VIP id's entries (an
    inlined array lookup), the other VIP's packets find theirs in lbx_quic_ids; both reach their
    own backend, and a down backend's flag is in both maps."""
    v4, v6 = qlb.vip_id(QUIC4), qlb.vip_id(QUIC6)
    lo, hi = (QUIC4, QUIC6) if v4 < v6 else (QUIC6, QUIC4)
    sids = qlb.maps.quic_sids()
    assert sorted(sids) == [0x0101, 0x0202, 0x0303, 0x0404]
    assert {sids[b.server_id][:2] for b in lo.backends} == {(qlb.vip_id(lo), qlb.backend_id(lo, b)) for b in lo.backends}
    for v in (lo, hi):
        for b in v.backends:
            assert send(qlb, v, short_hdr(dcid(b.server_id))) == b
    down = lo.backends[2]
    qlb.apply(plus(BASE, QUIC4, QUIC6), Runtime(down=frozenset({lo.id_of(down)})))
    assert qlb.maps.quic_sids()[down.server_id][3] == abi.QUIC_F_DOWN
    before = qlb.maps.quic_stats()
    assert send(qlb, lo, short_hdr(dcid(down.server_id))) != down
    assert send(qlb, hi, short_hdr(dcid(down.server_id))) == hi.backends[2]
    assert stats_delta(qlb, before) == {Q.DOWN_ID: 1, Q.BY_ID: 1}
    # the lower VIP loses QUIC: its slots go to the other VIP
    plain = dataclasses.replace(lo, quic=False, backends=tuple(dataclasses.replace(b, server_id=0) for b in lo.backends))
    qlb.apply(plus(BASE, plain, hi))
    assert {s: e[0] for s, e in qlb.maps.quic_sids().items()} == {b.server_id: qlb.vip_id(hi) for b in hi.backends}
    for b in hi.backends:
        assert send(qlb, hi, short_hdr(dcid(b.server_id))) == b


@pytest.mark.root
def test_status_reads_quic_and_overflows_per_vip_from_the_maps(qlb):
    """What `lbxdp status` and the exporter show per VIP (lbxdp.view.read_vip_extras), read from the
    real program's maps after real packets: each QUIC VIP's own counts, and the backup overflows
    of a capped VIP with a backup (a VIP with neither has no entry)."""
    from lbxdp import view
    from .frames import TCP_, backends, tcp, vip
    p1, bk = backends("10.10.42.", 2, 0x42)
    capped = dataclasses.replace(vip("10.10.0.42", 80, TCP_, (dataclasses.replace(p1, max_conns=5),
                                                              dataclasses.replace(bk, backup=True, max_conns=5)),
                                     model.Scheduler.MAGLEV), table_size=4099)
    qlb.apply(plus(BASE, QUIC4, QUIC6, capped))
    for i in range(8):                       # 5 fill the primary, 3 overflow to the backup
        qlb.open(tcp("10.10.0.42", 80, 43000 + i))
    for _ in range(4):
        send(qlb, QUIC6, short_hdr(dcid(0x0303)))
    send(qlb, QUIC6, long_hdr(V2, "initial", dcid(0x0303)))
    quic, over = view.read_vip_extras(qlb.maps, qlb.maps.vip_views())
    v6, cid = qlb.vip_id(QUIC6), qlb.vip_id(capped)
    assert set(quic) == {qlb.vip_id(QUIC4), v6}
    got6 = {r: n for r, n in quic[v6] if n}
    assert got6[Q.BY_ID] >= 4 and got6[Q.INITIAL] >= 1
    assert sum(got6.values()) == sum(qlb.maps.quic_vip_stats([v6])[v6].values())
    assert over == {cid: 3}
    st = view._vip(next(x for x in qlb.maps.vip_views() if x.id == cid), view._Told(view.applied.State(), {}), {},
                   quic=quic, overflows=over)
    assert st.backup_overflows == 3 and st.quic is None
    assert st.lines() == ["backup overflows: 3 new flows sent to a backup (every primary full)"]


def _paths(*vips: model.Vip) -> list[str]:
    return [p.path for p in model.Config(vips=vips).problems()]


def test_config_validation():
    dup = dataclasses.replace(QUIC4, backends=tuple(dataclasses.replace(b, server_id=5) for b in QUIC4.backends))
    assert any(p.endswith("backend[1].server_id") for p in _paths(dup))
    assert any(p.endswith(".quic") for p in _paths(dataclasses.replace(QUIC4, protocol=model.Protocol.TCP)))
    assert any(p.endswith("server_id") for p in _paths(dataclasses.replace(QUIC4, quic=False)))
    big = dataclasses.replace(QUIC4, backends=(dataclasses.replace(QUIC4.backends[0], server_id=70000),))
    assert any(p.endswith("server_id") for p in _paths(big))
    assert any(p.endswith(".quic") for p in _paths(dataclasses.replace(QUIC4, mode=model.Mode.NAT)))
    assert not _paths(QUIC4, QUIC6)


def test_config_file_keys_round_trip():
    from lbxdp import config
    text = ('[[vip]]\naddress = "10.0.0.1"\nport = 443\nprotocol = "udp"\nquic = true\n'
            '[[vip.backend]]\naddress = "10.0.1.1"\nmac = "02:00:00:00:00:11"\nserver_id = 7\n'
            '[[vip.backend]]\naddress = "10.0.1.2"\nmac = "02:00:00:00:00:12"\nserver_id = 8\n')
    cfg = config.parse(text)
    assert cfg.vips[0].quic and [b.server_id for b in cfg.vips[0].backends] == [7, 8]
    assert config.parse(config.dump(cfg)) == cfg
    with pytest.raises(Exception, match="unique per VIP"):
        config.parse(text.replace("server_id = 8", "server_id = 7"))
