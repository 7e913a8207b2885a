"""The ACL's multibit trie (bpf/acl.h, lbxdp/acl_mbt.py) against a Python reference.

Random rule sets (overlapping prefixes of both actions, /0 and host prefixes, both families,
global and per-VIP scope) are applied through the real control plane; thousands of new flows from
random sources (inside the rules' prefixes and near them) go through the real program, and each
verdict must be the one model.Admission.verdict (ipaddress longest-prefix match) gives: the global
scope first, then the VIP's. The same with a blob budget too small for some scopes (those use the
kernel trie: the fallback), and a check that each path is really the one read.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
from typing import Iterator

import pytest

from lbxdp import abi, acl_mbt, model
from lbxdp.maps import acl_entries

from .frames import BASE, CLIENT_MAC, LB_MAC, WEB4, WEB6, XDP_DROP, XDP_TX, _csum, mac_bytes, tcp_bytes
from .harness import Lb

pytestmark = pytest.mark.root
R, A = abi.Reason, abi.AclAction
net = ipaddress.ip_network


def tcp6_bytes(dst: str, dport: int, sport: int, src: str) -> bytes:
    """A TCP SYN over IPv6, built by hand (like frames.tcp_bytes for IPv4)."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 8192, 0, 0)
    seg = seg[:16] + struct.pack("!H", _csum(s + d + struct.pack("!IxxxB", len(seg), 6) + seg)) + seg[18:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(seg), 6, 64, s, d)
    return mac_bytes(LB_MAC) + mac_bytes(CLIENT_MAC) + b"\x86\xdd" + ip6 + seg


def rule_set(rnd: random.Random, n: int) -> tuple[model.Admission, list]:
    """n random rules of both families and actions, clustered around a few centers so that they
    nest and overlap; sometimes a /0 or host prefix. Returns the Admission and the centers."""
    centers = [(4, rnd.getrandbits(32)) for _ in range(3)] + [(6, rnd.getrandbits(128)) for _ in range(3)]
    rules: dict = {}
    while len(rules) < n:
        fam, c = rnd.choice(centers)
        bits = 32 if fam == 4 else 128
        length = rnd.choice((0, bits, bits - 1)) if rnd.random() < 0.05 else rnd.randint(1, bits if fam == 4 else 72)
        x = c ^ (rnd.getrandbits(bits) >> rnd.randint(1, bits))     # shares a random-length prefix with c
        cls = ipaddress.IPv4Network if fam == 4 else ipaddress.IPv6Network
        rules[cls((x >> (bits - length) << (bits - length) if length else 0, length))] = rnd.random() < 0.5
    allow = tuple(k for k, v in rules.items() if v)
    deny = tuple(k for k, v in rules.items() if not v)
    return model.Admission(allow=allow, deny=deny), centers


def sources(rnd: random.Random, adm: model.Admission, centers: list, n: int) -> list:
    nets = list(adm.allow + adm.deny)
    out = []
    for _ in range(n):
        if rnd.random() < 0.6:
            p = rnd.choice(nets)
            out.append(p.network_address + rnd.randrange(p.num_addresses))
        else:
            fam, c = rnd.choice(centers)
            bits = 32 if fam == 4 else 128
            out.append(ipaddress.ip_address(c ^ (rnd.getrandbits(bits) >> rnd.randint(0, bits)))
                       if fam == 6 else ipaddress.IPv4Address(c ^ (rnd.getrandbits(32) >> rnd.randint(0, 32))))
    return [a for a in out if plausible(a)]


def plausible(src) -> bool:
    """What bpf/guard.h lets reach admission (it drops impossible sources first)."""
    if src.version == 4:
        return src.packed[0] not in (0, 127) and src.packed[0] < 224
    return not (int(src) <= 1 or src.packed[0] == 0xFF or (int(src) >> 32) == 0xFFFF)


def expected(glob: model.Admission, vip: model.Admission, src) -> abi.Reason | None:
    for a in (glob, vip):
        v = a.verdict(src)
        if v != A.ALLOW:
            return R.DROP_ACL_DENY if v == A.DENY else R.DROP_ACL_NOT_ALLOWED
    return None


def compare(lb: Lb, glob: model.Admission, vip: model.Admission, srcs: list) -> None:
    """Each source's new flow to WEB4 or WEB6 (its family) gets the reference's verdict; the
    drop reasons' counters move by the reference's counts."""
    want = {R.DROP_ACL_DENY: 0, R.DROP_ACL_NOT_ALLOWED: 0}
    before = lb.maps.reasons()
    bad = []
    for i, src in enumerate(srcs):
        f = tcp_bytes(str(WEB4.address), 80, 1024 + i, str(src)) if src.version == 4 else \
            tcp6_bytes(str(WEB6.address), 80, 1024 + i, str(src))
        exp = expected(glob, vip, src)
        got = lb.runner.run(f).retval
        if got != (XDP_DROP if exp else XDP_TX):
            bad.append((str(src), got, exp))
        if exp:
            want[exp] += 1
    assert not bad, f"{len(bad)} of {len(srcs)} verdicts differ from the reference, e.g. {bad[:5]}"
    after = lb.maps.reasons()
    got = {r: after[r][0] - before[r][0] for r in want}
    assert got == want
    assert want[R.DROP_ACL_DENY] and want[R.DROP_ACL_NOT_ALLOWED] and len(srcs) - sum(want.values()), \
        "the sample should hit every verdict"


def config(glob: model.Admission, vip4: model.Admission, vip6: model.Admission) -> model.Config:
    keys = {WEB4.key: vip4, WEB6.key: vip6}
    vips = tuple(dataclasses.replace(v, admission=keys.get(v.key, v.admission)) for v in BASE.vips)
    return dataclasses.replace(BASE, vips=vips, balancer=dataclasses.replace(BASE.balancer, admission=glob))


@pytest.fixture
def acl_lb(lb: Lb) -> Iterator[Lb]:
    yield lb
    lb.maps.acl_mbt_budget = None
    lb.apply(BASE)


@pytest.mark.parametrize("seed", range(4))
def test_the_blob_agrees_with_the_reference(acl_lb: Lb, seed: int) -> None:
    """Global rules (few, a small root) and the VIP's (many, a big root), both families."""
    rnd = random.Random(seed)
    glob, _ = rule_set(rnd, 12)
    vip, centers = rule_set(rnd, 400)
    acl_lb.apply(config(glob, vip, vip))
    placement = acl_lb.maps.acl_placement()
    assert placement and all(placement.values()), placement
    compare(acl_lb, glob, vip, sources(rnd, vip, centers, 1500) + sources(rnd, glob, centers, 300))


def test_scopes_over_the_budget_use_the_kernel_trie(acl_lb: Lb) -> None:
    """A budget with room for the global scope only: the VIPs' rules go to the kernel trie
    (acl_placement says so) and the verdicts still agree."""
    rnd = random.Random(99)
    glob, _ = rule_set(rnd, 10)
    vip, centers = rule_set(rnd, 300)
    g = acl_lb.maps.global_scope
    alone = acl_mbt.build(((e.scope, e.network, e.action) for e in acl_entries({g: glob})), g, 1 << 19)
    acl_lb.maps.acl_mbt_budget = len(alone.words) + 100     # no room for the VIPs' hundreds
    acl_lb.apply(config(glob, vip, vip))
    placement = acl_lb.maps.acl_placement()
    w4, w6 = acl_lb.vip_id(WEB4), acl_lb.vip_id(WEB6)
    assert placement[(g, 4)] and placement[(g, 6)], placement
    assert not placement[(w4, 4)] and not placement[(w6, 6)], placement
    from lbxdp import view    # status and the exporter: which scopes' families use the kernel trie
    shown = view.read_admission(acl_lb.maps)
    assert shown[g].trie_only == () and shown[w4].trie_only == (4, 6) and shown[w6].trie_only == (4, 6)
    assert "v4/v6 rules in the kernel trie" in shown[w4].text()
    compare(acl_lb, glob, vip, sources(rnd, vip, centers, 1500) + sources(rnd, glob, centers, 300))


def test_each_path_is_the_one_read(acl_lb: Lb) -> None:
    """Rules deny 198.51.100.0/24 on WEB4. A blob built from other rules (none) swapped in behind
    the control plane's back: the source is admitted, so the program reads the blob. The same blob
    with every scope marked for the kernel trie: dropped again, so the fallback reads the trie."""
    src = "198.51.100.7"
    acl_lb.apply(config(model.Admission(), model.Admission(deny=(net("198.51.100.0/24"),)), model.Admission()))
    f = tcp_bytes(str(WEB4.address), 80, 5000, src)
    assert acl_lb.runner.run(f).retval == XDP_DROP
    other = acl_entries({acl_lb.vip_id(WEB4): model.Admission(deny=(net("203.0.113.0/24"),))})
    acl_lb.maps._swap_acl_mbt(other)
    assert acl_lb.runner.run(f).retval == XDP_TX, "the blob is not what the program reads"
    acl_lb.maps.acl_mbt_budget = 1    # no room for any scope: all marked LBX_ACL_MBT_H_FALLBACK
    built = acl_lb.maps._swap_acl_mbt(other)
    assert built is not None and built.fallback
    assert acl_lb.runner.run(f).retval == XDP_DROP, "the fallback does not read the kernel trie"
    acl_lb.maps.acl_mbt.delete(0)     # no blob at all (pins of an older control plane): the trie
    assert acl_lb.runner.run(f).retval == XDP_DROP
