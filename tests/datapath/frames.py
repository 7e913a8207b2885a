"""The addresses, VIPs and scapy frame builders that the datapath tests share.

Every VIP below has a job in exactly one family of tests, so no test depends on the state another
left behind (the connection table and round-robin positions are reset before each test anyway).
Backend MACs are given explicitly: these tests never resolve neighbours.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from lbxdp import model

# enum xdp_action (linux/bpf.h)
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = range(4)
VERDICT_NAMES = {XDP_ABORTED: "XDP_ABORTED", XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS", XDP_TX: "XDP_TX"}

LB_MAC = "02:00:00:00:00:01"      # the balancer's port: VIP traffic arrives addressed to it
CLIENT_MAC = "02:00:00:00:00:02"  # the router / client in front of it
CLIENT4 = "192.0.2.10"
CLIENT6 = "2001:db8::10"
OTHER4 = "198.51.100.7"           # an address that is no VIP
OTHER6 = "2001:db8:ffff::7"

ip = ipaddress.ip_address
TCP_, UDP_ = model.Protocol.TCP, model.Protocol.UDP


def backends(prefix: str, n: int, mac_tag: int, port: int = 8080) -> tuple[model.Backend, ...]:
    """n backends prefix+1.. with MACs 02:be:<tag>:00:00:<i> (unique per VIP)."""
    return tuple(model.Backend(ip(f"{prefix}{i + 1}"), port, mac=f"02:be:{mac_tag:02x}:00:00:{i + 1:02x}")
                 for i in range(n))


def vip(addr: str, port: int, proto: model.Protocol, backends: tuple[model.Backend, ...],
         sched: model.Scheduler = model.Scheduler.RR) -> model.Vip:
    return model.Vip(ip(addr), port, proto, scheduler=sched, backends=backends)


# One VIP per job. Addresses 10.10.0.x / fd10::x, backends 10.10.<x>.i / fd10:<x>::i.
WEB4 = vip("10.10.0.1", 80, TCP_, backends("10.10.1.", 3, 0x01))       # table cases, v4 TCP
DNS4 = vip("10.10.0.1", 53, UDP_, backends("10.10.2.", 2, 0x02))       # table cases, v4 UDP
WEB6 = vip("fd10::1", 80, TCP_, backends("fd10:1::", 3, 0x03))         # table cases, v6 TCP
DNS6 = vip("fd10::1", 53, UDP_, backends("fd10:2::", 2, 0x04))         # table cases, v6 UDP
EMPTY4 = vip("10.10.0.2", 80, TCP_, ())                                 # no backend: drop
HASH4 = vip("10.10.0.3", 80, TCP_, backends("10.10.3.", 4, 0x05), model.Scheduler.HASH)
RR4 = vip("10.10.0.4", 80, TCP_, backends("10.10.4.", 3, 0x06))        # rr distribution
CHURN4 = vip("10.10.0.5", 80, TCP_, backends("10.10.5.", 4, 0x07)[:3])  # backend set changes
CHURN4_SPARE = backends("10.10.5.", 4, 0x07)[3]                         # added by churn tests
STATS4 = vip("10.10.0.6", 80, TCP_, backends("10.10.6.", 2, 0x08))     # counters
GONE4 = vip("10.10.0.7", 80, TCP_, backends("10.10.7.", 1, 0x09))      # control-plane race
PASSEMPTY4 = dataclasses.replace(vip("10.10.0.20", 80, TCP_, ()), on_all_down="pass")  # no backend: pass

BASE = model.Config(vips=(WEB4, DNS4, WEB6, DNS6, EMPTY4, HASH4, RR4, CHURN4, STATS4, GONE4, PASSEMPTY4))


def with_backends(cfg: model.Config, target: model.Vip, bes: tuple[model.Backend, ...]) -> model.Config:
    """cfg with target's backend set replaced (the VIP keeps its key, so its id and flows)."""
    return model.Config(vips=tuple(dataclasses.replace(v, backends=bes) if v.key == target.key else v
                                   for v in cfg.vips))


def _l3(src: str | None, dst: str, **ip_fields) -> Packet:
    if ipaddress.ip_address(dst).version == 4:
        return IP(src=src or CLIENT4, dst=dst, **ip_fields)
    return IPv6(src=src or CLIENT6, dst=dst, **ip_fields)


def _l2(vlan: int | None, dst_mac: str) -> Packet:
    eth = Ether(src=CLIENT_MAC, dst=dst_mac)
    return eth / Dot1Q(vlan=vlan) if vlan is not None else eth


def tcp(dst: str, dport: int, sport: int, *, src: str | None = None, flags: str = "S",
        payload: bytes = b"", vlan: int | None = None, dst_mac: str = LB_MAC, **ip_fields) -> Packet:
    """A TCP segment from a client to dst:dport (a SYN unless flags say otherwise)."""
    pkt = _l2(vlan, dst_mac) / _l3(src, dst, **ip_fields) / TCP(sport=sport, dport=dport, flags=flags, seq=1000)
    return pkt / Raw(payload) if payload else pkt


def udp(dst: str, dport: int, sport: int, *, src: str | None = None, payload: bytes = b"query",
        vlan: int | None = None, dst_mac: str = LB_MAC) -> Packet:
    return _l2(vlan, dst_mac) / _l3(src, dst) / UDP(sport=sport, dport=dport) / Raw(payload)


def _csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data (even length)."""
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


TCP_FLAGS = {"S": 0x02, "A": 0x10, "PA": 0x18}


def tcp_bytes(dst: str, dport: int, sport: int, src: str, flags: str = "S") -> bytes:
    """bytes(tcp(dst, dport, sport, src=src, flags=flags)) for IPv4, built by hand: about 30
    times faster than scapy, for tests that send thousands of flows (test_tables.py checks that
    the two agree byte for byte)."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, TCP_FLAGS[flags], 8192, 0, 0)
    seg = seg[:16] + struct.pack("!H", _csum(s + d + struct.pack("!BBH", 0, 6, len(seg)) + seg)) + seg[18:]
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0, 64, 6, 0, s, d)
    iph = iph[:10] + struct.pack("!H", _csum(iph)) + iph[12:]
    return mac_bytes(LB_MAC) + mac_bytes(CLIENT_MAC) + b"\x08\x00" + iph + seg


def new_flows(dst: str, dport: int, n: int, first: int = 0, flags: str = "S") -> list[bytes]:
    """n segments to dst:dport from n distinct clients (64 source ports on each address of
    100.64.0.0/10), numbered from `first`: disjoint ranges make disjoint flows, and the same
    range with flags="A" makes the next segment of each of those flows."""
    return [tcp_bytes(dst, dport, 20000 + i % 64, str(ipaddress.IPv4Address(0x64400000 + i // 64)), flags)
            for i in range(first, first + n)]


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def icmp_echo(dst: str) -> Packet:
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=dst) / ICMP()


def forwarded(pkt: Packet, backend: model.Backend) -> bytes:
    """What DSR makes of pkt: dst MAC = the backend's, src MAC = the MAC the frame came to."""
    raw = bytes(pkt)
    assert backend.mac is not None
    return bytes.fromhex(backend.mac.replace(":", "")) + raw[0:6] + raw[12:]


def without(cfg: model.Config, *gone: model.Vip) -> model.Config:
    """cfg without the VIPs `gone`."""
    keys = {v.key for v in gone}
    return model.Config(vips=tuple(v for v in cfg.vips if v.key not in keys))


def plus(cfg: model.Config, *more: model.Vip) -> model.Config:
    return model.Config(vips=cfg.vips + more)
