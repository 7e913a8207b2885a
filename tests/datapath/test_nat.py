"""NAT mode (issue 12, bpf/nat.h and bpf/return_path.h): exact frames both directions.

Every expected frame is built with scapy from the input with the translated fields set and its
checksums left for scapy to compute (IPv4 header, TCP/UDP with the pseudo-header, ICMP, the
quoted headers of an ICMP error): the program updates them incrementally, so equal bytes mean
the incremental maths agrees with a full recomputation. Set up through the real control plane
(Balancer.apply writes lbx_nat_cfg, the NAT filter and the backend entries' nat_flags); the
conntrack is read back through Maps.nat_entries / Maps.nat_backend.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lbxdp import abi, model
from lbxdp.maps import HandshakeTable, hs_bucket_hash, hs_check

from .frames import BASE, CLIENT4, CLIENT6, CLIENT_MAC, LB_MAC, RR4, TCP_, UDP_, XDP_DROP, XDP_PASS, XDP_TX, ip
from .harness import Case, Lb, check

pytestmark = pytest.mark.root

R = abi.Reason
SNAT4, SNAT6 = "10.30.255.1", "fd30::ff:1"
ROUTER4, ROUTER6 = "10.30.254.1", "fd30::fe:1"   # a router on the backends' side
CROUTER4, CROUTER6 = "192.0.2.254", "2001:db8::fe"  # a router on the clients' side
POOL = (40000, 40099)


def nvip(addr: str, port: int, proto: model.Protocol, be: str, be_port: int, tag: int, snat: bool) -> model.Vip:
    b = model.Backend(ip(be), be_port, mac=f"02:be:30:00:00:{tag:02x}")
    return model.Vip(ip(addr), port, proto, model.Mode.NAT, model.Scheduler.RR, (b,), snat=snat)


DNAT4 = nvip("10.30.0.1", 80, TCP_, "10.30.1.1", 8080, 1, False)
DNAT4U = nvip("10.30.0.1", 53, UDP_, "10.30.1.2", 5353, 2, False)
SNAT4T = nvip("10.30.0.2", 80, TCP_, "10.30.2.1", 8080, 3, True)
SNAT4U = nvip("10.30.0.2", 53, UDP_, "10.30.2.2", 5353, 4, True)
DNAT6 = nvip("fd30::1", 80, TCP_, "fd30:1::1", 8080, 5, False)
SNAT6T = nvip("fd30::2", 80, TCP_, "fd30:2::1", 8443, 6, True)
SNAT6U = nvip("fd30::2", 53, UDP_, "fd30:2::2", 5353, 7, True)
DNAT4B = nvip("10.30.0.4", 80, TCP_, "10.30.1.1", 8080, 1, False)   # shares DNAT4's backend
NAT_VIPS = (DNAT4, DNAT4U, SNAT4T, SNAT4U, DNAT6, SNAT6T, SNAT6U, DNAT4B)
OPTS = model.BalancerOptions(snat_v4=ip(SNAT4), snat_v6=ip(SNAT6), snat_ports=POOL,  # type: ignore[arg-type]
                             nat_timeouts=model.NatTimeouts(tcp_syn=10, tcp_established=600, tcp_close=10, udp=30))
CFG = model.Config(vips=BASE.vips + NAT_VIPS, balancer=OPTS)


def reset_nat(lb: Lb) -> None:
    for m in lb.maps.nat_tables():
        if isinstance(m, HandshakeTable):   # lbx_nat_new: every slot's check word zeroed, torn ones too
            m.clear()
            continue
        for k in list(m.keys()):
            m.delete(k)
    for bid in lb.maps.backends():
        lb.maps.m[abi.Map.NAT_BE].zero(bid)


@pytest.fixture
def nlb(lb: Lb) -> Lb:
    assert not model.Config(vips=NAT_VIPS, balancer=OPTS).problems()
    lb.apply(CFG)
    reset_nat(lb)
    yield lb
    reset_nat(lb)


# --- frames -----------------------------------------------------------------------------------------
def l3(src: str, dst: str) -> Packet:
    return IP(src=src, dst=dst, id=7) if ":" not in dst else IPv6(src=src, dst=dst)


def seg(src: str, dst: str, sport: int, dport: int, flags: str = "S", smac: str = CLIENT_MAC,
        payload: bytes = b"") -> Packet:
    p = Ether(src=smac, dst=LB_MAC) / l3(src, dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0)
    return p / Raw(payload) if payload else p


def dgram(src: str, dst: str, sport: int, dport: int, smac: str = CLIENT_MAC, payload: bytes = b"query") -> Packet:
    return Ether(src=smac, dst=LB_MAC) / l3(src, dst) / UDP(sport=sport, dport=dport) / Raw(payload)


def translated(pkt: Packet, *, src: str, dst: str, sport: int, dport: int, dmac: str) -> Packet:
    """pkt with new addresses, ports and MACs; every checksum left for scapy to compute."""
    out = pkt.copy()
    out[Ether].src, out[Ether].dst = LB_MAC, dmac
    l3_ = out[IP] if IP in out else out[IPv6]
    l3_.src, l3_.dst = src, dst
    l4 = out[TCP] if TCP in out else out[UDP]
    l4.sport, l4.dport = sport, dport
    if IP in out:
        out[IP].chksum = None
    l4.chksum = None
    return out


def be_mac(v: model.Vip) -> str:
    return v.backends[0].mac  # type: ignore[return-value]


def be(v: model.Vip) -> str:
    return str(v.backends[0].address)


def fwd_case(desc: str, v: model.Vip, pkt: Packet, sport_out: int) -> Case:
    src = pkt[IP].src if IP in pkt else pkt[IPv6].src
    if v.snat:
        src = SNAT4 if v.address.version == 4 else SNAT6
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    want = translated(pkt, src=src, dst=be(v), sport=sport_out, dport=v.backends[0].port, dmac=be_mac(v))
    assert l4.dport == v.port
    return Case(desc, pkt, XDP_TX, want, R.TX_FORWARD)


def reply_case(desc: str, v: model.Vip, client: str, cport: int, sport_seen: int, flags: str = "SA",
               udp: bool = False) -> Case:
    """The backend's reply to the connection client:cport -> v, as it arrives (to the client in
    DNAT, to the SNAT address and port sport_seen in SNAT) and as it must leave (from the VIP)."""
    dst = (SNAT4 if v.address.version == 4 else SNAT6) if v.snat else client
    bport = v.backends[0].port
    pkt = (dgram(be(v), dst, bport, sport_seen, smac=be_mac(v), payload=b"answer") if udp
           else seg(be(v), dst, bport, sport_seen, flags, smac=be_mac(v)))
    want = translated(pkt, src=str(v.address), dst=client, sport=v.port, dport=cport, dmac=CLIENT_MAC)
    return Case(desc, pkt, XDP_TX, want, R.TX_NAT_REPLY)


def states(lb: Lb) -> dict[abi.NatDir, tuple[int, int]]:
    """direction -> (state, timeout) of the (one) connection in lbx_nat."""
    return {e.dir: (e.state, e.timeout) for e in lb.maps.nat_entries()}


def assured(lb: Lb) -> dict[abi.NatDir, bool]:
    """direction -> whether the (one) connection's entry is in lbx_nat (else lbx_nat_new)."""
    return {e.dir: e.assured for e in lb.maps.nat_entries()}


def units(seconds: int) -> int:
    return -(-seconds * 1_000_000_000 >> abi.NAT_TIME_SHIFT)


# --- both directions, both setups, both families, both protocols -------------------------------------
CONNECTIONS = [
    # (id, VIP, client, client port, the source port the backend sees)
    ("dnat v4 tcp", DNAT4, CLIENT4, 41000, 41000),
    ("snat v4 tcp", SNAT4T, CLIENT4, 41001, POOL[0]),
    ("dnat v6 tcp", DNAT6, CLIENT6, 41002, 41002),
    ("snat v6 tcp", SNAT6T, CLIENT6, 41003, POOL[0]),
]


@pytest.mark.parametrize("name, v, client, cport, seen", CONNECTIONS, ids=[c[0] for c in CONNECTIONS])
def test_tcp_connection_both_directions(nlb: Lb, name: str, v: model.Vip, client: str, cport: int, seen: int) -> None:
    syn = seg(client, str(v.address), cport, v.port, "S")
    check(nlb, fwd_case(f"{name}: SYN to the backend", v, syn, seen))
    assert states(nlb) == {abi.NatDir.FWD: (abi.NatState.SYN_SENT, units(10)),
                           abi.NatDir.REPLY: (abi.NatState.SYN_SENT, units(10))}
    assert assured(nlb) == {d: False for d in abi.NatDir}      # a handshake: lbx_nat_new
    check(nlb, reply_case(f"{name}: SYN-ACK back from the VIP", v, client, cport, seen, "SA"))
    # the client has not acknowledged it: still a handshake, with the handshake's timeout
    assert states(nlb) == {d: (abi.NatState.ESTABLISHED, units(10)) for d in abi.NatDir}
    assert assured(nlb) == {d: False for d in abi.NatDir}
    data = seg(client, str(v.address), cport, v.port, "PA", payload=b"GET / HTTP/1.0\r\n\r\n")
    check(nlb, fwd_case(f"{name}: data to the backend", v, data, seen))
    assert assured(nlb) == {d: True for d in abi.NatDir}       # moved to lbx_nat, both entries
    assert states(nlb) == {d: (abi.NatState.ESTABLISHED, units(600)) for d in abi.NatDir}
    assert len(nlb.maps.nat_entries()) == 2
    check(nlb, reply_case(f"{name}: data back", v, client, cport, seen, "PA"))
    fin = seg(client, str(v.address), cport, v.port, "FA")
    check(nlb, fwd_case(f"{name}: client's FIN", v, fin, seen))
    assert states(nlb) == {d: (abi.NatState.CLOSING, units(10)) for d in abi.NatDir}
    check(nlb, reply_case(f"{name}: backend's FIN", v, client, cport, seen, "FA"))


UDP_FLOWS = [
    ("dnat v4 udp", DNAT4U, CLIENT4, 42000, 42000),
    ("snat v4 udp", SNAT4U, CLIENT4, 42001, POOL[0]),
    ("snat v6 udp", SNAT6U, CLIENT6, 42002, POOL[0]),
]


@pytest.mark.parametrize("name, v, client, cport, seen", UDP_FLOWS, ids=[c[0] for c in UDP_FLOWS])
def test_udp_flow_both_directions(nlb: Lb, name: str, v: model.Vip, client: str, cport: int, seen: int) -> None:
    q = dgram(client, str(v.address), cport, v.port)
    check(nlb, fwd_case(f"{name}: query to the backend", v, q, seen))
    assert states(nlb) == {d: (abi.NatState.UDP, units(30)) for d in abi.NatDir}
    assert assured(nlb) == {d: False for d in abi.NatDir}      # a new flow: lbx_nat_new
    check(nlb, reply_case(f"{name}: answer back", v, client, cport, seen, udp=True))
    assert assured(nlb) == {d: False for d in abi.NatDir}
    check(nlb, fwd_case(f"{name}: second query, same port", v, q, seen))
    assert assured(nlb) == {d: True for d in abi.NatDir}       # the client's second datagram
    assert states(nlb) == {d: (abi.NatState.UDP, units(30)) for d in abi.NatDir}
    assert len(nlb.maps.nat_entries()) == 2
    check(nlb, reply_case(f"{name}: answer back from lbx_nat", v, client, cport, seen, udp=True))


def test_ipv4_udp_without_checksum_keeps_none(nlb: Lb) -> None:
    q = dgram(CLIENT4, "10.30.0.1", 42010, 53)
    q[UDP].chksum = 0
    want = translated(q, src=CLIENT4, dst=be(DNAT4U), sport=42010, dport=5353, dmac=be_mac(DNAT4U))
    want[UDP].chksum = 0
    check(nlb, Case("a v4 datagram without checksum stays without", q, XDP_TX, want, R.TX_FORWARD))


def test_snat_ports_are_allocated_in_turn_per_backend(nlb: Lb) -> None:
    for i in range(3):
        syn = seg(CLIENT4, "10.30.0.2", 43000 + i, 80, "S")
        check(nlb, fwd_case(f"SNAT connection {i} gets pool port {POOL[0] + i}", SNAT4T, syn, POOL[0] + i))
    ports = sorted(e.dport for e in nlb.maps.nat_entries() if e.dir is abi.NatDir.REPLY)
    assert ports == [POOL[0], POOL[0] + 1, POOL[0] + 2]


def test_pool_exhaustion_drops_and_counts(nlb: Lb) -> None:
    nlb.apply(dataclasses.replace(CFG, balancer=dataclasses.replace(OPTS, snat_ports=(40000, 40001))))
    for i in range(2):
        check(nlb, fwd_case(f"connection {i} of a 2-port pool", SNAT4T, seg(CLIENT4, "10.30.0.2", 44000 + i, 80), 40000 + i))
    third = seg(CLIENT4, "10.30.0.2", 44002, 80)
    check(nlb, Case("a third connection finds no port: dropped, counted", third, XDP_DROP, None, R.DROP_NAT_NO_PORT))
    assert len(nlb.maps.nat_entries()) == 4, "the refused connection left no entry"
    # a port whose connection closed and timed out is free again (an expired entry counts as absent)
    nlb.apply(dataclasses.replace(CFG, balancer=dataclasses.replace(
        OPTS, snat_ports=(40000, 40001), nat_timeouts=model.NatTimeouts(tcp_syn=1, tcp_established=600, tcp_close=1, udp=1))))
    check(nlb, fwd_case("RST closes connection 0", SNAT4T, seg(CLIENT4, "10.30.0.2", 44000, 80, "R"), 40000))
    time.sleep(1.3)
    check(nlb, fwd_case("after its close timeout its port serves a new connection", SNAT4T, third, 40000))


def test_a_reply_with_no_tracked_connection_is_passed_and_counted(nlb: Lb) -> None:
    stray = seg(be(DNAT4), CLIENT4, 8080, 45000, "SA", smac=be_mac(DNAT4))
    check(nlb, Case("a backend's segment no connection knows: passed", stray, XDP_PASS, None, R.PASS_NAT_NO_FLOW))
    to_snat = seg(be(SNAT4T), SNAT4, 8080, 33000, "SA", smac=be_mac(SNAT4T))
    check(nlb, Case("a backend's answer to the balancer's own port (a health check): passed", to_snat, XDP_PASS,
                    None, R.PASS_NAT_NO_FLOW))


def test_an_expired_connection_is_absent(nlb: Lb) -> None:
    nlb.apply(dataclasses.replace(CFG, balancer=dataclasses.replace(
        OPTS, nat_timeouts=model.NatTimeouts(tcp_syn=1, tcp_established=1, tcp_close=1, udp=1))))
    check(nlb, fwd_case("SYN", DNAT4, seg(CLIENT4, "10.30.0.1", 45100, 80), 45100))
    time.sleep(1.3)
    late = seg(be(DNAT4), CLIENT4, 8080, 45100, "SA", smac=be_mac(DNAT4))
    check(nlb, Case("a SYN-ACK after the SYN's timeout: no connection", late, XDP_PASS, None, R.PASS_NAT_NO_FLOW))


def test_dnat_reply_tuple_taken_by_a_live_connection(nlb: Lb) -> None:
    check(nlb, fwd_case("client:41500 -> VIP A", DNAT4, seg(CLIENT4, "10.30.0.1", 41500, 80), 41500))
    again = seg(CLIENT4, "10.30.0.4", 41500, 80)
    check(nlb, Case("the same client port to VIP B with the same backend: its replies could not be told "
                    "apart", again, XDP_DROP, None, R.DROP_NAT_TUPLE_TAKEN))


def test_a_syn_reusing_a_closed_tuple_opens_a_new_connection(nlb: Lb) -> None:
    check(nlb, fwd_case("SYN", DNAT4, seg(CLIENT4, "10.30.0.1", 41600, 80), 41600))
    check(nlb, fwd_case("RST", DNAT4, seg(CLIENT4, "10.30.0.1", 41600, 80, "R"), 41600))
    check(nlb, fwd_case("SYN again on the same tuple", DNAT4, seg(CLIENT4, "10.30.0.1", 41600, 80), 41600))
    assert states(nlb) == {d: (abi.NatState.SYN_SENT, units(10)) for d in abi.NatDir}


# --- ICMP errors: outer and quoted headers, both directions ----------------------------------------
def test_icmp_from_the_backend_side_reaches_the_client_translated(nlb: Lb) -> None:
    check(nlb, fwd_case("SYN", SNAT4T, seg(CLIENT4, "10.30.0.2", 46000, 80), POOL[0]))
    quoted = IP(src=SNAT4, dst=be(SNAT4T), id=7) / TCP(sport=POOL[0], dport=8080, flags="S", seq=1000)
    err = Ether(src=be_mac(SNAT4T), dst=LB_MAC) / IP(src=ROUTER4, dst=SNAT4) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted
    want = Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=ROUTER4, dst=CLIENT4) / ICMP(type=3, code=4, nexthopmtu=1400) / \
        IP(src=CLIENT4, dst="10.30.0.2", id=7) / TCP(sport=46000, dport=80, flags="S", seq=1000)
    check(nlb, Case("frag-needed about the SNAT'd SYN: outer to the client, quote as the client sent it",
                    err, XDP_TX, want, R.TX_NAT_ICMP_REPLY))


def test_icmp_from_the_client_side_reaches_the_backend_translated(nlb: Lb) -> None:
    check(nlb, fwd_case("SYN", SNAT4T, seg(CLIENT4, "10.30.0.2", 46001, 80), POOL[0]))
    quoted = IP(src="10.30.0.2", dst=CLIENT4, id=9) / TCP(sport=80, dport=46001, flags="SA", seq=5)
    err = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CROUTER4, dst="10.30.0.2") / ICMP(type=3, code=4, nexthopmtu=1300) / quoted
    want = Ether(src=LB_MAC, dst=be_mac(SNAT4T)) / IP(src=CROUTER4, dst=be(SNAT4T)) / \
        ICMP(type=3, code=4, nexthopmtu=1300) / IP(src=be(SNAT4T), dst=SNAT4, id=9) / \
        TCP(sport=8080, dport=POOL[0], flags="SA", seq=5)
    check(nlb, Case("frag-needed about the VIP's SYN-ACK: to the backend, quote as the backend sent it",
                    err, XDP_TX, want, R.TX_ICMP_STEERED))


def test_icmpv6_too_big_both_directions(nlb: Lb) -> None:
    check(nlb, fwd_case("SYN", SNAT6T, seg(CLIENT6, "fd30::2", 46002, 80), POOL[0]))
    quoted = IPv6(src=SNAT6, dst=be(SNAT6T)) / TCP(sport=POOL[0], dport=8443, flags="A", seq=1000) / Raw(b"x" * 64)
    err = Ether(src=be_mac(SNAT6T), dst=LB_MAC) / IPv6(src=ROUTER6, dst=SNAT6) / ICMPv6PacketTooBig(mtu=1280) / quoted
    want = Ether(src=LB_MAC, dst=CLIENT_MAC) / IPv6(src=ROUTER6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) / \
        IPv6(src=CLIENT6, dst="fd30::2") / TCP(sport=46002, dport=80, flags="A", seq=1000) / Raw(b"x" * 64)
    check(nlb, Case("packet-too-big from the backends' side", err, XDP_TX, want, R.TX_NAT_ICMP_REPLY))
    quoted = IPv6(src="fd30::2", dst=CLIENT6) / TCP(sport=80, dport=46002, flags="A", seq=5) / Raw(b"y" * 64)
    err = Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CROUTER6, dst="fd30::2") / ICMPv6PacketTooBig(mtu=1280) / quoted
    want = Ether(src=LB_MAC, dst=be_mac(SNAT6T)) / IPv6(src=CROUTER6, dst=be(SNAT6T)) / ICMPv6PacketTooBig(mtu=1280) / \
        IPv6(src=be(SNAT6T), dst=SNAT6) / TCP(sport=8443, dport=POOL[0], flags="A", seq=5) / Raw(b"y" * 64)
    check(nlb, Case("packet-too-big from the clients' side", err, XDP_TX, want, R.TX_ICMP_STEERED))


def test_icmp_udp_quote_with_checksum_dnat(nlb: Lb) -> None:
    check(nlb, fwd_case("query", DNAT4U, dgram(CLIENT4, "10.30.0.1", 46003, 53), 46003))
    quoted = IP(src=CLIENT4, dst=be(DNAT4U), id=7) / UDP(sport=46003, dport=5353) / Raw(b"query")
    err = Ether(src=be_mac(DNAT4U), dst=LB_MAC) / IP(src=ROUTER4, dst=CLIENT4) / ICMP(type=3, code=3) / quoted
    want = Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=ROUTER4, dst=CLIENT4) / ICMP(type=3, code=3) / \
        IP(src=CLIENT4, dst="10.30.0.1", id=7) / UDP(sport=46003, dport=53) / Raw(b"query")
    check(nlb, Case("port unreachable about a DNAT'd datagram: the quote shows the VIP", err, XDP_TX, want,
                    R.TX_NAT_ICMP_REPLY))


def test_icmp_about_an_unknown_nat_flow_is_passed(nlb: Lb) -> None:
    quoted = IP(src="10.30.0.2", dst=CLIENT4) / TCP(sport=80, dport=46999, flags="SA")
    err = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CROUTER4, dst="10.30.0.2") / ICMP(type=3, code=4, nexthopmtu=1300) / quoted
    check(nlb, Case("an error about no connection: nothing to translate", err, XDP_PASS, None, R.PASS_NAT_ICMP_NO_FLOW))


# --- passive health -----------------------------------------------------------------------------------
def test_passive_health_signals(nlb: Lb) -> None:
    bid = nlb.backend_id(DNAT4, DNAT4.backends[0])
    check(nlb, fwd_case("SYN 1", DNAT4, seg(CLIENT4, "10.30.0.1", 47000, 80), 47000))
    check(nlb, reply_case("the backend refuses: RST to the SYN", DNAT4, CLIENT4, 47000, 47000, "RA"))
    h = nlb.maps.nat_backend(bid)
    assert (h.consecutive, h.syn_rst, h.syn_retx, h.synack) == (1, 1, 0, 0)
    assert states(nlb) == {d: (abi.NatState.CLOSING, units(10)) for d in abi.NatDir}
    syn2 = seg(CLIENT4, "10.30.0.1", 47001, 80)
    check(nlb, fwd_case("SYN 2", DNAT4, syn2, 47001))
    check(nlb, fwd_case("SYN 2 retransmitted: no SYN-ACK came", DNAT4, syn2, 47001))
    h = nlb.maps.nat_backend(bid)
    assert (h.consecutive, h.syn_rst, h.syn_retx, h.synack) == (2, 1, 1, 0)
    assert h.last_failure
    check(nlb, reply_case("then a SYN-ACK: the failures in a row reset", DNAT4, CLIENT4, 47001, 47001, "SA"))
    h = nlb.maps.nat_backend(bid)
    assert (h.consecutive, h.syn_rst, h.syn_retx, h.synack) == (0, 1, 1, 1)


def test_dsr_flows_and_other_traffic_never_touch_nat_state(nlb: Lb) -> None:
    from .frames import WEB4, forwarded, tcp
    syn = tcp("10.10.0.1", 80, 48000)
    check(nlb, Case("a DSR VIP beside NAT VIPs forwards as before", syn, XDP_TX, forwarded(syn, WEB4.backends[0])))
    assert nlb.maps.nat_entries() == []


def test_purging_a_backend_ends_its_nat_connections(nlb: Lb) -> None:
    """What control does for a removed backend or a failed one on a migrate VIP (Maps.purge_flows)."""
    check(nlb, fwd_case("SYN", SNAT4T, seg(CLIENT4, "10.30.0.2", 48100, 80), POOL[0]))
    check(nlb, fwd_case("another VIP's connection", DNAT4, seg(CLIENT4, "10.30.0.1", 48101, 80), 48101))
    assert nlb.maps.purge_flows([nlb.backend_id(SNAT4T, SNAT4T.backends[0])]) == 2
    assert {(e.dport, e.dir) for e in nlb.maps.nat_entries()} == {(80, abi.NatDir.FWD), (48101, abi.NatDir.REPLY)}
    late = seg(be(SNAT4T), SNAT4, 8080, POOL[0], "SA", smac=be_mac(SNAT4T))
    check(nlb, Case("the purged connection's reply is no longer translated", late, XDP_PASS, None, R.PASS_NAT_NO_FLOW))


# --- a NAT VIP's packets skip the connection table (bpf/lbxdp.c) -----------------------------------
def flood_windows(lb: Lb) -> list[tuple[int, int, int]]:
    """lbx_flood per CPU: (window start, SYNs, other new flows) of the DSR gate (bpf/select.h)."""
    return [(f.window, f.syns, f.inserts) for f in lb.maps.m[abi.Map.FLOOD].lookup(0)]


def test_a_nat_vips_new_flows_skip_the_connection_table_and_its_flood_window(nlb: Lb) -> None:
    """On a NAT VIP's address the VIP is looked up before the connection table, and a NAT VIP's
    packets never look in lbx_flows (its flows hold no NAT backend entry): NAT SYNs and first
    datagrams, translated as always, leave the DSR gate's per-CPU new-flow window (lbx_flood, which
    a SYN's lbx_flows lookup counts) untouched, where a DSR VIP's one SYN is counted."""
    nlb.maps.m[abi.Map.FLOOD].zero(0)
    for i in range(8):
        cport = 41000 + i
        check(nlb, fwd_case(f"syn {i} to a dnat vip", DNAT4, seg(CLIENT4, str(DNAT4.address), cport, 80), cport))
        check(nlb, fwd_case(f"datagram {i} to a dnat vip", DNAT4U, dgram(CLIENT4, str(DNAT4U.address), cport, 53), cport))
    assert all(w == (0, 0, 0) for w in flood_windows(nlb)), flood_windows(nlb)
    out = nlb.run(seg(CLIENT4, str(RR4.address), 42000, RR4.port))
    assert out.retval == XDP_TX
    assert sum(s for _, s, _ in flood_windows(nlb)) == 1, flood_windows(nlb)


# --- a SYN flood churns the handshake table, never the conntrack (bpf/maps.h lbx_nat_new) ------------
def establish(lb: Lb, v: model.Vip, cport: int) -> None:
    """A TCP connection through v from CLIENT4:cport as a client makes it (SYN, the backend's SYN-ACK,
    the client's ACK), each step forwarded."""
    assert lb.run(seg(CLIENT4, str(v.address), cport, v.port, "S")).retval == XDP_TX
    [e] = [e for e in lb.maps.nat_entries()
           if e.dir is abi.NatDir.FWD and (e.sport, e.dst, e.dport) == (cport, v.address, v.port)]
    synack = seg(str(e.new_dst), str(e.new_src), e.new_dport, e.new_sport, "SA", smac=be_mac(v))
    assert lb.run(synack).retval == XDP_TX
    assert lb.run(seg(CLIENT4, str(v.address), cport, v.port, "A")).retval == XDP_TX


def spoofed_syns(v: model.Vip, n: int) -> list[bytes]:
    """n SYNs (or, a UDP VIP, datagrams) to v, each from its own address and port (a spoofed
    flood): one frame patched."""
    first = dgram if v.protocol is UDP_ else seg
    frame = bytearray(bytes(first("100.80.0.0", str(v.address), 1024, v.port)))
    out = []
    for i in range(n):
        frame[26:30] = (0x64500000 + (i >> 10)).to_bytes(4, "big")   # IPv4 source
        frame[34:36] = (1024 + (i & 1023)).to_bytes(2, "big")         # TCP source port
        out.append(bytes(frame))
    return out


@pytest.mark.parametrize("flood_vip", [DNAT4, DNAT4U], ids=["syn flood", "udp flood"])
def test_a_flood_evicts_no_established_connection(nlb: Lb, flood_vip: model.Vip) -> None:
    """3x the handshake table's capacity in spoofed SYNs or first datagrams (their entries evict
    each other in lbx_nat_new) leaves every established connection of both setups in lbx_nat,
    translated as before; each flood packet is still forwarded. With the connections' entries in
    one LRU (before lbx_nat_new) the SYN flood evicted ~2/3 of them."""
    held = {(v, 45000 + i) for v in (DNAT4, SNAT4T) for i in range(40)}
    for v, cport in held:
        establish(nlb, v, cport)
    before = {(e.src, e.sport, e.dst, e.dport): e for e in nlb.maps.nat_entries() if e.assured}
    assert len(before) == 2 * len(held)
    flood = spoofed_syns(flood_vip, 3 * abi.NAT_NEW_CAPACITY // 2)
    sent = sum(nlb.runner.run(f).retval == XDP_TX for f in flood)
    assert sent == len(flood)
    after = {(e.src, e.sport, e.dst, e.dport): e for e in nlb.maps.nat_entries() if e.assured}
    assert after.keys() == before.keys()
    handshakes = [e for e in nlb.maps.nat_entries() if not e.assured]
    assert abi.NAT_NEW_CAPACITY // 2 < len(handshakes) <= abi.NAT_NEW_CAPACITY
    for v, cport in sorted(held, key=str)[:6]:   # still translated by their entries
        e = before[(ip(CLIENT4), cport, v.address, v.port)]
        data = seg(CLIENT4, str(v.address), cport, v.port, "PA", payload=b"more")
        check(nlb, fwd_case(f"{v.address}:{v.port} from port {cport}: data after the flood", v, data, e.new_sport))


def test_a_syn_reusing_a_closed_connections_tuple_starts_a_handshake(nlb: Lb) -> None:
    """The client reuses its port after a FIN: the closing entries leave lbx_nat and the new
    handshake lives in lbx_nat_new until its ACK (nothing shadows it in either direction)."""
    establish(nlb, DNAT4, 46000)
    check(nlb, fwd_case("FIN", DNAT4, seg(CLIENT4, "10.30.0.1", 46000, 80, "FA"), 46000))
    assert {(e.state, e.assured) for e in nlb.maps.nat_entries()} == {(abi.NatState.CLOSING, True)}
    check(nlb, fwd_case("the port's next SYN", DNAT4, seg(CLIENT4, "10.30.0.1", 46000, 80, "S"), 46000))
    assert {(e.state, e.assured) for e in nlb.maps.nat_entries()} == {(abi.NatState.SYN_SENT, False)}
    assert len(nlb.maps.nat_entries()) == 2
    check(nlb, reply_case("its SYN-ACK", DNAT4, CLIENT4, 46000, 46000, "SA"))
    check(nlb, fwd_case("its ACK", DNAT4, seg(CLIENT4, "10.30.0.1", 46000, 80, "A"), 46000))
    assert {(e.state, e.assured) for e in nlb.maps.nat_entries()} == {(abi.NatState.ESTABLISHED, True)}
    assert len(nlb.maps.nat_entries()) == 2


def test_an_snat_port_held_by_a_handshake_is_not_given_again(nlb: Lb) -> None:
    """A handshake's reply entry (lbx_nat_new) holds its pool port against a connection opened
    straight into lbx_nat (a TCP packet without SYN: picked up mid-stream)."""
    check(nlb, fwd_case("a SYN gets the pool's first port", SNAT4T, seg(CLIENT4, "10.30.0.2", 47000, 80, "S"), POOL[0]))
    nlb.maps.m[abi.Map.NAT_BE].zero(nlb.backend_id(SNAT4T, SNAT4T.backends[0]))   # the cursor back to the first port
    check(nlb, fwd_case("a mid-stream ACK skips it", SNAT4T, seg(CLIENT4, "10.30.0.2", 47001, 80, "A"), POOL[0] + 1))


def nat_key(src: str, sport: int, dst: str, dport: int) -> bytes:
    """struct flow_key (IPv4, TCP) of src:sport -> dst:dport."""
    return (socket.inet_aton(src).ljust(16, b"\0") + socket.inet_aton(dst).ljust(16, b"\0") +
            struct.pack("!HH", sport, dport) + bytes([6, abi.FAMILY_V4, 0, 0]))


def test_a_dnat_handshake_has_one_bucket_and_never_evicts_its_own_reply_slot(nlb: Lb) -> None:
    """A DNAT connection's forward key (client -> VIP) and reply key (backend -> client) hash to
    one bucket of lbx_nat_new, their client side's (nat.h hs_bucket_hash): its SYN writes both
    slots there. In a full bucket each key's victim is the way its check starts at, and the two
    may be one: the forward entry then takes the next way, so the SYN-ACK is still translated. The
    client port is chosen so that they coincide, and the bucket is filled with four other
    handshakes first (without hs_put()'s guard, the SYN-ACK passes untranslated)."""
    [t] = [m for m in nlb.maps.nat_tables() if isinstance(m, HandshakeTable)]
    buckets, vip, bport = t.m.info.max_entries, str(DNAT4.address), DNAT4.backends[0].port

    def keys(cport: int) -> tuple[bytes, bytes]:
        return nat_key(CLIENT4, cport, vip, 80), nat_key(be(DNAT4), bport, CLIENT4, cport)

    cport = next(p for p in range(20000, 60000) if hs_check(keys(p)[0]) >> 30 == hs_check(keys(p)[1]) >> 30)
    fwd, rk = keys(cport)
    bucket = hs_bucket_hash(fwd, False) & (buckets - 1)
    assert bucket == hs_bucket_hash(rk, True) & (buckets - 1)
    fillers = [k for a in range(1, 40) for p in range(1024, 65536)
               if hs_bucket_hash(k := nat_key(f"100.70.0.{a}", p, vip, 80), False) & (buckets - 1) == bucket][:4]
    assert len(fillers) == 4
    live = t.Leaf(dir=abi.NatDir.FWD, state=abi.NatState.SYN_SENT, seen=2**31, timeout=2**31)
    for k in fillers:
        t.update(t.Key.from_buffer_copy(k), live)
    assert {t.locate(t.Key.from_buffer_copy(k), reply=False)[0] for k in fillers} == {bucket}   # full

    check(nlb, fwd_case("a SYN into the full bucket", DNAT4, seg(CLIENT4, vip, cport, 80, "S"), cport))
    where = {d: t.locate(t.Key.from_buffer_copy(k), reply=d is abi.NatDir.REPLY) for d, k in
             ((abi.NatDir.FWD, fwd), (abi.NatDir.REPLY, rk))}
    assert None not in where.values(), where
    assert where[abi.NatDir.FWD][0] == where[abi.NatDir.REPLY][0] == bucket
    assert where[abi.NatDir.FWD][1] != where[abi.NatDir.REPLY][1]
    check(nlb, reply_case("its SYN-ACK, translated", DNAT4, CLIENT4, cport, cport, "SA"))


# --- a VIP switched between DSR and NAT (bpf/forward.h, select.h established(), nat.h nat_established()) ---
SWITCH_BE = model.Backend(ip("10.30.1.9"), 80, mac="02:be:30:00:00:09")
SWITCH_DSR = model.Vip(ip("10.30.0.9"), 80, TCP_, model.Mode.DSR, model.Scheduler.RR, (SWITCH_BE,))
SWITCH_NAT = dataclasses.replace(SWITCH_DSR, mode=model.Mode.NAT)


def with_vip(v: model.Vip) -> model.Config:
    return dataclasses.replace(CFG, vips=CFG.vips + (v,))


def test_a_live_dsr_flow_starts_over_as_nat_when_its_vip_switches(nlb: Lb) -> None:
    """A connection-table flow whose backend entry became NAT is no flow any more: its next packet
    opens a NAT connection (mid-stream, so straight into lbx_nat) instead of leaving by DSR's MAC
    rewrite to a backend that now expects translated packets."""
    from .frames import forwarded
    nlb.apply(with_vip(SWITCH_DSR))
    first = seg(CLIENT4, "10.30.0.9", 49000, 80, "S")
    check(nlb, Case("a DSR SYN", first, XDP_TX, forwarded(first, SWITCH_BE), R.TX_FORWARD))
    ack = seg(CLIENT4, "10.30.0.9", 49000, 80, "A")
    check(nlb, Case("its ACK: recorded", ack, XDP_TX, forwarded(ack, SWITCH_BE), R.TX_FORWARD))
    assert nlb.maps.nat_entries() == [] and nlb.maps.flow_map.lookup(next(iter(nlb.maps.flow_map.keys()))) is not None
    nlb.apply(with_vip(SWITCH_NAT))
    data = seg(CLIENT4, "10.30.0.9", 49000, 80, "PA", payload=b"after the switch")
    check(nlb, fwd_case("the flow's next segment, translated", SWITCH_NAT, data, 49000))
    assert {(e.dir, e.state, e.assured) for e in nlb.maps.nat_entries()} == {
        (abi.NatDir.FWD, abi.NatState.ESTABLISHED, True), (abi.NatDir.REPLY, abi.NatState.ESTABLISHED, True)}


def test_a_nat_entry_met_by_a_dsr_vips_selection_is_dropped_and_counted(nlb: Lb) -> None:
    """The switch's window: a DSR VIP whose backend entries already say NAT (the control plane
    writes the entries before the VIP). forward() does not open NAT connections: the frame is
    dropped under its own reason, for the live flow and for a new one, never sent by DSR's rewrite."""
    nlb.apply(with_vip(SWITCH_DSR))
    nlb.open(seg(CLIENT4, "10.30.0.9", 49100, 80, "S"))
    bid = nlb.backend_id(SWITCH_DSR, SWITCH_BE)
    entry = nlb.maps.be_map.lookup(bid)
    entry.mode = int(abi.FwdMode.NAT)
    nlb.maps.be_map.update(bid, entry)
    check(nlb, Case("the live flow's next segment", seg(CLIENT4, "10.30.0.9", 49100, 80, "A"), XDP_DROP,
                    reason=R.DROP_UNKNOWN_MODE))
    check(nlb, Case("a new flow", seg(CLIENT4, "10.30.0.9", 49101, 80, "S"), XDP_DROP, reason=R.DROP_UNKNOWN_MODE))
    assert nlb.maps.nat_entries() == []


def test_a_live_nat_connection_starts_over_as_dsr_when_its_vip_switches(nlb: Lb) -> None:
    """The other way: a NAT connection whose backend entry left NAT is no connection any more for
    the client's packets, which take the DSR VIP's path (MAC rewrite, addresses untouched). The
    backend's late replies are not translated with the old entry either: its address left the NAT
    filter (no NAT VIP has it now), so they go to the balancer's kernel like any frame for no VIP."""
    from .frames import forwarded
    nlb.apply(with_vip(SWITCH_NAT))
    establish(nlb, SWITCH_NAT, 49200)
    assert len(nlb.maps.nat_entries()) == 2
    nlb.apply(with_vip(SWITCH_DSR))
    data = seg(CLIENT4, "10.30.0.9", 49200, 80, "PA", payload=b"after the switch")
    check(nlb, Case("the client's next segment, by DSR", data, XDP_TX, forwarded(data, SWITCH_BE), R.TX_FORWARD))
    late = seg(str(SWITCH_BE.address), CLIENT4, 80, 49200, "A", smac=SWITCH_BE.mac)
    check(nlb, Case("a late reply of the NAT connection: passed, untouched", late, XDP_PASS, reason=R.PASS_NOT_VIP))
