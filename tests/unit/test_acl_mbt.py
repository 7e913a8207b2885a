"""lbxdp/acl_mbt.py: the builder's blob, walked in Python as bpf/acl.h walks it, against
model.Admission.verdict (ipaddress longest-prefix match); and the C constants it mirrors."""

from __future__ import annotations

import ipaddress
import random
import re
from pathlib import Path

import pytest

from lbxdp import abi, acl_mbt, model
from lbxdp.maps import acl_entries

ROOT = Path(__file__).resolve().parents[2]


def random_admission(rnd: random.Random, n: int, fam: int) -> model.Admission:
    bits = 32 if fam == 4 else 128
    base = rnd.getrandbits(bits)
    cls = ipaddress.IPv4Network if fam == 4 else ipaddress.IPv6Network
    rules = {}
    while len(rules) < n:
        length = rnd.randint(0, bits)
        x = base ^ (rnd.getrandbits(bits) >> rnd.randint(1, bits))
        rules[cls((x >> (bits - length) << (bits - length) if length else 0, length))] = rnd.random() < 0.5
    return model.Admission(allow=tuple(k for k, v in rules.items() if v),
                           deny=tuple(k for k, v in rules.items() if not v))


@pytest.mark.parametrize("fam", (4, 6))
@pytest.mark.parametrize("big", (1, 10**6))
def test_the_walk_agrees_with_longest_prefix_match(fam: int, big: int) -> None:
    rnd = random.Random(fam * 7 + big)
    for _ in range(60):
        adm = random_admission(rnd, rnd.randint(1, 60), fam)
        built = acl_mbt.build(((e.scope, e.network, e.action) for e in acl_entries({5: adm})), 1024, 1 << 19, big)
        assert not built.fallback
        nets = list(adm.allow + adm.deny)
        for _ in range(200):
            p = rnd.choice(nets)
            addr = p.network_address + rnd.randrange(p.num_addresses)
            if rnd.random() < 0.3:
                addr = ipaddress.ip_address(int(addr) ^ (1 << rnd.randrange(32 if fam == 4 else 128)))
            got = acl_mbt.acl_action(acl_mbt.lookup(built.words, 5, addr)) or abi.AclAction.ALLOW
            assert got == adm.verdict(addr), (addr, adm)


def test_over_the_budget_a_scope_falls_back_and_takes_nothing() -> None:
    rnd = random.Random(3)
    small, large = random_admission(rnd, 3, 4), random_admission(rnd, 500, 4)
    rules = [(e.scope, e.network, e.action) for e in acl_entries({1024: small, 7: large})]
    hdr = acl_mbt.header_words(1024)
    built = acl_mbt.build(rules, 1024, hdr + 600)
    assert set(built.placed) == {(1024, 4), (1024, 6)} and built.fallback == {(7, 4), (7, 6)}
    assert len(built.words) == hdr + sum(built.placed.values())
    assert acl_mbt.lookup(built.words, 7, ipaddress.ip_address("10.0.0.1")) == -1


def test_memory_of_1000_random_prefixes_per_family() -> None:
    """The figure docs/benchmarks.md gives: well under the default blob (2 MiB)."""
    rnd = random.Random(11)
    rules = []
    for fam, lens in ((4, (12, 32)), (6, (24, 64))):
        bits = 32 if fam == 4 else 128
        for _ in range(1000):
            length = rnd.randint(*lens)
            rules.append((1, ipaddress.ip_network((rnd.getrandbits(bits) >> (bits - length) << (bits - length), length)),
                          rnd.randrange(2)))
    built = acl_mbt.build(dict(((s, n), (s, n, a)) for s, n, a in rules).values(), 1024, 1 << 19)
    assert not built.fallback
    assert 4 * len(built.words) < 700 * 1024


def test_constants_match_the_c_side() -> None:
    text = (ROOT / "bpf" / "acl.h").read_text()
    defs = {m[1]: int(m[2], 0) for m in re.finditer(r"#define (LBX_ACL_MBT_\w+) (0x[0-9a-f]+)", text)}
    assert defs["LBX_ACL_MBT_H_BIG"] == acl_mbt.H_BIG and defs["LBX_ACL_MBT_H_FALLBACK"] == acl_mbt.H_FALLBACK
    assert defs["LBX_ACL_MBT_LEAF"] == acl_mbt.LEAF
    assert int(re.search(r"#define LBX_ACL_MBT_LEAF_MAX (\d+)", text)[1]) == acl_mbt.LEAF_MAX
    maps_h = (ROOT / "bpf" / "maps.h").read_text()
    assert "w[LBX_ACL_MBT_WORDS + LBX_ACL_MBT_PAD]" in maps_h   # the values: test_abi_drift
    assert acl_mbt.PAD >= 1 + acl_mbt.LEAF_MAX * 9    # the largest leaf: count + 4 IPv6 prefixes
