"""Forwarding by encapsulation (mode ipip / gue, bpf/encap.h): exact frames for every variant.

Expected outer headers are built with scapy (IP()/IP(), IPv6()/IPv6(), IPv6()/IP(), IP()/UDP()/IP(),
IPv6()/UDP()/IPv6(), ...), which computes lengths and checksums itself: a frame equal to scapy's
has valid outer checksums. The flow hash that picks the GUE source port, the IPv6 flow label and a
flow-derived source is bpf/select.h's flow_hash(), re-implemented below.
Set up through the real control plane: Balancer.apply (encap fields from the model) and
Maps.set_own_addresses (what control.apply writes from [balancer] or the interface).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from lbxdp import abi, model
from lbxdp.maps import OwnAddresses

from .frames import BASE, CLIENT4, CLIENT6, CLIENT_MAC, LB_MAC, TCP_, UDP_, XDP_DROP, XDP_TX, ip, plus, tcp, udp
from .harness import Case, Lb, check

pytestmark = pytest.mark.root

OWN = OwnAddresses(ipaddress.IPv4Address("10.20.255.1"), ipaddress.IPv6Address("fd20::ff:1"),
                   ipaddress.IPv4Network("172.16.0.0/16"), ipaddress.IPv6Network("fd20:f::/64"))
Mode, Src = model.Mode, model.EncapSource


def evip(addr: str, port: int, proto: model.Protocol, mode: model.Mode, be: str, tag: int, **kw) -> model.Vip:
    b = model.Backend(ip(be), port, mac=f"02:be:20:00:00:{tag:02x}")
    return model.Vip(ip(addr), port, proto, mode, model.Scheduler.RR, (b,), **kw)


IPIP4 = evip("10.20.0.1", 80, TCP_, Mode.IPIP, "10.20.1.1", 1)
IPIP6 = evip("fd20::1", 80, TCP_, Mode.IPIP, "fd20:1::1", 2)
IPIP46 = evip("10.20.0.2", 80, TCP_, Mode.IPIP, "fd20:2::1", 3)
GUE4 = evip("10.20.0.3", 53, UDP_, Mode.GUE, "10.20.3.1", 4)
GUE6 = evip("fd20::3", 80, TCP_, Mode.GUE, "fd20:3::1", 5, gue_port=7777)
GUE46 = evip("10.20.0.4", 80, TCP_, Mode.GUE, "fd20:4::1", 6)
FLOW4 = evip("10.20.0.5", 80, TCP_, Mode.IPIP, "10.20.5.1", 7, ipip_source=Src.FLOW)
FLOW6 = evip("fd20::5", 80, TCP_, Mode.IPIP, "fd20:5::1", 8, ipip_source=Src.FLOW)
MTU4 = evip("10.20.0.6", 80, TCP_, Mode.IPIP, "10.20.6.1", 9, mtu=1400, mss_clamp=True)
MTU6 = evip("fd20::6", 80, TCP_, Mode.GUE, "fd20:6::1", 10, mtu=1400, mss_clamp=True)
MTU4U = evip("10.20.0.6", 53, UDP_, Mode.GUE, "fd20:6::2", 11, mtu=1400)
CFG = dataclasses.replace(plus(BASE, IPIP4, IPIP6, IPIP46, GUE4, GUE6, GUE46, FLOW4, FLOW6, MTU4, MTU6, MTU4U),
                          balancer=model.BalancerOptions(flow_source_v4=OWN.flow_v4, flow_source_v6=OWN.flow_v6))


@pytest.fixture
def elb(lb: Lb) -> Lb:
    mine = dataclasses.replace(CFG, vips=CFG.vips[len(BASE.vips):])   # BASE bends the dsr port rule
    assert not mine.problems(), mine.problems()
    lb.apply(CFG)
    lb.maps.set_own_addresses(OWN)
    yield lb
    lb.maps.set_own_addresses(OwnAddresses())


# --- bpf/select.h's flow_hash(), over the words as the CPU loads them ------------------------------
def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _words(addr: str) -> tuple[int, ...]:
    return struct.unpack("<4I", ipaddress.ip_address(addr).packed.ljust(16, b"\0"))


def _raw16(port: int) -> int:
    return struct.unpack("<H", struct.pack("!H", port))[0]


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int) -> int:
    h = _mix32(((_raw16(sport) << 16) | _raw16(dport)) ^ (proto << 8))
    for s, d in zip(_words(src), _words(dst)):
        h = (_mix32(h ^ s) + d) & 0xFFFFFFFF
    return _mix32(h)


def _hash_of(pkt) -> int:
    l3 = pkt[IP] if IP in pkt else pkt[IPv6]
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    return flow_hash(l3.src, l3.dst, l4.sport, l4.dport, 6 if TCP in pkt else 17)


def flow_source(h: int, family: int) -> str:
    """What outer_source() derives from OWN's prefixes."""
    if family == 4:
        net = struct.unpack("<I", OWN.flow_v4.network_address.packed)[0]
        mask = struct.unpack("<I", OWN.flow_v4.netmask.packed)[0]
        return str(ipaddress.IPv4Address(struct.pack("<I", net | (h & ~mask & 0xFFFFFFFF))))
    w0, w1 = struct.unpack("<2I", OWN.flow_v6.network_address.packed[:8])
    return str(ipaddress.IPv6Address(struct.pack("<4I", w0, w1, h, _mix32(h ^ 0x5BD1E995))))


# --- expected frames ---------------------------------------------------------------------------
def encapsulated(pkt, v: model.Vip, src: str | None = None, vlan: int | None = None) -> bytes:
    """pkt as encap.h sends it to v's (only) backend: the inner IP packet untouched behind an
    outer header built by scapy (lengths and checksums scapy's own)."""
    b = v.backends[0]
    inner = pkt[IP] if IP in pkt else pkt[IPv6]
    raw = bytes(inner)
    tos = inner.tos if IP in pkt else inner.tc
    h = _hash_of(pkt)
    if src is None:
        src = str(OWN.v4 if b.address.version == 4 else OWN.v6)
    if b.address.version == 4:
        outer = IP(src=src, dst=str(b.address), tos=tos, ttl=64, id=inner.id, flags=inner.flags & 2,
                   proto=17 if v.mode is Mode.GUE else 4)
    else:
        outer = IPv6(src=src, dst=str(b.address), tc=tos, hlim=64, fl=h & 0xFFFFF,
                     nh=17 if v.mode is Mode.GUE else (4 if IP in pkt else 41))
    if v.mode is Mode.GUE:
        outer = outer / UDP(sport=0xC000 | (h & 0x3FFF), dport=v.gue_port)
    eth = Ether(dst=b.mac, src=LB_MAC, type=0x0800 if b.address.version == 4 else 0x86DD)
    if vlan is not None:
        eth = Ether(dst=b.mac, src=LB_MAC) / Dot1Q(vlan=vlan)
    return bytes(eth / outer / Raw(raw))


def _row(desc: str, pkt, v: model.Vip, **kw) -> Case:
    return Case(desc, pkt, XDP_TX, encapsulated(pkt, v, **kw))


ROWS = [
    _row("ipip: v4 VIP to a v4 backend (IPIP), TOS copied, DF and id copied",
         tcp("10.20.0.1", 80, 40001, tos=0x2e, flags="S", id=4242) , IPIP4),
    _row("ipip: v4 without DF keeps it clear", tcp("10.20.0.1", 80, 40002, flags="A", payload=b"x" * 33), IPIP4),
    _row("ipip: v6 VIP to a v6 backend (IP6IP6), traffic class copied, flow label from the hash",
         tcp("fd20::1", 80, 40003, tc=0xb8), IPIP6),
    _row("ipip: v4 VIP to a v6 backend (4-in-6)", tcp("10.20.0.2", 80, 40004, tos=0x10), IPIP46),
    _row("gue: v4 in v4 over UDP 6080, UDP checksum over the inner datagram",
         udp("10.20.0.3", 53, 40005, payload=b"what is the answer"), GUE4),
    _row("gue: odd-length inner payload", udp("10.20.0.3", 53, 40006, payload=b"abc"), GUE4),
    _row("gue: v6 in v6 on the VIP's gue_port (7777)", tcp("fd20::3", 80, 40007, payload=b"hello"), GUE6),
    _row("gue: v4 in v6 (4-in-6 GUE)", tcp("10.20.0.4", 80, 40008, tos=0x04, payload=b"hi"), GUE46),
    _row("ipip, ipip_source=flow: v4 source from 172.16.0.0/16 and the flow hash",
         tcp("10.20.0.5", 80, 40009), FLOW4,
         src=flow_source(flow_hash(CLIENT4, "10.20.0.5", 40009, 80, 6), 4)),
    _row("ipip, ipip_source=flow: v6 source from fd20:f::/64 and the flow hash",
         tcp("fd20::5", 80, 40010), FLOW6,
         src=flow_source(flow_hash(CLIENT6, "fd20::5", 40010, 80, 6), 6)),
    _row("a VLAN tag stays on the encapsulated frame", tcp("10.20.0.1", 80, 40011, vlan=7), IPIP4, vlan=7),
]


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.desc)
def test_encap_rows(elb: Lb, case: Case) -> None:
    check(elb, case)


def test_outer_checksums_are_what_scapy_computes(elb: Lb) -> None:
    """Stated directly (the rows imply it): scapy recomputes every outer checksum of the
    program's output and finds the one the program wrote; outer TTL / hop limit 64."""
    for pkt in (udp("10.20.0.3", 53, 41000, payload=b"q" * 101), tcp("fd20::3", 80, 41001, payload=b"z" * 7),
                tcp("10.20.0.4", 80, 41002, payload=b"y" * 300), tcp("10.20.0.1", 80, 41003)):
        out = Ether(elb.run(pkt).data)
        outer = out.payload
        assert (outer.ttl if isinstance(outer, IP) else outer.hlim) == 64
        fields = [(outer, "chksum")] if isinstance(outer, IP) else []
        if isinstance(outer.payload, UDP):
            fields.append((outer.payload, "chksum"))
        for layer, name in fields:
            got = getattr(layer, name)
            setattr(layer, name, None)
            again = Ether(bytes(out))
            setattr(layer, name, got)
            assert got == getattr(again.getlayer(type(layer)), name), f"{type(layer).__name__} checksum of {pkt.summary()}"


def test_padding_after_the_inner_packet_is_cut(elb: Lb) -> None:
    pkt = tcp("10.20.0.1", 80, 40012)
    check(elb, Case("padding cut", bytes(pkt) + bytes(6), XDP_TX, encapsulated(pkt, IPIP4)))


def test_gue_inner_udp_without_checksum_gets_none_outside(elb: Lb) -> None:
    pkt = udp("10.20.0.3", 53, 40013, payload=b"nocsum")
    pkt[UDP].chksum = 0
    want = Ether(encapsulated(pkt, GUE4))
    want[UDP].chksum = 0    # the outer one (the first UDP layer)
    check(elb, Case("inner UDP checksum 0 -> outer 0", pkt, XDP_TX, bytes(want)))


def test_no_own_address_drops(elb: Lb) -> None:
    elb.maps.set_own_addresses(OwnAddresses())
    check(elb, Case("no own v4 address", tcp("10.20.0.1", 80, 40014), XDP_DROP,
                    reason=abi.Reason.DROP_NO_OWN_ADDR))


def test_flows_spread_over_gue_ports_flow_labels_and_flow_sources(elb: Lb) -> None:
    """What RSS and ECMP receivers key on differs between flows: 200 client flows give (nearly)
    200 GUE source ports, IPv6 flow labels and flow-derived sources."""
    ports, labels, sources4, sources6 = set(), set(), set(), set()
    for i in range(200):
        ports.add(Ether(elb.run(udp("10.20.0.3", 53, 20000 + i)).data)[UDP].sport)
        labels.add(Ether(elb.run(tcp("fd20::1", 80, 20000 + i)).data)[IPv6].fl)
        sources4.add(Ether(elb.run(tcp("10.20.0.5", 80, 20000 + i)).data)[IP].src)
        sources6.add(Ether(elb.run(tcp("fd20::5", 80, 20000 + i)).data)[IPv6].src)
    assert all(0xC000 <= p <= 0xFFFF for p in ports)
    assert all(ipaddress.ip_address(s) in OWN.flow_v4 for s in sources4)
    assert all(ipaddress.ip_address(s) in OWN.flow_v6 for s in sources6)
    for name, seen in (("ports", ports), ("labels", labels), ("v4 sources", sources4), ("v6 sources", sources6)):
        assert len(seen) >= 190, f"200 flows gave only {len(seen)} distinct {name}"


def test_established_flow_keeps_its_encap(elb: Lb) -> None:
    """The mode is on the backend entry: the second packet of a flow (connection table) is
    encapsulated the same way."""
    check(elb, _row("syn", tcp("10.20.0.2", 80, 40015), IPIP46))
    check(elb, _row("ack of the same flow", tcp("10.20.0.2", 80, 40015, flags="A", payload=b"data"), IPIP46))


# --- oversize: ICMP back to the client ---------------------------------------------------------------
def too_big4(pkt, mtu: int) -> bytes:
    quote = bytes(pkt[IP])[:abi.ICMP4_QUOTE]
    return bytes(Ether(dst=CLIENT_MAC, src=LB_MAC) / IP(src=pkt[IP].dst, dst=pkt[IP].src, ttl=64, id=0, flags=0) /
                 ICMP(type=3, code=4, nexthopmtu=mtu) / Raw(quote))


def too_big6(pkt, mtu: int) -> bytes:
    quote = bytes(pkt[IPv6])[:abi.ICMP6_QUOTE]
    return bytes(Ether(dst=CLIENT_MAC, src=LB_MAC) / IPv6(src=pkt[IPv6].dst, dst=pkt[IPv6].src, hlim=64) /
                 ICMPv6PacketTooBig(mtu=mtu) / Raw(quote))


def test_oversize_v4_with_df_gets_frag_needed(elb: Lb) -> None:
    pkt = tcp("10.20.0.6", 80, 40020, flags="A", payload=b"p" * 1341)
    pkt[IP].flags = "DF"
    assert len(pkt[IP]) == 1381    # 1381 + 20 (IPIP) > mtu 1400
    out = check(elb, Case("v4 DF, too big -> frag needed (mtu 1380)", pkt, XDP_TX, too_big4(pkt, 1380),
                          abi.Reason.TX_ICMP_TOO_BIG))
    assert len(out) == 14 + 576


def test_oversize_v4_fits_exactly(elb: Lb) -> None:
    pkt = tcp("10.20.0.6", 80, 40021, flags="A", payload=b"p" * 1340)
    pkt[IP].flags = "DF"
    check(elb, _row("1380 bytes + 20 = the mtu: forwarded", pkt, MTU4))


def test_oversize_v4_without_df_is_dropped(elb: Lb) -> None:
    pkt = tcp("10.20.0.6", 80, 40022, flags="A", payload=b"p" * 1341)
    check(elb, Case("v4 no DF, too big", pkt, XDP_DROP, reason=abi.Reason.DROP_TOO_BIG))


def test_oversize_v6_gets_packet_too_big(elb: Lb) -> None:
    pkt = tcp("fd20::6", 80, 40023, flags="A", payload=b"p" * 1293)   # 40 + 20 + 1293 = 1353 > 1400 - 48
    out = check(elb, Case("v6 too big -> packet too big (mtu 1352)", pkt, XDP_TX, too_big6(pkt, 1352),
                          abi.Reason.TX_ICMP_TOO_BIG))
    assert len(out) == 14 + 1280


def test_oversize_v4_in_v6_gue_and_vlan(elb: Lb) -> None:
    pkt = udp("10.20.0.6", 53, 40024, payload=b"u" * 1400, vlan=9)
    pkt[IP].flags = "DF"
    want = Ether(too_big4(pkt, 1352))
    want = Ether(dst=CLIENT_MAC, src=LB_MAC) / Dot1Q(vlan=9) / want[IP]
    check(elb, Case("4-in-6 gue, too big, tagged", pkt, XDP_TX, bytes(want), abi.Reason.TX_ICMP_TOO_BIG))


def test_mss_clamp_on_syn(elb: Lb) -> None:
    """mss_clamp: a SYN's MSS 1460 becomes 1400 - 20 (IPIP) - 20 - 20 = 1340 (v4), and
    1400 - 48 (GUE over v6) - 40 - 20 = 1292 (v6); a smaller MSS is left alone."""
    for addr, v, mss in (("10.20.0.6", MTU4, 1340), ("fd20::6", MTU6, 1292)):
        pkt = tcp(addr, 80, 40030)
        pkt[TCP].options = [("MSS", 1460), ("SAckOK", b""), ("NOP", None), ("WScale", 7)]
        pkt = pkt.__class__(bytes(pkt))
        clamped = pkt.copy()
        clamped[TCP].options = [("MSS", mss), ("SAckOK", b""), ("NOP", None), ("WScale", 7)]
        del clamped[TCP].chksum
        clamped = clamped.__class__(bytes(clamped))
        check(elb, Case(f"mss clamp {addr}", pkt, XDP_TX, encapsulated(clamped, v)))
        small = tcp(addr, 80, 40031)
        small[TCP].options = [("MSS", 1200)]
        small = small.__class__(bytes(small))
        check(elb, _row(f"mss 1200 kept {addr}", small, v))
