"""lbxdp_decap (bpf/decap.c) through BPF_PROG_TEST_RUN: one frame in, the exact frame out, one
reason counter up, as in test_cases.py. The program is compiled and filled by lbxdp.decap's own
functions (build_table, program_defines, stage, flip), as `lbxdp decap attach` does it, once per
configuration, and every test runs twice: addresses compiled in as constants, and the table.

An accepted tunnel packet must come out as exactly its inner packet behind the same MACs (and
VLAN tag), with the inner EtherType; every refused one must come out byte for byte unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from lbxdp import abi, bpfsys, decap, loader

from .frames import VERDICT_NAMES, XDP_PASS
from .harness import decode, hexdiff

pytestmark = pytest.mark.root
D = abi.DecapReason

BE_MAC, GW_MAC = "02:00:00:00:0b:01", "02:00:00:00:0a:01"
LB4, LB6 = "192.0.2.1", "2001:db8::1"          # the balancer: outer source
BE4, BE6 = "192.0.2.50", "2001:db8::50"        # this backend: outer destination (host addresses)
OTHER_HOST4, OTHER_HOST6 = "192.0.2.51", "2001:db8::51"
VIP4, VIP6 = "10.10.0.1", "fd10::1"
NOVIP4, NOVIP6 = "10.10.0.99", "fd10::99"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:c::7"
GUE = 6080


@dataclass
class Decap:
    """lbxdp_decap as `lbxdp decap attach` makes it, reconfigurable: configure() writes the
    table half the current program does not read and switches to a program compiled for it
    (decap.program_defines), compiled once per configuration. Every program of one Decap shares
    the maps (the same pin dir), so counters carry over. const_addrs: how many addresses of a
    family are compiled in as constants (0: every lookup goes through the table)."""

    pin_dir: Path
    const_addrs: int
    progs: dict[tuple[str, ...], loader.Program] = field(default_factory=dict)
    prog: loader.Program | None = None
    runner: bpfsys.TestRunner | None = None
    config: tuple | None = None

    @property
    def maps(self) -> dict[str, bpfsys.Map]:
        assert self.prog is not None
        return self.prog.maps

    def program(self, defines: tuple[str, ...]) -> loader.Program:
        if defines not in self.progs:
            self.progs[defines] = loader.compile_program(loader.BuildConfig(self.pin_dir, defines=defines), loader.DECAP)
        return self.progs[defines]

    def configure(self, vips: list[str], loose: bool = False, gue_port: int = GUE) -> None:
        """What decap.attach writes: host addresses BE4/BE6, the VIPs, the port and mode."""
        config = (tuple(vips), loose, gue_port)
        if config == self.config:
            return
        ids = {ipaddress.ip_address(v): i for i, v in enumerate(vips)}
        entries = [decap.Entry(ipaddress.ip_address(a), abi.DECAP_F_HOST) for a in (BE4, BE6)] + \
                  [decap.Entry(a, abi.DECAP_F_VIP, i) for a, i in ids.items()]
        table = decap.build_table(entries)
        half = 1 - self.maps[abi.DecapMap.CTL].lookup(0).active if self.prog is not None else 1
        prog = self.program(decap.program_defines(table, gue_port, loose, half, self.const_addrs))
        decap.flip(prog.maps, decap.stage(prog.maps, table, gue_port, loose, half))
        self.prog, self.runner, self.config = prog, bpfsys.TestRunner(prog.fd), config

    def reasons(self) -> dict[D, tuple[int, int]]:
        return decap.reason_counts(self.maps)

    def vip_packets(self, vip_id: int) -> int:
        return decap._sum(self.maps[abi.DecapMap.VIP_STATS].lookup(vip_id))[0]

    def close(self) -> None:
        for p in self.progs.values():
            p.close()


@pytest.fixture(scope="module", params=[decap.CONST_ADDRS, 0], ids=["constants", "table"])
def compiled_decap(request: pytest.FixtureRequest) -> Iterator[Decap]:
    """bpf/decap.c as attach compiles it, twice over: with the small address sets compiled in
    as constants (what attach does for up to decap.CONST_ADDRS addresses a family) and with
    every lookup through the table (what it does for more); its own pin dir, removed always,
    even when compiling fails. Root, bpffs and bcc needed."""
    if os.geteuid() != 0:
        pytest.skip("the datapath tests load an XDP program: run them as root")
    dc = Decap(Path(f"/sys/fs/bpf/lbxdp-test-{uuid.uuid4().hex[:12]}"), request.param)
    try:
        dc.configure([VIP4, VIP6])
        yield dc
    finally:
        dc.close()
        shutil.rmtree(dc.pin_dir, ignore_errors=True)


@pytest.fixture
def dc(compiled_decap: Decap) -> Decap:
    compiled_decap.configure([VIP4, VIP6])
    return compiled_decap


# --- frames -------------------------------------------------------------------------------------

def eth(ethertype: int | None = None, vlan: int | None = None) -> Packet:
    e = Ether(dst=BE_MAC, src=GW_MAC) if ethertype is None else Ether(dst=BE_MAC, src=GW_MAC, type=ethertype)
    return e / Dot1Q(vlan=vlan) if vlan is not None else e


def inner_tcp4(dst: str = VIP4, **kw) -> Packet:
    return IP(src=CLIENT4, dst=dst, **kw) / TCP(sport=40001, dport=80, flags="S", seq=1000)


def inner_udp6(dst: str = VIP6) -> Packet:
    return IPv6(src=CLIENT6, dst=dst) / UDP(sport=40002, dport=53) / Raw(b"query")


def outer4(dst: str = BE4, **kw) -> Packet:
    return IP(src=LB4, dst=dst, ttl=64, **kw)


def outer6(dst: str = BE6, **kw) -> Packet:
    return IPv6(src=LB6, dst=dst, hlim=64, **kw)


def gue(sport: int = 50000, dport: int = GUE) -> Packet:
    return UDP(sport=sport, dport=dport)


GUE0 = Raw(b"\x00\x04\x00\x00")     # variant 0, hlen 0, proto IPIP, flags 0
GUE0_V6 = Raw(b"\x00\x29\x00\x00")  # variant 0, proto IPv6


def stripped(inner: Packet, ethertype: int, vlan: int | None = None, tail: bytes = b"") -> bytes:
    """What decapsulation must leave: the same MACs (and tag), the inner EtherType, the inner
    packet's bytes exactly as they were inside the tunnel."""
    if vlan is not None:
        l2 = bytes(Ether(dst=BE_MAC, src=GW_MAC, type=0x8100)) + bytes(Dot1Q(vlan=vlan, type=ethertype))[:4]
    else:
        l2 = bytes(Ether(dst=BE_MAC, src=GW_MAC, type=ethertype))
    return l2 + bytes(inner) + tail


@dataclass(frozen=True)
class Row:
    desc: str
    frame: bytes
    reason: D
    expect: bytes | None = None   # None: unchanged
    vip_id: int | None = None     # the per-VIP counter that must go up by one


def ok(desc: str, pkt: Packet | bytes, inner: Packet, ethertype: int, vip_id: int, vlan: int | None = None,
       tail: bytes = b"") -> Row:
    return Row(desc, bytes(pkt) + tail, D.PASS_DECAP, stripped(inner, ethertype, vlan, tail), vip_id)


def refused(desc: str, pkt: Packet | bytes, reason: D) -> Row:
    return Row(desc, bytes(pkt), reason)


IPV4, IPV6 = 0x0800, 0x86DD
T4, U6 = inner_tcp4(), inner_udp6()

ROWS = [
    # --- accepted: stripped to exactly the inner frame -------------------------------------------
    ok("ipip: v4 in v4", eth() / outer4() / T4, T4, IPV4, 0),
    ok("ip6ip6: v6 in v6", eth() / outer6() / U6, U6, IPV6, 1),
    ok("4-in-6: v4 in v6, the ethertype becomes ipv4", eth() / outer6() / T4, T4, IPV4, 0),
    ok("6-in-4: v6 in v4, the ethertype becomes ipv6", eth() / outer4() / U6, U6, IPV6, 1),
    ok("gue variant 1 over v4, v4 inside", eth() / outer4() / gue() / T4, T4, IPV4, 0),
    ok("gue variant 1 over v6, v6 inside", eth() / outer6() / gue() / U6, U6, IPV6, 1),
    ok("gue variant 1 over v6, v4 inside", eth() / outer6() / gue() / T4, T4, IPV4, 0),
    ok("gue variant 0 (4-byte header) over v4, v4 inside", eth() / outer4() / gue() / GUE0 / T4, T4, IPV4, 0),
    ok("gue variant 0 over v6, v6 inside", eth() / outer6() / gue() / GUE0_V6 / U6, U6, IPV6, 1),
    ok("a vlan tag is kept; the tag's type becomes the inner one", eth(vlan=42) / outer6() / T4, T4, IPV4, 0, vlan=42),
    ok("an inner fragment to a vip is delivered (the stack reassembles)",
       eth() / outer4() / inner_tcp4(flags="MF", id=7), inner_tcp4(flags="MF", id=7), IPV4, 0),
    ok("ethernet padding after the outer packet stays behind the inner one",
       eth() / outer4() / T4, T4, IPV4, 0, tail=bytes(6)),
    # IPIP over IPv4 has a one-test parse (decap_parse.h: parse_ipip4); these leave it for the
    # full parse, which must open them all the same
    ok("ipip with a vlan tag", eth(vlan=7) / outer4() / T4, T4, IPV4, 0, vlan=7),
    ok("ipip whose inner header has options",
       eth() / outer4() / inner_tcp4(options=[IPOption_Router_Alert()]), inner_tcp4(options=[IPOption_Router_Alert()]),
       IPV4, 0),
    # GUE over IPv6 has a one-test parse too (parse_gue6): the same for its edges
    ok("gue over v6 with a vlan tag", eth(vlan=5) / outer6() / gue() / U6, U6, IPV6, 1, vlan=5),
    ok("gue over v6: padding after the outer packet stays", eth() / outer6() / gue() / U6, U6, IPV6, 1,
       tail=bytes(6)),
    refused("gue over v6: inner destination is no vip", eth() / outer6() / gue() / inner_udp6(NOVIP6), D.PASS_NOT_VIP),
    refused("gue over v6: udp length disagrees with the outer packet",
            eth() / outer6() / UDP(sport=50000, dport=GUE, len=200) / U6, D.PASS_TRUNCATED_OUTER),
    refused("gue over v6: inner payload length past the outer packet",
            eth() / outer6() / gue() / IPv6(src=CLIENT6, dst=VIP6, plen=400) / UDP(dport=53), D.PASS_TRUNCATED_INNER),
    refused("gue over v6 behind a hop-by-hop header (not walked)", eth() / outer6() / IPv6ExtHdrHopByHop() / gue() / U6,
            D.PASS_NOT_TUNNEL),
    # --- refused: passed unchanged, counted ------------------------------------------------------
    refused("inner destination is no vip (strict)", eth() / outer4() / inner_tcp4(NOVIP4), D.PASS_NOT_VIP),
    refused("v6 inner destination is no vip (strict)", eth() / outer6() / inner_udp6(NOVIP6), D.PASS_NOT_VIP),
    refused("inner destination is a host address, not a vip", eth() / outer4() / inner_tcp4(BE4), D.PASS_NOT_VIP),
    refused("outer destination is not this host (v4)", eth() / outer4(OTHER_HOST4) / T4, D.PASS_NOT_LOCAL),
    refused("outer destination is not this host (v6)", eth() / outer6(OTHER_HOST6) / gue() / U6, D.PASS_NOT_LOCAL),
    refused("outer destination is a vip, not a host address", eth() / outer4(VIP4) / T4, D.PASS_NOT_LOCAL),
    refused("outer v4 first fragment (MF)", eth() / outer4(flags="MF", id=9) / T4, D.PASS_OUTER_FRAGMENT),
    refused("outer v4 later fragment", eth() / outer4(frag=100, proto=4, id=9) / Raw(bytes(40)),
            D.PASS_OUTER_FRAGMENT),
    refused("outer v4 first fragment of gue", eth() / outer4(flags="MF", id=9) / gue() / T4, D.PASS_OUTER_FRAGMENT),
    refused("outer v6 fragment of ip6ip6", eth() / outer6() / IPv6ExtHdrFragment(id=9, m=1) / U6,
            D.PASS_OUTER_FRAGMENT),
    refused("outer v6 first fragment of gue", eth() / outer6() / IPv6ExtHdrFragment(id=9, m=1) / gue() / U6,
            D.PASS_OUTER_FRAGMENT),
    refused("outer v4 options", eth() / outer4(options=[IPOption_Router_Alert()]) / T4, D.PASS_OUTER_OPTIONS),
    refused("outer v4 options on gue", eth() / outer4(options=[IPOption_Router_Alert()]) / gue() / T4,
            D.PASS_OUTER_OPTIONS),
    refused("truncated outer v4 header", eth(IPV4) / Raw(bytes(outer4(proto=4))[:12]), D.PASS_TRUNCATED_OUTER),
    refused("truncated outer v6 header", eth(IPV6) / Raw(bytes(outer6(nh=41))[:30]), D.PASS_TRUNCATED_OUTER),
    refused("outer total length past the frame", eth() / outer4(len=200) / T4, D.PASS_TRUNCATED_OUTER),
    refused("outer payload length past the frame", eth() / outer6(plen=300) / U6, D.PASS_TRUNCATED_OUTER),
    refused("gue udp length disagrees with the outer packet", eth() / outer4() / UDP(dport=GUE, len=200) / T4,
            D.PASS_TRUNCATED_OUTER),
    refused("truncated inner v4 header", eth() / outer4(proto=4) / Raw(bytes(T4)[:10]), D.PASS_TRUNCATED_INNER),
    refused("truncated inner v6 header", eth() / outer6(nh=41) / Raw(bytes(U6)[:30]), D.PASS_TRUNCATED_INNER),
    refused("inner total length past the outer packet", eth() / outer4() / inner_tcp4(len=400),
            D.PASS_TRUNCATED_INNER),
    refused("ipip announcing v4 carrying v6", eth() / outer4(proto=4) / U6, D.PASS_BAD_INNER),
    refused("ipip: inner total length shorter than its header", eth() / outer4() / inner_tcp4(len=12),
            D.PASS_BAD_INNER),
    refused("gue on another udp port is no tunnel", eth() / outer4() / gue(dport=6081) / T4, D.PASS_NOT_TUNNEL),
    refused("gue variant 0 with optional fields", eth() / outer4() / gue() / Raw(b"\x01\x04\x00\x00" + bytes(4)) / T4,
            D.PASS_GUE_UNSUPPORTED),
    refused("gue variant 0 control message", eth() / outer4() / gue() / Raw(b"\x20\x00\x00\x00") / T4,
            D.PASS_GUE_UNSUPPORTED),
    refused("gue variant 0 with flags", eth() / outer4() / gue() / Raw(b"\x00\x04\x80\x00") / T4,
            D.PASS_GUE_UNSUPPORTED),
    refused("gue variant 0 carrying tcp (proto 6)", eth() / outer4() / gue() / Raw(b"\x00\x06\x00\x00") / T4,
            D.PASS_GUE_UNSUPPORTED),
    refused("gue variant 2", eth() / outer4() / gue() / Raw(b"\x80\x04\x00\x00") / T4, D.PASS_GUE_UNSUPPORTED),
    refused("gue variant 1 with ip version 5", eth() / outer4() / gue() / Raw(b"\x55" + bytes(T4)[1:]),
            D.PASS_GUE_UNSUPPORTED),
    # --- not a tunnel: untouched after a parse ---------------------------------------------------
    refused("tcp to this host", eth() / IP(src=CLIENT4, dst=BE4) / TCP(dport=22, flags="S"), D.PASS_NOT_TUNNEL),
    refused("tcp to a vip (dsr traffic, no tunnel)", eth() / T4, D.PASS_NOT_TUNNEL),
    refused("udp to this host on another port", eth() / IP(src=CLIENT4, dst=BE4) / UDP(dport=53), D.PASS_NOT_TUNNEL),
    refused("v6 udp to this host", eth() / IPv6(src=CLIENT6, dst=BE6) / UDP(dport=53), D.PASS_NOT_TUNNEL),
    refused("arp", Ether(dst="ff:ff:ff:ff:ff:ff", src=GW_MAC) / ARP(psrc=LB4, pdst=BE4), D.PASS_NOT_TUNNEL),
]


def _run(dc: Decap, row: Row) -> None:
    before, vip_before = dc.reasons(), dc.vip_packets(row.vip_id) if row.vip_id is not None else 0
    got = dc.runner.run(row.frame)
    after = dc.reasons()
    delta = {r: (after[r][0] - before[r][0], after[r][1] - before[r][1]) for r in after if after[r] != before[r]}
    want = row.frame if row.expect is None else row.expect
    problems = []
    if got.retval != XDP_PASS:
        problems.append(f"verdict {VERDICT_NAMES.get(got.retval, got.retval)}, expected XDP_PASS")
    if got.data != want:
        problems.append("output frame differs")
    if delta != {row.reason: (1, len(row.frame))}:
        problems.append(f"reason counters moved by {delta}, expected {row.reason.name} +1/+{len(row.frame)} B")
    if row.vip_id is not None and dc.vip_packets(row.vip_id) != vip_before + 1:
        problems.append(f"vip {row.vip_id}'s packet counter did not go up by one")
    if problems:
        pytest.fail("\n".join([f"case: {row.desc}", *problems, "--- got", decode(got.data), "--- expected",
                               decode(want), hexdiff(got.data, want)]), pytrace=False)


@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_decap_row(dc: Decap, row: Row) -> None:
    _run(dc, row)


def test_every_reason_but_adjust_has_a_row() -> None:
    covered = {r.reason for r in ROWS}
    assert set(D.exits()) - covered == {D.PASS_ADJUST_FAILED}


def test_loose_accepts_any_inner_destination(compiled_decap: Decap) -> None:
    try:
        compiled_decap.configure([VIP4], loose=True)
        pkt = eth() / outer4() / inner_tcp4(NOVIP4)
        _run(compiled_decap, Row("loose: non-vip inner", bytes(pkt), D.PASS_DECAP, stripped(inner_tcp4(NOVIP4), IPV4)))
        # ...but still only tunnels to this host
        _run(compiled_decap, Row("loose: not to this host", bytes(eth() / outer4(OTHER_HOST4) / T4), D.PASS_NOT_LOCAL))
    finally:
        compiled_decap.configure([VIP4, VIP6])


def test_gue_port_is_the_configured_one(compiled_decap: Decap) -> None:
    try:
        compiled_decap.configure([VIP4, VIP6], gue_port=7777)
        _run(compiled_decap, Row("gue on the old port", bytes(eth() / outer4() / gue() / T4), D.PASS_NOT_TUNNEL))
        _run(compiled_decap, Row("gue on the new port", bytes(eth() / outer4() / gue(dport=7777) / T4), D.PASS_DECAP,
                                 stripped(T4, IPV4), 0))
        compiled_decap.configure([VIP4, VIP6], gue_port=0)
        _run(compiled_decap, Row("gue off: port 0 matches nothing", bytes(eth() / outer4() / UDP(dport=0) / T4),
                                 D.PASS_NOT_TUNNEL))
    finally:
        compiled_decap.configure([VIP4, VIP6])


def test_a_vip_removed_is_refused_at_once(compiled_decap: Decap) -> None:
    """The table flip: after configure() without VIP6, v6 inner packets are refused."""
    try:
        compiled_decap.configure([VIP4])
        _run(compiled_decap, Row("vip6 gone", bytes(eth() / outer6() / U6), D.PASS_NOT_VIP))
    finally:
        compiled_decap.configure([VIP4, VIP6])


def test_table_probes_like_the_program(compiled_decap: Decap) -> None:
    """Many VIPs whose home slots collide are all found (the Python placement and the C probe
    sequence agree); the control plane refuses a set that cannot be placed."""
    base = ipaddress.ip_address("10.20.0.0")
    by_slot: dict[int, list[str]] = {}
    for i in range(200000):
        a = base + i
        by_slot.setdefault(decap.home_slot(a), []).append(str(a))
    vips = max(by_slot.values(), key=len)[:abi.DECAP_PROBES - 2]   # same home slot, all of them
    assert len(vips) >= 3
    try:
        compiled_decap.configure(vips)
        for n, v in enumerate(vips):
            inner = inner_tcp4(v)
            _run(compiled_decap, Row(f"colliding vip {v}", bytes(eth() / outer4() / inner), D.PASS_DECAP,
                                     stripped(inner, IPV4), n))
    finally:
        compiled_decap.configure([VIP4, VIP6])
    too_many = max(by_slot.values(), key=len)[:abi.DECAP_PROBES + 1]
    if len(too_many) == abi.DECAP_PROBES + 1:
        with pytest.raises(Exception, match="collides"):
            decap.build_table([decap.Entry(ipaddress.ip_address(a), abi.DECAP_F_VIP) for a in too_many])


def test_more_vips_than_compiled_in(compiled_decap: Decap) -> None:
    """A set larger than decap.CONST_ADDRS is looked up in the table, the others still compiled
    in (in the constants variant): every VIP of both kinds is opened and counted as its own."""
    vips = [f"10.30.0.{i}" for i in range(1, decap.CONST_ADDRS + 2)] + [VIP6]
    entries = [decap.Entry(ipaddress.ip_address(a), abi.DECAP_F_HOST) for a in (BE4, BE6)] + \
              [decap.Entry(ipaddress.ip_address(v), abi.DECAP_F_VIP, i) for i, v in enumerate(vips)]
    defines = " ".join(decap.program_defines(decap.build_table(entries), GUE, False, 0, compiled_decap.const_addrs))
    assert "LBXD_VIPS4" not in defines
    assert ("LBXD_VIPS6" in defines and "LBXD_HOSTS4" in defines) == (compiled_decap.const_addrs > 0)
    try:
        compiled_decap.configure(vips)
        for n, v in enumerate(vips[:-1]):
            inner = inner_tcp4(v)
            _run(compiled_decap, Row(f"vip {v}", bytes(eth() / outer4() / inner), D.PASS_DECAP, stripped(inner, IPV4), n))
        _run(compiled_decap, Row("gue v6", bytes(eth() / outer6() / gue() / U6), D.PASS_DECAP, stripped(U6, IPV6),
                                 len(vips) - 1))
        _run(compiled_decap, Row("no vip", bytes(eth() / outer4() / inner_tcp4(NOVIP4)), D.PASS_NOT_VIP))
        _run(compiled_decap, Row("not this host", bytes(eth() / outer4(OTHER_HOST4) / T4), D.PASS_NOT_LOCAL))
    finally:
        compiled_decap.configure([VIP4, VIP6])


def test_program_defines_compile_in_small_sets_only() -> None:
    """What attach compiles: settings always, each set of up to CONST_ADDRS addresses as
    constants with the words the table holds, a larger one left out (the table)."""
    ip = ipaddress.ip_address
    table = decap.build_table([decap.Entry(ip(BE4), abi.DECAP_F_HOST), decap.Entry(ip(VIP6), abi.DECAP_F_VIP, 7)] +
                              [decap.Entry(ip(f"10.0.0.{i}"), abi.DECAP_F_VIP, i) for i in range(decap.CONST_ADDRS + 1)])
    d = decap.program_defines(table, 6080, True, 1)
    assert d[:3] == ("LBXD_HALF=1", "LBXD_GUE_PORT=0xc017", "LBXD_LOOSE=1")
    assert "LBXD_HOSTS4(X)=X(0x320200c0)" in d and "LBXD_HOSTS6(X)=" in d
    assert not any(x.startswith("LBXD_VIPS4") for x in d)
    assert "LBXD_VIPS6(X)=X(0x10fd,0x0,0x0,0x1000000,7)" in d
