#!/usr/bin/env python3
"""Mutation fuzz of the XDP data path: no forwarded frame may break the forwarding invariants.

Valid frames to the configured VIPs (IPv4/IPv6, TCP/UDP, with and without an 802.1Q tag, to the
balancer's MAC and to broadcast, multicast and other hosts' MACs) are mutated (random byte flips,
truncations, IP/UDP lengths and TCP data offsets rewritten, TTL / hop limit 0, impossible source
addresses, padding) and run one at a time through BPF_PROG_TEST_RUN on the program that the real
control plane filled (Balancer.apply, Maps.set_own_mac), like tests/datapath/harness.py does.
For every XDP_TX the input must have been:
  mac      addressed to the balancer's MAC
  ip_len   an IPv4 total length / IPv6 payload length that fits the frame (and covers the headers)
  l4_len   a TCP data offset inside the IP payload, a UDP length equal to it
  ttl      TTL / hop limit > 0
  source   a plausible unicast source (not 0/8, 127/8, 224/3, ::, ::1, ff00::/8, ::ffff:0:0/96,
           nor the destination itself)
  vip      destination address, port and protocol those of a configured VIP
  rewrite  and the output is the input with only the MACs changed (source = the balancer's), or,
           for an ipip/gue VIP, the input's IP packet unchanged behind a consistent outer header
           (lengths, IPv4 header and UDP checksums valid, TTL 64, the VLAN tag kept).
An ICMP error forwarded (steered to the quoted flow's backend, bpf/icmp.h) must instead be:
  icmp_type  an error type lbxdp steers (v4 3/11/12, v6 1/2/3/4)
  icmp_quote a whole quoted IP header of its family (no options) plus 8 L4 bytes inside its
             payload, the quoted source its destination, its source a router (not the quoted
             client), the quoted client plausible
  icmp_mtu   frag-needed / packet-too-big MTU not below 68 / 1280
  vip        the quoted source address, port and protocol those of a configured VIP.
One frame in five is such an error, about a valid frame just built or an earlier one.
It prints frames run, frames/s, verdicts, reasons, violations per invariant (per 100k frames) and
the first few violating inputs decoded. Nothing here is a test; tests/datapath/test_fuzz.py runs
a smaller seeded batch of the same fuzz and fails on any violation.

    sudo .venv/bin/python scripts/fuzz_datapath.py                       # 1,000,000 frames
    sudo .venv/bin/python scripts/fuzz_datapath.py --frames 100000 --seed 7
    sudo .venv/bin/python scripts/fuzz_datapath.py --bpf-dir /tmp/lbxdp-orig/bpf   # an older program
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import os
import random
import shutil
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lbxdp import abi, bpfsys, loader, model
from lbxdp.balancer import Balancer
from lbxdp.lab.traffic import inet_checksum
from lbxdp.maps import Maps

XDP_VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX"}
XDP_TX = 3
LB_MAC = "02:00:00:00:00:01"
CLIENT_MAC = bytes.fromhex("020000000002")
OTHER_MACS = [bytes.fromhex(m) for m in ("ffffffffffff", "01005e000001", "333300000001", "02aabbccddee",
                                         "020000000003")]
BAD_SOURCES4 = [ipaddress.IPv4Address(a).packed for a in
                ("0.0.0.0", "0.1.2.3", "127.0.0.1", "255.255.255.255", "224.0.0.1", "239.9.9.9", "240.0.0.1")]
BAD_SOURCES6 = [ipaddress.IPv6Address(a).packed for a in ("::", "::1", "ff02::1", "ff0e::5", "::ffff:192.0.2.1")]
INVARIANTS = ("mac", "ip_len", "l4_len", "ttl", "source", "vip", "rewrite", "icmp_type", "icmp_quote", "icmp_mtu")


def config() -> model.Config:
    """v4 and v6 VIPs, TCP/80 and UDP/53, two backends each (the script's own program)."""
    ip = ipaddress.ip_address
    out = []
    for tag, (vip, be) in enumerate((("10.77.0.1", "10.77.1."), ("fd77::1", "fd77:1::"))):
        for port, proto in ((80, model.Protocol.TCP), (53, model.Protocol.UDP)):
            bes = tuple(model.Backend(ip(f"{be}{i + 1}"), 8080, mac=f"02:be:{tag:02x}:{port:02x}:00:{i + 1:02x}")
                        for i in range(2))
            out.append(model.Vip(ip(vip), port, proto, backends=bes))
    return model.Config(vips=tuple(out))


# --- frames ---------------------------------------------------------------------------------------
_csum = inet_checksum   # RFC 1071, the lab's (scripts/bench_datapath.py uses it too)


def build(rng: random.Random, vip: tuple[bytes, int, int], own_mac: bytes) -> bytes:
    """A valid frame to vip (packed address, port, protocol number), from a random client."""
    dst, dport, proto = vip
    v4 = len(dst) == 4
    src = bytes([rng.choice((100, 192, 198, 203, 11)), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)]) \
        if v4 else b"\x20\x01\x0d\xb8" + rng.randbytes(12)
    payload = rng.randbytes(rng.choice((0, 0, 1, 5, 18, 64)))
    sport = rng.randrange(1024, 65536)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, rng.getrandbits(32), 0, 5 << 4, 0x02, 8192, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if v4:
        iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), rng.getrandbits(16), 0x4000, 64, proto, 0, src, dst)
        l3, et = iph[:10] + struct.pack("!H", _csum(iph)) + iph[12:], 0x0800
    else:
        l3, et = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst), 0x86DD
    dmac = own_mac if rng.random() < 0.8 else rng.choice(OTHER_MACS)
    l2 = dmac + CLIENT_MAC
    if rng.random() < 0.25:
        l2 += struct.pack("!HH", 0x8100, rng.randrange(1, 4095))
    return l2 + struct.pack("!H", et) + l3 + l4


def _l3_off(f: bytes) -> int:
    return 18 if f[12:14] in (b"\x81\x00", b"\x88\xa8") else 14


def mutate(rng: random.Random, f: bytes) -> bytes:
    """One to three mutations; about one frame in ten is left valid."""
    if rng.random() < 0.1:
        return f
    b = bytearray(f)
    for _ in range(rng.randrange(1, 4)):
        o = _l3_off(b)
        v4 = len(b) > o and b[o] >> 4 == 4
        kind = rng.randrange(9)
        if kind == 0 and b:                              # random byte flips
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1 and len(b) > 15:                  # truncation
            del b[rng.randrange(14, len(b)):]
        elif kind == 2 and len(b) >= o + 6:              # IP length rewritten
            at = o + 2 if v4 else o + 4
            new = rng.choice((0, 1, 19, 20, 39, 40, rng.randrange(65536), len(b) - o, len(b) - o + 1,
                              len(b) - o - 1, len(b) - o - 41))
            b[at:at + 2] = struct.pack("!H", new & 0xFFFF)
        elif kind == 3 and len(b) >= o + 9:              # TTL / hop limit
            b[o + 8 if v4 else o + 7] = rng.choice((0, 0, 1, 255))
        elif kind == 4 and len(b) >= o + 40:             # impossible source, or the destination itself
            if v4:
                b[o + 12:o + 16] = rng.choice(BAD_SOURCES4 + [bytes(b[o + 16:o + 20])])
            else:
                b[o + 8:o + 24] = rng.choice(BAD_SOURCES6 + [bytes(b[o + 24:o + 40])])
        elif kind == 5:                                  # L4 length field: UDP length or TCP data offset
            l4 = o + (20 if v4 else 40)
            if len(b) >= l4 + 14:
                if rng.random() < 0.5:
                    b[l4 + 4:l4 + 6] = struct.pack("!H", rng.choice((0, 7, 8, 9, rng.randrange(65536))))
                else:
                    b[l4 + 12] = (rng.randrange(16) << 4) | (b[l4 + 12] & 0x0F)
        elif kind == 6:                                  # padding after the IP packet
            b += bytes(rng.choice((1, 6, 20)))
        elif kind == 7 and len(b) >= 12:                 # another destination MAC
            b[0:6] = rng.choice(OTHER_MACS)
        elif kind == 8 and len(b) > o:                   # random bytes over a random header field
            at = rng.randrange(o, len(b))
            b[at:at + 2] = rng.randbytes(2)[:len(b) - at]
    return bytes(b)


# --- invariants -----------------------------------------------------------------------------------
def plausible_source(src: bytes, dst: bytes) -> bool:
    if src == dst:
        return False
    if len(src) == 4:
        return src[0] not in (0, 127) and src[0] < 224
    a = ipaddress.IPv6Address(src)
    return not (a.is_unspecified or a.is_loopback or a.is_multicast or a.ipv4_mapped is not None)


def _no_udp_csum(ip: bytes) -> bool:
    return ip[0] >> 4 == 4 and ip[9] == 17 and len(ip) >= 28 and ip[26:28] == b"\0\0"


def _l4_ok(ip: bytes) -> bool:
    """The inner TCP/UDP checksum verifies (over its pseudo-header)."""
    if ip[0] >> 4 == 4:
        l4, pseudo = ip[20:], ip[12:20] + struct.pack("!BBH", 0, ip[9], len(ip) - 20)
    else:
        l4, pseudo = ip[40:], ip[8:40] + struct.pack("!IxxxB", len(ip) - 40, ip[6])
    return _csum(pseudo + l4 + b"\0" * (len(l4) % 2)) == 0


def encapsulated_ok(inp: bytes, out: bytes, own_mac: bytes) -> bool:
    """out is inp's IP packet (without padding) behind a consistent IPIP/IP6IP6/4-in-6/GUE header."""
    o = _l3_off(inp)
    if out[6:12] != own_mac or _l3_off(out) != o or out[12:o - 2] != inp[12:o - 2] or len(inp) < o + 20:
        return False
    ilen = struct.unpack_from("!H", inp, o + 2)[0] if inp[o] >> 4 == 4 else 40 + struct.unpack_from("!H", inp, o + 4)[0]
    inner = inp[o:o + ilen]
    if len(out) < o + 20:
        return False
    if out[o] >> 4 == 4:
        hdr, proto = out[o:o + 20], out[o + 9]
        ok = (out[o] == 0x45 and struct.unpack_from("!H", out, o + 2)[0] == len(out) - o and out[o + 8] == 64
              and _csum(hdr) == 0)
        rest, pseudo = out[o + 20:], hdr[12:20] + struct.pack("!BBH", 0, 17, len(out) - o - 20)
    else:
        proto = out[o + 6]
        ok = struct.unpack_from("!H", out, o + 4)[0] == len(out) - o - 40 and out[o + 7] == 64
        rest, pseudo = out[o + 40:], out[o + 8:o + 40] + struct.pack("!IxxxB", len(out) - o - 40, 17)
    if proto == 17:
        ulen, ucs = struct.unpack_from("!H", rest, 4)[0], struct.unpack_from("!H", rest, 6)[0]
        # The outer checksum is derived from the inner one (bpf/encap.h): valid exactly when the
        # inner L4 checksum is; 0 when the inner is IPv4 UDP without checksum.
        outer_ok = _csum(pseudo + rest + b"\0" * (len(rest) % 2)) == 0
        ok = ok and ulen == len(rest) and (ucs == 0 if _no_udp_csum(inner) else outer_ok == _l4_ok(inner))
        rest = rest[8:]
    elif proto not in (4, 41):
        return False
    return ok and rest == inner


def violations(inp: bytes, out: bytes, own_mac: bytes, vips: set[tuple[bytes, int, int]]) -> list[str]:
    """The invariants a forwarded frame (input inp, output out) breaks."""
    bad = []
    if inp[0:6] != own_mac:
        bad.append("mac")
    if (len(out) != len(inp) or out[12:] != inp[12:] or out[6:12] != own_mac) \
            and not encapsulated_ok(inp, out, own_mac):
        bad.append("rewrite")
    o = _l3_off(inp)
    rest = len(inp) - o
    if rest < 20:
        return bad + ["ip_len"]
    if inp[o] >> 4 == 4:
        ihl, tot, ttl, proto = (inp[o] & 0x0F) * 4, struct.unpack_from("!H", inp, o + 2)[0], inp[o + 8], inp[o + 9]
        src, dst, l4, l4_len = inp[o + 12:o + 16], inp[o + 16:o + 20], o + ihl, tot - ihl
        if ihl < 20 or tot < ihl or tot > rest:
            return bad + ["ip_len"]
    else:
        if rest < 40:
            return bad + ["ip_len"]
        plen, proto, ttl = struct.unpack_from("!HBB", inp, o + 4)
        src, dst, l4, l4_len = inp[o + 8:o + 24], inp[o + 24:o + 40], o + 40, plen
        if plen == 0 or 40 + plen > rest:
            return bad + ["ip_len"]
    if ttl == 0:
        bad.append("ttl")
    if not plausible_source(src, dst):
        bad.append("source")
    if proto in (1, 58):
        return bad + icmp_violations(inp, l4, l4_len, src, dst, vips)
    if l4_len < 8 or len(inp) < l4 + 8:
        return bad + ["l4_len"]
    dport = struct.unpack_from("!H", inp, l4 + 2)[0]
    if proto == 6 and (l4_len < 20 or (inp[l4 + 12] >> 4) * 4 > l4_len or (inp[l4 + 12] >> 4) < 5):
        bad.append("l4_len")
    if proto == 17 and struct.unpack_from("!H", inp, l4 + 4)[0] != l4_len:
        bad.append("l4_len")
    if (dst, dport, proto) not in vips and (dst, 0, proto) not in vips:
        bad.append("vip")
    return bad


ICMP4_ERRORS, ICMP6_ERRORS = {3, 11, 12}, {1, 2, 3, 4}


def icmp_violations(inp: bytes, l4: int, l4_len: int, src: bytes, dst: bytes,
                    vips: set[tuple[bytes, int, int]]) -> list[str]:
    """An ICMP error forwarded (steered) must be an error type, quote a whole IP header of its
    family plus 8 bytes inside its payload, its quoted source must be its destination and with
    the quoted source port and protocol a VIP, its MTU not below the minimum, and it must come
    from a router (not the quoted client)."""
    v4 = len(src) == 4
    qlen = 20 if v4 else 40
    if l4_len < 8 + qlen + 8 or len(inp) < l4 + 8 + qlen + 8:
        return ["icmp_quote"]
    typ, code = inp[l4], inp[l4 + 1]
    bad = []
    if typ not in (ICMP4_ERRORS if v4 else ICMP6_ERRORS):
        bad.append("icmp_type")
    if v4 and (typ, code) == (3, 4) and struct.unpack_from("!H", inp, l4 + 6)[0] < 68:
        bad.append("icmp_mtu")
    if not v4 and typ == 2 and struct.unpack_from("!I", inp, l4 + 4)[0] < 1280:
        bad.append("icmp_mtu")
    q = l4 + 8
    if v4:
        ok = inp[q] == 0x45 and not struct.unpack_from("!H", inp, q + 6)[0] & 0x1FFF
        qproto, qsrc, qdst = inp[q + 9], inp[q + 12:q + 16], inp[q + 16:q + 20]
    else:
        ok = inp[q] >> 4 == 6
        qproto, qsrc, qdst = inp[q + 6], inp[q + 8:q + 24], inp[q + 24:q + 40]
    qsport = struct.unpack_from("!H", inp, q + qlen)[0]
    if not ok or qsrc != dst or src == qdst or not plausible_source(qdst, qsrc):
        bad.append("icmp_quote")
    if (qsrc, qsport, qproto) not in vips and (qsrc, 0, qproto) not in vips:
        bad.append("vip")
    return bad


def build_icmp_error(rng: random.Random, frame: bytes) -> bytes:
    """An ICMP error from a router about the reply to `frame` (a valid frame from build()): the
    backend's packet VIP -> client, quoted in full or in its first 8 L4 bytes."""
    o = _l3_off(frame)
    v4 = frame[o] >> 4 == 4
    hl = 20 if v4 else 40
    ip, l4 = frame[o:o + hl], frame[o + hl:]
    if v4:
        src, dst, proto = ip[12:16], ip[16:20], ip[9]
        qip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 63, proto, 0, dst, src)
    else:
        src, dst, proto = ip[8:24], ip[24:40], ip[6]
        qip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 63, dst, src)
    ql4 = l4[2:4] + l4[0:2] + l4[4:]
    quote = qip + (ql4 if rng.random() < 0.5 else ql4[:8])
    router = bytes([203, 0, 113, rng.randrange(1, 255)]) if v4 else b"\x20\x01\x0d\xb8\xff" + rng.randbytes(11)
    if v4:
        typ, code, rest = rng.choice(((3, 4, struct.pack("!HH", 0, rng.choice((576, 1280, 1400, 60)))),
                                      (11, 0, bytes(4)), (3, 3, bytes(4)), (12, 0, bytes(4))))
        icmp = struct.pack("!BBH", typ, code, 0) + rest + quote
        icmp = icmp[:2] + struct.pack("!H", _csum(icmp + b"\0" * (len(icmp) % 2))) + icmp[4:]
        iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0, 64, 1, 0, router, dst)
        l3, et = iph[:10] + struct.pack("!H", _csum(iph)) + iph[12:], 0x0800
    else:
        typ, code, rest = rng.choice(((2, 0, struct.pack("!I", rng.choice((1280, 1400, 1000)))),
                                      (3, 0, bytes(4)), (1, 4, bytes(4)), (4, 0, bytes(4))))
        icmp = struct.pack("!BBH", typ, code, 0) + rest + quote   # checksum left 0: lbxdp does not read it
        l3, et = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 64, router, dst), 0x86DD
    return frame[:o - 2] + struct.pack("!H", et) + l3 + icmp


@dataclass
class Report:
    frames: int = 0
    seconds: float = 0.0
    verdicts: collections.Counter = field(default_factory=collections.Counter)
    reasons: dict[str, int] = field(default_factory=dict)
    broken: collections.Counter = field(default_factory=collections.Counter)   # invariant -> frames
    bad_frames: int = 0
    examples: list[tuple[bytes, list[str]]] = field(default_factory=list)

    def per_100k(self, n: int) -> float:
        return n * 100_000 / self.frames if self.frames else 0.0


def fuzz(runner: bpfsys.TestRunner, maps: Maps, cfg: model.Config, own_mac: str, frames: int, seed: int,
         max_seconds: float = 600.0, batch: int = 10_000) -> Report:
    """Run `frames` mutated frames (in batches of `batch`, built before each batch is run)."""
    rng = random.Random(seed)
    mac = bytes.fromhex(own_mac.replace(":", ""))
    vips = {(v.address.packed, v.port, v.protocol.number) for v in cfg.vips}
    targets = sorted(vips)
    rep = Report()
    recent: list[bytes] = []   # valid frames whose flows the ICMP errors quote (rr VIPs need the entry)
    before = maps.reasons()
    t0 = time.monotonic()
    while rep.frames < frames and time.monotonic() - t0 < max_seconds:
        inputs = []
        for _ in range(min(batch, frames - rep.frames)):
            f = build(rng, rng.choice(targets), mac)
            if rng.random() < 0.2:   # an ICMP error about a flow: half of them about an earlier frame's
                f = build_icmp_error(rng, f if not recent or rng.random() < 0.5 else rng.choice(recent))
            elif len(recent) < 64:
                recent.append(f)
            inputs.append(mutate(rng, f))
        for f in inputs:
            if len(f) < 14:
                f = f + bytes(14 - len(f))
            r = runner.run(f)
            rep.verdicts[XDP_VERDICTS.get(r.retval, str(r.retval))] += 1
            if r.retval == XDP_TX:
                bad = violations(f, r.data, mac, vips)
                if bad:
                    rep.bad_frames += 1
                    rep.broken.update(bad)
                    if len(rep.examples) < 5:
                        rep.examples.append((f, bad))
        rep.frames += len(inputs)
    rep.seconds = time.monotonic() - t0
    after = maps.reasons()
    rep.reasons = {r.name: after[r][0] - before[r][0] for r in after if after[r][0] != before[r][0]}
    return rep


def decode(f: bytes) -> str:
    try:
        from scapy.layers.l2 import Ether
        return Ether(f).summary()
    except Exception as e:
        return f"(scapy cannot decode it: {e})"


def print_report(rep: Report, label: str) -> None:
    print(f"{label}: {rep.frames} frames in {rep.seconds:.1f} s ({rep.frames / max(rep.seconds, 1e-9):,.0f} frames/s)")
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.verdicts.items())))
    print("reasons:  " + ", ".join(f"{k} {v}" for k, v in sorted(rep.reasons.items(), key=lambda kv: -kv[1])))
    print(f"violations: {rep.bad_frames} forwarded frames ({rep.per_100k(rep.bad_frames):.1f} per 100k frames)")
    for inv in INVARIANTS:
        print(f"  {inv:8} {rep.broken[inv]:8} ({rep.per_100k(rep.broken[inv]):.1f} per 100k)")
    for f, bad in rep.examples:
        print(f"  e.g. {','.join(bad)}: {decode(f)}\n       {f.hex()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames to run (1000000)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (1)")
    ap.add_argument("--bpf-dir", type=Path, default=None, help="compile the C sources in this directory instead")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="stop after this long (600)")
    args = ap.parse_args(argv)
    if not 1 <= args.frames <= 10_000_000:
        ap.error("--frames must be within 1..10000000")
    if os.geteuid() != 0:
        ap.error("BPF_PROG_TEST_RUN needs root")
    pin_dir = Path(f"/sys/fs/bpf/lbxdp-fuzz-{uuid.uuid4().hex[:12]}")
    prog = None
    try:
        prog = loader.compile_program(loader.BuildConfig(pin_dir=pin_dir, src_dir=args.bpf_dir))
        maps = Maps(prog.maps)
        cfg = config()
        Balancer(maps).apply(cfg, macs={})
        maps.set_own_mac(LB_MAC)   # what control.attach does (no map in older sources)
        rep = fuzz(bpfsys.TestRunner(prog.fd), maps, cfg, LB_MAC, args.frames, args.seed, args.max_seconds)
    finally:
        if prog is not None:
            prog.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
    print_report(rep, f"program from {args.bpf_dir or loader.bpf_dir()}, seed {args.seed}")
    return 1 if rep.bad_frames else 0


if __name__ == "__main__":
    sys.exit(main())
