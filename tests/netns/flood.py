"""Spoofed TCP segments from random sources, as fast as one Python loop sends them, bounded in
count and time (tests/netns/test_flood.py starts it in the client namespace)::

    python tests/netns/flood.py IFNAME DST_MAC SRC_MAC VIP4 VIP6 PORT --kind syn|ack|syn2
        --seconds 20 --max-packets 5000000 [--pps 0]

Frames are written whole to an AF_PACKET socket bound to IFNAME, so they leave the namespace
without its stack: a pool of --pool frames is built first (half to VIP4, half to VIP6, sources
random in 100.64.0.0/10 and 2001:db8:f::/48, correct IP and TCP checksums), then sent round and
round until --seconds or --max-packets. kind: syn (SYN), ack (bare ACK, random sequence
numbers), syn2 (each SYN sent twice in a row, like a retransmission). --pps caps the rate
(0: no cap). Prints one JSON object: {"sent", "refused" (ENOBUFS), "seconds", "pps", "pool"}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import struct
import time

from lbxdp.lab.traffic import inet_checksum

MAX_PACKETS = 20_000_000
MAX_SECONDS = 120.0


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def frame(dst_mac: bytes, src_mac: bytes, src, dst, sport: int, dport: int, flags: int, rng: random.Random) -> bytes:
    seq, ack = rng.getrandbits(32), rng.getrandbits(32) if flags & 0x10 else 0
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(tcp))
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), rng.getrandbits(16), 0x4000, 64, 6, 0,
                         src.packed, dst.packed)
        ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(tcp), 6)
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src.packed, dst.packed)
        ethertype = 0x86DD
    tcp = tcp[:16] + struct.pack("!H", inet_checksum(pseudo + tcp)) + tcp[18:]
    return dst_mac + src_mac + struct.pack("!H", ethertype) + ip + tcp


def pool(a: argparse.Namespace) -> list[bytes]:
    rng = random.Random(a.seed)
    dmac, smac = mac(a.dst_mac), mac(a.src_mac)
    vip4, vip6 = ipaddress.ip_address(a.vip4), ipaddress.ip_address(a.vip6)
    base4 = int(ipaddress.ip_address("100.64.0.0"))
    base6 = int(ipaddress.ip_address("2001:db8:f::"))
    flags = 0x10 if a.kind == "ack" else 0x02
    out = []
    for i in range(a.pool):
        if i % 2:
            src, dst = ipaddress.IPv6Address(base6 + rng.getrandbits(80)), vip6
        else:
            src, dst = ipaddress.IPv4Address(base4 + rng.getrandbits(22)), vip4
        f = frame(dmac, smac, src, dst, 1024 + rng.randrange(64512), a.port, flags, rng)
        out += [f, f] if a.kind == "syn2" else [f]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("ifname", "dst_mac", "src_mac", "vip4", "vip6"):
        p.add_argument(name)
    p.add_argument("port", type=int)
    p.add_argument("--kind", choices=["syn", "ack", "syn2"], default="syn")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-packets", type=int, default=5_000_000)
    p.add_argument("--pps", type=float, default=0.0)
    p.add_argument("--pool", type=int, default=65_536)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args()
    if not 0 < a.seconds <= MAX_SECONDS or not 0 < a.max_packets <= MAX_PACKETS or not 0 < a.pool <= 1_000_000:
        p.error(f"--seconds within (0, {MAX_SECONDS}], --max-packets within (0, {MAX_PACKETS}], --pool <= 1000000")
    frames = pool(a)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a.ifname, 0))
    send, n, sent, errors = s.send, len(frames), 0, 0
    start = time.monotonic()
    deadline = start + a.seconds
    batch = 256
    while sent < a.max_packets:
        now = time.monotonic()
        if now >= deadline:
            break
        if a.pps and sent > (now - start) * a.pps:
            time.sleep(batch / a.pps)
            continue
        for i in range(sent, min(sent + batch, a.max_packets)):
            try:
                send(frames[i % n])
            except OSError:   # ENOBUFS: the device's queue is full; that frame did not leave
                errors += 1
        sent = min(sent + batch, a.max_packets)
    elapsed = time.monotonic() - start
    s.close()
    sent -= errors
    print(json.dumps({"sent": sent, "refused": errors, "seconds": round(elapsed, 3), "pps": round(sent / elapsed),
                      "pool": n}))


if __name__ == "__main__":
    main()
