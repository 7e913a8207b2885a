"""ICMP errors about a VIP flow are steered to the flow's backend (bpf/icmp.h); echo requests and
everything else are passed, each under its reason.

An error quotes the packet that caused it: in DSR the backend's reply, VIP:port -> client:port.
The program reverses that quoted tuple (client -> VIP) and looks it up like a packet of the flow:
the connection table first, the VIP's table otherwise (hash and Maglev find the same backend
again after the table is flushed; round robin cannot, and passes). The whole ICMP frame leaves
the way a packet of the flow would (DSR: only the MACs change); no connection-table entry is
ever inserted for it.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig,
                                ICMPv6TimeExceeded, IPv6, IPv6ExtHdrDestOpt)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lbxdp import abi, model

from .frames import (BASE, CLIENT4, CLIENT6, CLIENT_MAC, DNS4, HASH4, LB_MAC, OTHER4, OTHER6, WEB4, WEB6,
                     XDP_DROP, XDP_PASS, XDP_TX, backends, forwarded, plus, tcp, udp, vip)
from .harness import Case, Lb, check, one_cpu

pytestmark = pytest.mark.root
R = abi.Reason

V4, V6 = str(WEB4.address), str(WEB6.address)
ROUTER4 = "203.0.113.1"     # a router between the backends and the clients
ROUTER6 = "2001:db8:ff::1"
MAG4 = vip("10.10.0.30", 80, model.Protocol.TCP, backends("10.10.30.", 5, 0x30), model.Scheduler.MAGLEV)
MAG6 = vip("fd10::30", 443, model.Protocol.TCP, backends("fd10:30::", 5, 0x31), model.Scheduler.MAGLEV)
MAGU6 = vip("fd10::31", 53, model.Protocol.UDP, backends("fd10:31::", 3, 0x32), model.Scheduler.MAGLEV)


def _reply4(vip_addr: str, vport: int, client: str, cport: int, proto: str = "tcp", payload: bytes = b"") -> Packet:
    """The packet a backend sent the client from the VIP: what an error about the flow quotes."""
    l4 = TCP(sport=vport, dport=cport, flags="PA", seq=7000, ack=1001) if proto == "tcp" else UDP(sport=vport, dport=cport)
    return IP(src=vip_addr, dst=client, ttl=63, id=4242) / l4 / Raw(payload or b"x" * 1400)


def _reply6(vip_addr: str, vport: int, client: str, cport: int, proto: str = "tcp", payload: bytes = b"") -> Packet:
    l4 = TCP(sport=vport, dport=cport, flags="PA", seq=7000, ack=1001) if proto == "tcp" else UDP(sport=vport, dport=cport)
    return IPv6(src=vip_addr, dst=client, hlim=63) / l4 / Raw(payload or b"y" * 1400)


def err4(quote: Packet | bytes, *, type: int = 3, code: int = 4, mtu: int = 1280, src: str = ROUTER4,
         dst: str | None = None, n: int | None = None, dst_mac: str = LB_MAC) -> Packet:
    """An ICMPv4 error from src quoting the first n bytes of quote (RFC 792 routers: 28; Linux: 576 total)."""
    raw = bytes(quote)
    raw = raw[:n] if n is not None else raw[:548]
    qdst = dst if dst is not None else str(IP(raw[:20]).src)
    icmp = ICMP(type=type, code=code, nexthopmtu=mtu) if (type, code) == (3, 4) else ICMP(type=type, code=code)
    return Ether(src=CLIENT_MAC, dst=dst_mac) / IP(src=src, dst=qdst, ttl=64) / icmp / Raw(raw)


def err6(quote: Packet | bytes, *, kind=ICMPv6PacketTooBig, mtu: int = 1280, src: str = ROUTER6,
         dst: str | None = None, n: int | None = None) -> Packet:
    raw = bytes(quote)
    raw = raw[:n] if n is not None else raw[:1232]
    qdst = dst if dst is not None else str(IPv6(raw[:40]).src)
    icmp = kind(mtu=mtu) if kind is ICMPv6PacketTooBig else kind()
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=src, dst=qdst, hlim=64) / icmp / Raw(raw)


def _pass(desc: str, pkt, reason: abi.Reason) -> Case:
    return Case(desc, pkt, XDP_PASS, reason=reason)


# Rows that need no flow state: every one is passed or dropped, none inserts a flow.
ICMP_CASES = [
    # --- echo and other non-errors --------------------------------------------------------------
    _pass("an echo request to a v4 vip is passed (the kernel answers for its own addresses)",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4) / ICMP(type=8, id=7, seq=1) / Raw(b"ping"),
          R.PASS_ICMP_ECHO),
    _pass("an echo request to a v6 vip is passed",
          Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=V6) / ICMPv6EchoRequest(id=7, seq=1),
          R.PASS_ICMP_ECHO),
    _pass("an echo reply is the kernel's", Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=V4) /
          ICMP(type=0), R.PASS_NOT_L4),
    _pass("a redirect is not steered", err4(_reply4(V4, 80, CLIENT4, 42001), type=5, code=1), R.PASS_NOT_L4),
    _pass("a neighbour solicitation is the kernel's", Ether(src=CLIENT_MAC, dst=LB_MAC) /
          IPv6(src=CLIENT6, dst=V6, hlim=255) / ICMPv6ND_NS(tgt=V6), R.PASS_NOT_L4),
    # --- errors about no vip flow ---------------------------------------------------------------
    _pass("frag-needed quoting a flow of no vip passes", err4(_reply4(OTHER4, 80, CLIENT4, 42011)), R.PASS_NOT_VIP),
    _pass("packet-too-big quoting a flow of no vip passes", err6(_reply6(OTHER6, 80, CLIENT6, 42012)), R.PASS_NOT_VIP),
    _pass("frag-needed quoting a vip address on a port that is no vip passes",
          err4(_reply4(V4, 8080, CLIENT4, 42013)), R.PASS_NOT_VIP),
    _pass("frag-needed quoting udp from a tcp-only vip port passes (the vip's protocol differs)",
          err4(_reply4(V4, 80, CLIENT4, 42014, proto="udp")), R.PASS_NOT_VIP),
    _pass("frag-needed quoting gre from a vip address passes",
          err4(IP(src=V4, dst=CLIENT4, proto=47) / Raw(bytes(40))), R.PASS_ICMP_BAD_QUOTE),
    _pass("packet-too-big quoting icmpv6 from a vip address passes",
          err6(IPv6(src=V6, dst=CLIENT6) / ICMPv6EchoRequest() / Raw(bytes(40))), R.PASS_ICMP_BAD_QUOTE),
    # --- forged and unusable quotes -------------------------------------------------------------
    _pass("frag-needed with mtu 67 (below the v4 minimum of 68) passes, counted",
          err4(_reply4(V4, 80, CLIENT4, 42021), mtu=67), R.PASS_ICMP_MTU_TOO_SMALL),
    _pass("frag-needed with mtu 0 (a pre-RFC 1191 router, or an attack) passes",
          err4(_reply4(V4, 80, CLIENT4, 42022), mtu=0), R.PASS_ICMP_MTU_TOO_SMALL),
    _pass("packet-too-big with mtu 1279 (below the v6 minimum) passes, counted",
          err6(_reply6(V6, 80, CLIENT6, 42023), mtu=1279), R.PASS_ICMP_MTU_TOO_SMALL),
    _pass("a quote with only 4 bytes of its tcp header passes",
          err4(_reply4(V4, 80, CLIENT4, 42024), n=24), R.PASS_ICMP_BAD_QUOTE),
    _pass("a quote with only part of its ip header passes",
          err4(_reply4(V4, 80, CLIENT4, 42025), n=16, dst=V4), R.PASS_ICMP_BAD_QUOTE),
    _pass("a v6 quote with only 7 bytes of its udp header passes",
          err6(_reply6(str(MAGU6.address), 53, CLIENT6, 42026, proto="udp"), n=47), R.PASS_ICMP_BAD_QUOTE),
    _pass("a quote whose source is not the error's destination passes",
          err4(_reply4(V4, 80, CLIENT4, 42027), dst=str(HASH4.address)), R.PASS_ICMP_BAD_QUOTE),
    _pass("a quote of a later fragment (no ports) passes",
          err4(IP(src=V4, dst=CLIENT4, proto=6, frag=185, id=9) / Raw(bytes(64))), R.PASS_ICMP_BAD_QUOTE),
    _pass("a quoted v4 header with options passes, counted",
          err4(IP(src=V4, dst=CLIENT4, options=[IPOption_Router_Alert()]) / TCP(sport=80, dport=42028)),
          R.PASS_ICMP_QUOTE_EXT),
    _pass("a quoted v6 header with an extension header passes, counted",
          err6(IPv6(src=V6, dst=CLIENT6) / IPv6ExtHdrDestOpt() / TCP(sport=80, dport=42029)), R.PASS_ICMP_QUOTE_EXT),
    _pass("a v4 error from the quoted flow's client itself passes (only routers are steered)",
          err4(_reply4(V4, 80, CLIENT4, 42030), type=3, code=3, src=CLIENT4), R.PASS_ICMP_FROM_CLIENT),
    _pass("a v6 error from the quoted flow's client itself passes",
          err6(_reply6(V6, 80, CLIENT6, 42031), kind=ICMPv6DestUnreach, src=CLIENT6), R.PASS_ICMP_FROM_CLIENT),
    _pass("an error to another host's mac passes", err4(_reply4(V4, 80, CLIENT4, 42032), dst_mac="02:aa:bb:cc:dd:ee"),
          R.PASS_NOT_FOR_US),
    Case("an error from a loopback source is dropped", err4(_reply4(V4, 80, CLIENT4, 42033), src="127.0.0.1"),
         XDP_DROP, reason=R.DROP_BAD_SOURCE),
    Case("an error from the vip itself is dropped", err4(_reply4(V4, 80, CLIENT4, 42034), src=V4),
         XDP_DROP, reason=R.DROP_BAD_SOURCE),
    Case("a v6 error from a multicast source is dropped", err6(_reply6(V6, 80, CLIENT6, 42035), src="ff02::1"),
         XDP_DROP, reason=R.DROP_BAD_SOURCE),
    Case("an error quoting a flow to an impossible client is dropped",
         err4(_reply4(V4, 80, "127.0.0.9", 42036)), XDP_DROP, reason=R.DROP_BAD_SOURCE),
    # --- round robin without a table entry ------------------------------------------------------
    _pass("frag-needed about an unknown flow of a round-robin vip passes (no owner to reproduce)",
          err4(_reply4(V4, 80, CLIENT4, 42041)), R.PASS_ICMP_NO_FLOW),
    _pass("packet-too-big about an unknown flow of a round-robin vip passes",
          err6(_reply6(V6, 80, CLIENT6, 42042)), R.PASS_ICMP_NO_FLOW),
]


@pytest.mark.parametrize("case", ICMP_CASES, ids=[c.desc for c in ICMP_CASES])
def test_icmp_case(lb: Lb, case: Case) -> None:
    check(lb, case)
    assert lb.maps.flow_count() == 0, f"{case.desc}: inserted a connection-table entry"


def _mac_of(out: bytes) -> str:
    return out[0:6].hex(":")


def _backend_with_mac(v: model.Vip, mac: str) -> model.Backend:
    [b] = [b for b in v.backends if b.mac == mac]
    return b


def _steered(desc: str, err: Packet, be: model.Backend) -> Case:
    return Case(desc, err, XDP_TX, expect=forwarded(err, be), reason=R.TX_ICMP_STEERED)


# (description, the client's first packet, the error about the flow, quoted in full / in 8 bytes)
def _table_rows():
    c4, c6 = 42101, 42201
    rows = []
    for i, (desc, first, reply, mk) in enumerate([
        ("v4 tcp frag-needed", lambda p: tcp(V4, 80, p), lambda p: _reply4(V4, 80, CLIENT4, p), err4),
        ("v4 udp frag-needed", lambda p: udp(V4, 53, p), lambda p: _reply4(V4, 53, CLIENT4, p, "udp"), err4),
        ("v6 tcp packet-too-big", lambda p: tcp(V6, 80, p), lambda p: _reply6(V6, 80, CLIENT6, p), err6),
    ]):
        rows.append((f"{desc}, full quote", first, reply, mk, None, c4 + 10 * i))
        rows.append((f"{desc}, 8-byte quote", first, reply, mk, 48 if mk is err6 else 28, c4 + 10 * i + 5))
    rows.append(("v4 time exceeded", lambda p: tcp(V4, 80, p), lambda p: _reply4(V4, 80, CLIENT4, p),
                 lambda q, n=None: err4(q, type=11, code=0, n=n), None, c6))
    rows.append(("v6 time exceeded", lambda p: tcp(V6, 80, p), lambda p: _reply6(V6, 80, CLIENT6, p),
                 lambda q, n=None: err6(q, kind=ICMPv6TimeExceeded, n=n), 48, c6 + 10))
    rows.append(("v4 port unreachable from a router", lambda p: udp(V4, 53, p),
                 lambda p: _reply4(V4, 53, CLIENT4, p, "udp"), lambda q, n=None: err4(q, type=3, code=3, n=n), 28, c6 + 20))
    return rows


TABLE_ROWS = _table_rows()


@pytest.mark.parametrize("row", TABLE_ROWS, ids=[r[0] for r in TABLE_ROWS])
def test_error_follows_the_connection_table(lb: Lb, row) -> None:
    """Two flows of a round-robin VIP take slots 0 and 1; an error about the second goes to the
    second's backend (not slot 0, not the next rr slot), and inserts nothing."""
    desc, first, reply, mk, n, port = row
    with one_cpu():   # round-robin positions are per CPU
        out0 = lb.open(first(port)).data
        out1 = lb.open(first(port + 1)).data
        flows = lb.maps.flow_count()
        assert flows == 2
        [v] = [v for v in BASE.vips if any(b.mac == _mac_of(out1) for b in v.backends)]
        assert [_mac_of(out0), _mac_of(out1)] == [b.mac for b in v.backends[:2]]
        err = mk(reply(port + 1), n=n) if n is not None else mk(reply(port + 1))
        check(lb, _steered(f"{desc} about the second flow", err, v.backends[1]))
        assert lb.maps.flow_count() == flows, "an icmp error inserted a connection-table entry"
        # the error did not move the round-robin position: the next new flow takes slot 2
        out2 = lb.run(first(port + 2)).data
        assert _mac_of(out2) == v.backends[2 % len(v.backends)].mac


HASHED = [("v4 tcp maglev", MAG4, lambda p: tcp(str(MAG4.address), 80, p),
           lambda p, n: err4(_reply4(str(MAG4.address), 80, CLIENT4, p), n=n), 28),
          ("v4 tcp hash", HASH4, lambda p: tcp(str(HASH4.address), 80, p),
           lambda p, n: err4(_reply4(str(HASH4.address), 80, CLIENT4, p), n=n), 28),
          ("v6 tcp maglev packet-too-big", MAG6, lambda p: tcp(str(MAG6.address), 443, p),
           lambda p, n: err6(_reply6(str(MAG6.address), 443, CLIENT6, p), n=n), 48),
          ("v6 udp maglev dest unreachable", MAGU6, lambda p: udp(str(MAGU6.address), 53, p),
           lambda p, n: err6(_reply6(str(MAGU6.address), 53, CLIENT6, p, "udp"), kind=ICMPv6DestUnreach, n=n), 48)]


@pytest.mark.parametrize("row", HASHED, ids=[r[0] for r in HASHED])
def test_error_after_flush_goes_to_the_same_backend(lb: Lb, row) -> None:
    """With the connection table emptied (`lbxdp flows flush`, or another balancer with the same
    tables), a hash or Maglev VIP's table names the same backend for the error as it did for the
    flow, with a full and with an 8-byte quote; nothing is inserted."""
    desc, v, first, mkerr, short = row
    lb.apply(plus(BASE, MAG4, MAG6, MAGU6))
    owners = {}
    for p in range(42301, 42317):
        out = lb.open(first(p))
        assert out.retval == XDP_TX
        owners[p] = _backend_with_mac(v, _mac_of(out.data))
    assert len({b.mac for b in owners.values()}) > 1, "16 flows on one backend: the test shows nothing"
    for p, be in owners.items():
        check(lb, _steered(f"{desc}, connection table hit", mkerr(p, None), be))
    assert lb.clear_flows() == len(owners)
    for p, be in owners.items():
        check(lb, _steered(f"{desc}, after the flush, full quote", mkerr(p, None), be))
        check(lb, _steered(f"{desc}, after the flush, 8-byte quote", mkerr(p, short), be))
    assert lb.maps.flow_count() == 0, "an icmp error inserted a connection-table entry"


def test_steered_error_counts_for_the_backend_not_as_a_new_flow(lb: Lb) -> None:
    out = lb.run(tcp(V4, 80, 42401)).data
    owner = _backend_with_mac(WEB4, _mac_of(out))
    bid = lb.backend_id(WEB4, owner)
    before = lb.maps.backend_stats(bid)
    err = err4(_reply4(V4, 80, CLIENT4, 42401))
    check(lb, _steered("frag-needed", err, owner))
    after = lb.maps.backend_stats(bid)
    assert (after.packets - before.packets, after.bytes - before.bytes, after.new_flows - before.new_flows) == \
        (1, len(bytes(err)), 0)


def test_steering_switched_off_passes_errors(lb: Lb) -> None:
    """The test switch (lbx_ctl LBX_CTL_F_NO_ICMP_STEER) makes errors pass as before issue 10:
    the netns PMTU test uses it to show its transfers stall without steering."""
    lb.run(tcp(V4, 80, 42501))
    ctl = lb.maps.ctl_map.lookup(0)
    ctl.flags |= abi.CTL_F_NO_ICMP_STEER
    lb.maps.ctl_map.update(0, ctl)
    try:
        check(lb, _pass("frag-needed with steering off", err4(_reply4(V4, 80, CLIENT4, 42501)), R.PASS_ICMP_STEER_OFF))
    finally:
        ctl.flags &= ~abi.CTL_F_NO_ICMP_STEER
        lb.maps.ctl_map.update(0, ctl)
    out = lb.run(tcp(V4, 80, 42501)).data
    check(lb, _steered("steering on again", err4(_reply4(V4, 80, CLIENT4, 42501)), _backend_with_mac(WEB4, _mac_of(out))))
