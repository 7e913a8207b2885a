"""One frame in, one verdict, one exact frame out, one reason counter up: the table.

Each row uses its own 5-tuple, and the `lb` fixture empties the connection table and resets the
round-robin positions before every row, so a new flow to a VIP always takes slot 0 of its table:
the VIP's first backend in config order.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from lbxdp import abi

from .frames import (BASE, CLIENT4, CLIENT6, CLIENT_MAC, DNS4, DNS6, EMPTY4, PASSEMPTY4, LB_MAC, OTHER4, OTHER6, WEB4, WEB6,
                     XDP_DROP, XDP_PASS, XDP_TX, icmp_echo, tcp, udp)
from .harness import Case, Lb, check
from .harness import new_flow as _tx

pytestmark = pytest.mark.root
R = abi.Reason

V4, V6 = str(WEB4.address), str(WEB6.address)  # the TCP/80 and UDP/53 VIPs share these addresses


def _pass(desc: str, pkt, reason: abi.Reason) -> Case:
    return Case(desc, pkt, XDP_PASS, reason=reason)


def _eth(ethertype: int) -> Ether:
    return Ether(src=CLIENT_MAC, dst=LB_MAC, type=ethertype)


def _padded(pkt, n: int = 6) -> bytes:
    """pkt followed by n bytes of Ethernet padding (legal: short frames are padded to 60 bytes)."""
    return bytes(pkt) + bytes(n)


def _drop_source(desc: str, src: str, dst: str, sport: int) -> Case:
    """A SYN (v4) or a UDP datagram (v6) to a VIP from a source that cannot be a client."""
    pkt = tcp(dst, 80, sport, src=src) if ":" not in dst else udp(dst, 53, sport, src=src)
    return Case(desc, pkt, XDP_DROP, reason=R.DROP_BAD_SOURCE)


def _truncated_tcp(n: int) -> Ether:
    """A v4 packet to the TCP VIP that carries only the first n bytes of its TCP header."""
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4, proto=6) / \
        Raw(bytes(TCP(sport=41001, dport=80, flags="S"))[:n])


CASES = [
    # --- forwarded ------------------------------------------------------------------------------
    _tx("tcp syn to a v4 vip goes to a backend", tcp(V4, 80, 40001), WEB4),
    _tx("tcp syn to a v6 vip goes to a backend", tcp(V6, 80, 40002), WEB6),
    _tx("udp to a v4 vip goes to a backend", udp(V4, 53, 40003), DNS4),
    _tx("udp to a v6 vip goes to a backend", udp(V6, 53, 40004), DNS6),
    _tx("a vlan-tagged syn to a vip keeps its tag", tcp(V4, 80, 40005, vlan=42), WEB4),
    _tx("an 802.1ad-tagged syn to a vip keeps its tag",
        Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1AD(vlan=7) / IP(src=CLIENT4, dst=V4) /
        TCP(sport=40006, dport=80, flags="S"), WEB4),
    _tx("a mid-stream segment with no table entry starts a flow (no tcp state is kept)",
        tcp(V4, 80, 40007, flags="PA", payload=b"GET / HTTP/1.1\r\n\r\n"), WEB4),
    _tx("ethernet padding after a v4 packet is forwarded with it", _padded(tcp(V4, 80, 40009)), WEB4),
    _tx("ethernet padding after a v4 udp datagram is forwarded with it", _padded(udp(V4, 53, 40010, payload=b"q")), DNS4),
    _tx("ethernet padding after a v6 packet is forwarded with it",
        _padded(tcp(V6, 80, 40011), 8), WEB6),
    _tx("a ttl of 1 is forwarded (dsr does not decrement it)", tcp(V4, 80, 40012, ttl=1), WEB4),
    # --- not for a vip --------------------------------------------------------------------------
    _pass("tcp to a v4 address that is no vip passes", tcp(OTHER4, 80, 40101), R.PASS_NOT_VIP),
    _pass("tcp to a v6 address that is no vip passes", tcp(OTHER6, 80, 40102), R.PASS_NOT_VIP),
    _pass("tcp to a v4 vip address on another port passes", tcp(V4, 8080, 40103), R.PASS_NOT_VIP),
    _pass("tcp to a v6 vip address on another port passes", tcp(V6, 443, 40104), R.PASS_NOT_VIP),
    _pass("udp to a tcp-only vip port passes", udp(V4, 80, 40105), R.PASS_NOT_VIP),
    _pass("tcp to a udp-only vip port passes", tcp(V4, 53, 40106), R.PASS_NOT_VIP),
    _pass("a vip's address with the v4 family of another's passes",  # fd10::1 is no v4 VIP
          tcp("10.10.0.99", 80, 40107), R.PASS_NOT_VIP),
    # --- not IP, not TCP/UDP --------------------------------------------------------------------
    _pass("arp passes", Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") /
          ARP(op="who-has", psrc=CLIENT4, pdst=V4, hwsrc=CLIENT_MAC), R.PASS_NOT_IP),
    _pass("lldp passes", Ether(src=CLIENT_MAC, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07" + bytes(7)),
          R.PASS_NOT_IP),
    _pass("a double-tagged (q-in-q) frame passes: only one tag is parsed",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1AD(vlan=7) / Dot1Q(vlan=42) / IP(src=CLIENT4, dst=V4) /
          TCP(sport=40201, dport=80, flags="S"), R.PASS_NOT_IP),
    _pass("an icmp echo request to a vip address passes", icmp_echo(V4), R.PASS_ICMP_ECHO),
    _pass("an icmpv6 echo request to a vip address passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=V6) / ICMPv6EchoRequest(), R.PASS_ICMP_ECHO),
    # --- fragments, options, extension headers --------------------------------------------------
    _pass("a first v4 fragment (MF set) to a vip passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4, flags="MF", id=7) / TCP(sport=40301, dport=80, flags="PA") / Raw(b"x" * 64),
          R.PASS_FRAGMENT),
    _pass("a later v4 fragment (offset != 0) to a vip passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4, proto=6, frag=100, id=7) / Raw(b"y" * 40),
          R.PASS_FRAGMENT),
    _pass("a last v4 fragment whose bytes look like a tcp header passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4, frag=3, id=8) /
          TCP(sport=40302, dport=80, flags="S"), R.PASS_FRAGMENT),
    _pass("v4 with options passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4, options=[IPOption_Router_Alert()]) / TCP(sport=40303, dport=80, flags="S"),
          R.PASS_IP_OPTIONS),
    _pass("v6 with a hop-by-hop header passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IPv6(src=CLIENT6, dst=V6) / IPv6ExtHdrHopByHop() / TCP(sport=40304, dport=80, flags="S"),
          R.PASS_IPV6_EXT),
    _pass("v6 with a fragment header passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IPv6(src=CLIENT6, dst=V6) / IPv6ExtHdrFragment(id=9) / TCP(sport=40305, dport=80, flags="S"),
          R.PASS_IPV6_EXT),
    _pass("v6 with a routing header passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IPv6(src=CLIENT6, dst=V6) / IPv6ExtHdrRouting() / UDP(sport=40306, dport=53), R.PASS_IPV6_EXT),
    # --- truncated and malformed ----------------------------------------------------------------
    _pass("10 bytes of tcp header pass", _truncated_tcp(10), R.PASS_TRUNCATED),
    _pass("19 bytes of tcp header pass", _truncated_tcp(19), R.PASS_TRUNCATED),
    _pass("4 bytes of udp header pass", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4, proto=17) / Raw(bytes(UDP(sport=40401, dport=53))[:4]), R.PASS_TRUNCATED),
    _pass("a truncated v4 header passes", _eth(0x0800) / Raw(bytes(IP(src=CLIENT4, dst=V4, proto=6))[:12]),
          R.PASS_TRUNCATED),
    _pass("a truncated v6 header passes", _eth(0x86DD) / Raw(bytes(IPv6(src=CLIENT6, dst=V6, nh=6))[:30]),
          R.PASS_TRUNCATED),
    _pass("a truncated vlan tag passes", _eth(0x8100) / Raw(b"\x00\x2a"), R.PASS_TRUNCATED),
    _pass("v4 with ihl < 5 passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4, ihl=4) / TCP(sport=40501, dport=80, flags="S"), R.PASS_BAD_HEADER),
    _pass("a v6 header under the v4 ethertype passes",
          _eth(0x0800) / IPv6(src=CLIENT6, dst=V6) / TCP(sport=40502, dport=80, flags="S"), R.PASS_BAD_HEADER),
    _pass("a v4 header under the v6 ethertype passes",  # 40 bytes, so that the v6 bounds check holds
          _eth(0x86DD) / IP(src=CLIENT4, dst=V4) / TCP(sport=40503, dport=80, flags="S"), R.PASS_BAD_HEADER),
    _pass("tcp with data offset < 5 passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4) / TCP(sport=40504, dport=80, flags="S", dataofs=4), R.PASS_BAD_HEADER),
    # --- not addressed to the balancer (bpf/guard.h: addressed_to_us) ---------------------------
    _pass("a vip frame to the broadcast mac passes", tcp(V4, 80, 40701, dst_mac="ff:ff:ff:ff:ff:ff"),
          R.PASS_NOT_FOR_US),
    _pass("a vip frame to a v4 multicast mac passes", udp(V4, 53, 40702, dst_mac="01:00:5e:00:00:01"),
          R.PASS_NOT_FOR_US),
    _pass("a vip frame to a v6 multicast mac passes", tcp(V6, 80, 40703, dst_mac="33:33:00:00:00:01"),
          R.PASS_NOT_FOR_US),
    _pass("a vip frame to another host's unicast mac passes", tcp(V4, 80, 40704, dst_mac="02:aa:bb:cc:dd:ee"),
          R.PASS_NOT_FOR_US),
    _pass("a vip frame to a mac differing from ours in its last byte passes",
          tcp(V6, 80, 40705, dst_mac="02:00:00:00:00:03"), R.PASS_NOT_FOR_US),
    _pass("a tagged vip frame to another host's mac passes",
          tcp(V4, 80, 40706, vlan=42, dst_mac="02:aa:bb:cc:dd:ee"), R.PASS_NOT_FOR_US),
    # --- lengths that disagree with the frame (bpf/parse.h) -------------------------------------
    _pass("v4 total length past the end of the frame passes", tcp(V4, 80, 40801, len=100), R.PASS_BAD_IP_LEN),
    _pass("v4 total length smaller than the ip header passes", tcp(V4, 80, 40802, len=19), R.PASS_BAD_IP_LEN),
    _pass("v4 total length 0 passes", tcp(V4, 80, 40803, len=0), R.PASS_BAD_IP_LEN),
    _pass("v6 payload length past the end of the frame passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=V6, plen=21) / TCP(sport=40804, dport=80),
          R.PASS_BAD_IP_LEN),
    _pass("v6 payload length 0 (a jumbogram without its hop-by-hop header) passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=V6, plen=0) / TCP(sport=40805, dport=80),
          R.PASS_BAD_IP_LEN),
    _pass("v4 total length that leaves no room for the tcp header passes (the rest is padding)",
          tcp(V4, 80, 40806, len=30), R.PASS_BAD_TCP_LEN),
    _pass("tcp data offset past the ip payload passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4) / TCP(sport=40807, dport=80, dataofs=15),
          R.PASS_BAD_TCP_LEN),
    _pass("v6 tcp data offset past the ip payload passes",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=V6) / TCP(sport=40808, dport=80, dataofs=6),
          R.PASS_BAD_TCP_LEN),
    _pass("udp length < 8 passes", Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4) /
          UDP(sport=40809, dport=53, len=7) / Raw(b"query"), R.PASS_BAD_UDP_LEN),
    _pass("udp length longer than the ip payload passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4) / UDP(sport=40810, dport=53, len=100) / Raw(b"query"), R.PASS_BAD_UDP_LEN),
    _pass("udp length shorter than the ip payload passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IP(src=CLIENT4, dst=V4) / UDP(sport=40811, dport=53, len=9) / Raw(b"query"), R.PASS_BAD_UDP_LEN),
    _pass("v6 udp length inconsistent with the payload length passes", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IPv6(src=CLIENT6, dst=V6) / UDP(sport=40812, dport=53, len=12) / Raw(b"query"), R.PASS_BAD_UDP_LEN),
    _pass("udp length 0 in a v4 packet whose total length leaves no payload passes",
          tcp(V4, 53, 40815, proto=17, len=20), R.PASS_BAD_UDP_LEN),  # found by scripts/fuzz_datapath.py
    _pass("v4 ttl 0 passes", tcp(V4, 80, 40813, ttl=0), R.PASS_TTL_ZERO),
    _pass("v6 hop limit 0 passes", Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=V6, hlim=0) /
          UDP(sport=40814, dport=53) / Raw(b"query"), R.PASS_TTL_ZERO),
    # --- sources that cannot be a client (bpf/guard.h: plausible_source) ------------------------
    *[_drop_source(f"a vip frame from {src} is dropped", src, dst, 40900 + i) for i, (src, dst) in enumerate([
        ("0.0.0.0", V4), ("0.1.2.3", V4), ("127.0.0.1", V4), ("127.255.0.9", V4), ("255.255.255.255", V4),
        ("224.0.0.1", V4), ("239.1.2.3", V4), ("240.0.0.1", V4), (V4, V4),
        ("::", V6), ("::1", V6), ("ff02::1", V6), ("ff0e::9", V6), ("::ffff:192.0.2.10", V6), (V6, V6),
    ])],
    # --- dropped --------------------------------------------------------------------------------
    Case("a syn to a vip with no backend is dropped", tcp(str(EMPTY4.address), 80, 40601), XDP_DROP,
         reason=R.DROP_NO_BACKEND),
    _pass("a syn to a vip with no backend and on_all_down = pass goes to the kernel",
          tcp(str(PASSEMPTY4.address), 80, 40602), R.PASS_NO_BACKEND),
]


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_case(lb: Lb, case: Case) -> None:
    check(lb, case)
    if case.verdict != XDP_TX:  # a frame that is not forwarded never creates flow state
        assert lb.maps.flow_count() == 0, f"{case.desc}: inserted a connection-table entry"


def test_unset_own_mac_forwards_nothing(lb: Lb) -> None:
    """Before the control plane has written lbx_ctl (or after it cleared it) nothing is forwarded,
    not even a frame to an all-zero MAC: fail closed."""
    lb.maps.set_own_mac(None)
    assert lb.maps.own_mac() is None
    for case in (_pass("a syn to a vip while the program knows no own mac passes", tcp(V4, 80, 41001),
                       R.PASS_NO_OWN_MAC),
                 _pass("a frame to the all-zero mac while the program knows no own mac passes",
                       udp(V6, 53, 41002, dst_mac="00:00:00:00:00:00"), R.PASS_NO_OWN_MAC)):
        check(lb, case)
    assert lb.maps.flow_count() == 0
    lb.maps.set_own_mac("00:00:00:00:00:00")   # an all-zero MAC is no MAC
    assert lb.maps.own_mac() is None
    check(lb, _pass("still nothing with an all-zero mac", tcp(V4, 80, 41003), R.PASS_NO_OWN_MAC))
    lb.maps.set_own_mac(LB_MAC)
    check(lb, _tx("forwarded again once the mac is set", tcp(V4, 80, 41004), WEB4))


def test_forwarded_frame_leaves_from_our_mac(lb: Lb) -> None:
    """The source MAC of a forwarded frame is the balancer's own (the one lbx_ctl holds)."""
    out = check(lb, _tx("syn", tcp(V4, 80, 41101), WEB4))
    assert out[6:12] == bytes.fromhex(LB_MAC.replace(":", ""))


def test_unknown_mode_is_dropped_and_counted(lb: Lb) -> None:
    """A backend entry whose mode this program does not know drops the frame under its own reason,
    for a new flow and for an established one, instead of forwarding it as DSR. The value is
    written raw (the model cannot produce it): what a newer or broken control plane could leave."""
    check(lb, _tx("established first", tcp(V4, 80, 41201), WEB4))
    ids = [lb.backend_id(WEB4, b) for b in WEB4.backends]
    for bid in ids:
        entry = lb.maps.be_map.lookup(bid)
        entry.mode = 200
        lb.maps.be_map.update(bid, entry)
    check(lb, Case("the established flow's entry has an unknown mode", tcp(V4, 80, 41201), XDP_DROP,
                   reason=R.DROP_UNKNOWN_MODE))
    lb.clear_flows()
    check(lb, Case("a new flow to an entry with an unknown mode", tcp(V4, 80, 41202), XDP_DROP,
                   reason=R.DROP_UNKNOWN_MODE))
    lb.apply(BASE)   # the control plane writes the VIP's mode again
    assert {lb.maps.backends()[bid].mode for bid in ids} == {abi.FwdMode.DSR}
    lb.clear_flows()
    lb.maps.reset_vip_counters(lb.vip_id(WEB4))   # round robin back at slot 0
    check(lb, _tx("forwarded again once the entry holds a known mode", tcp(V4, 80, 41203), WEB4))


def test_unknown_scheduler_is_dropped_and_counted(lb: Lb) -> None:
    """A VIP whose scheduler this program does not know drops new flows under their own reason
    (before this, any value other than round robin hashed). Written raw, like the mode above."""
    key = lb.maps.vip_key(WEB4.key)
    meta = lb.maps.vip_map.lookup(key)
    good = meta.sched
    meta.sched = 77
    lb.maps.vip_map.update(key, meta)
    try:
        check(lb, Case("a new flow to a vip with an unknown scheduler", tcp(V4, 80, 41301), XDP_DROP,
                       reason=R.DROP_UNKNOWN_SCHED))
        assert lb.maps.flow_count() == 0
    finally:
        meta.sched = good
        lb.maps.vip_map.update(key, meta)
    check(lb, _tx("forwarded again with its scheduler back", tcp(V4, 80, 41302), WEB4))


# Exits that no frame can reach while the maps hold what the control plane writes.
UNREACHABLE_FROM_A_FRAME = {
    R.DROP_BACKEND_GONE: "needs a live table slot naming a deactivated backend: only in the instant "
                         "between two of the control plane's map writes (provoked on purpose in "
                         "test_flows.py::test_slot_naming_a_deleted_backend_drops)",
    R.ABORT_REWRITE: "forward_dsr() re-checks the Ethernet header bounds that parse_packet() has "
                     "already checked for every frame that gets this far",
}


# Exits covered by a test of their own instead of a row (they need other map contents).
OUTSIDE_THE_TABLE = {R.PASS_NO_OWN_MAC: "test_unset_own_mac_forwards_nothing",
                     R.DROP_UNKNOWN_MODE: "test_unknown_mode_is_dropped_and_counted",
                     R.DROP_UNKNOWN_SCHED: "test_unknown_scheduler_is_dropped_and_counted",
                     R.TX_ICMP_STEERED: "test_icmp.py (needs a flow first)",
                     R.PASS_ICMP_STEER_OFF: "test_icmp.py::test_steering_switched_off_passes_errors",
                     R.TX_ICMP_TOO_BIG: "test_encap.py (needs an encap VIP with an mtu)",
                     R.DROP_TOO_BIG: "test_encap.py::test_oversize_v4_without_df_is_dropped",
                     R.DROP_NO_OWN_ADDR: "test_encap.py::test_no_own_address_drops",
                     R.DROP_SRC_RATE: "test_admission.py (needs a limit)",
                     R.DROP_ACL_DENY: "test_admission.py (needs rules)",
                     R.DROP_ACL_NOT_ALLOWED: "test_admission.py (needs rules)",
                     R.TX_NAT_REPLY: "test_nat.py (needs a NAT connection)",
                     R.TX_NAT_ICMP_REPLY: "test_nat.py (needs a NAT connection)",
                     R.PASS_NAT_NO_FLOW: "test_nat.py (needs a NAT VIP's backends)",
                     R.DROP_NAT_NO_PORT: "test_nat.py::test_pool_exhaustion_drops_and_counts",
                     R.DROP_NAT_TUPLE_TAKEN: "test_nat.py (needs two NAT VIPs sharing a backend)",
                     R.PASS_NAT_ICMP_NO_FLOW: "test_nat.py (needs a NAT VIP)",
                     R.DROP_BACKENDS_FULL: "test_sched.py::test_all_backends_full_follows_on_all_down",
                     R.PASS_BACKENDS_FULL: "test_sched.py::test_all_backends_full_follows_on_all_down"}


def test_every_exit_reason_has_a_row() -> None:
    from .test_icmp import ICMP_CASES   # the ICMP rows' own table

    covered = {c.reason for c in CASES + ICMP_CASES} | OUTSIDE_THE_TABLE.keys()
    assert not covered & UNREACHABLE_FROM_A_FRAME.keys(), "a reason listed as unreachable has a row"
    missing = set(R.exits()) - covered - UNREACHABLE_FROM_A_FRAME.keys()
    assert not missing, f"exit reasons with no table row: {sorted(r.name for r in missing)}"

