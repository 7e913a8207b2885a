"""The VIP address filter: the bitmap that lets traffic for no VIP pass without a hash lookup.

The control plane's contract (lbxdp.balancer, lbxdp.maps): a VIP address's bit is set before the
VIP is inserted and cleared only when no VIP address maps to it any more; apply() also repairs a
filter that lost or gained bits (a fresh map after an upgrade, an interrupted apply).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from lbxdp import abi, model
from lbxdp.balancer import Balancer
from lbxdp.maps import Maps, filter_bit, filter_words

from .frames import (BASE, DNS4, OTHER4, OTHER6, RR4, WEB4, XDP_PASS, XDP_TX, backends, forwarded, plus, tcp, vip,
                     without)
from .harness import Case, Lb, check

pytestmark = pytest.mark.root
R = abi.Reason


def addresses(cfg: model.Config) -> set[model.IPAddress]:
    return {v.address for v in cfg.vips}


def colliding_address(target: model.IPAddress, avoid: set[model.IPAddress]) -> model.IPAddress:
    """Another address of target's family whose filter bit is target's (found by counting up)."""
    base = ipaddress.ip_address("10.20.0.0" if target.version == 4 else "fd20::")
    for i in range(1, 1 << 22):
        a = base + i
        if a not in avoid and filter_bit(a) == filter_bit(target):
            return a
    raise AssertionError("no colliding address found")


def test_the_filter_holds_exactly_the_bits_of_the_vip_addresses(lb: Lb) -> None:
    assert lb.maps.vip_filter() == filter_words(addresses(BASE))


def test_the_table_rows_for_no_vip_take_both_paths(lb: Lb) -> None:
    """test_cases.py's rows for other addresses leave at the filter (their bits are clear), its
    rows for a VIP address on another port or protocol after the VIP lookup (the bit is set)."""
    words = lb.maps.vip_filter()
    bit_set = lambda a: bool(words.get(filter_bit(a) // 64, 0) >> (filter_bit(a) % 64) & 1)  # noqa: E731
    assert not any(bit_set(ipaddress.ip_address(a)) for a in (OTHER4, OTHER6, "10.10.0.99"))
    assert bit_set(WEB4.address)


def test_a_vip_whose_bit_is_missing_is_not_seen(lb: Lb) -> None:
    """Proves the program consults the filter (and that apply() repairs it)."""
    syn = tcp(str(WEB4.address), 80, 47001)
    lb.maps.reset_vip_filter(addresses(BASE) - {WEB4.address})
    check(lb, Case("syn to a vip whose address bit is clear", syn, XDP_PASS, reason=R.PASS_NOT_VIP))
    lb.apply(BASE)
    assert lb.maps.vip_filter() == filter_words(addresses(BASE))
    check(lb, Case("the same syn after apply() repaired the filter", syn, XDP_TX,
                   expect=forwarded(syn, WEB4.backends[0])))


def test_apply_repairs_a_filter_that_lost_or_gained_bits(lb: Lb) -> None:
    stray = ipaddress.ip_address("203.0.113.99")
    lb.maps.reset_vip_filter({stray})  # lost every VIP's bit, gained a stray one
    lb.apply(BASE)  # no VIP changes: the filter is repaired anyway
    assert lb.maps.vip_filter() == filter_words(addresses(BASE))


def test_removing_one_of_two_vips_on_an_address_keeps_its_bit(lb: Lb) -> None:
    lb.apply(without(BASE, DNS4))  # WEB4 has the same address
    assert lb.maps.vip_filter() == filter_words(addresses(BASE))
    syn = tcp(str(WEB4.address), 80, 47101)
    check(lb, Case("the other vip on the address still forwards", syn, XDP_TX,
                   expect=forwarded(syn, WEB4.backends[0])))
    lb.apply(without(BASE, DNS4, WEB4))
    assert lb.maps.vip_filter() == filter_words(addresses(BASE) - {WEB4.address})
    check(lb, Case("and with neither, the address is no vip's", syn, XDP_PASS, reason=R.PASS_NOT_VIP))


def test_vips_whose_addresses_share_a_bit_keep_it_while_either_exists(lb: Lb) -> None:
    twin_addr = colliding_address(RR4.address, addresses(BASE))
    twin = vip(str(twin_addr), 80, model.Protocol.TCP, backends("10.10.8.", 1, 0x0A))
    lb.apply(plus(BASE, twin))
    assert lb.maps.vip_filter() == filter_words(addresses(BASE)), "the twin should need no bit of its own"
    lb.apply(plus(without(BASE, RR4), twin))
    assert lb.maps.vip_filter() == filter_words(addresses(BASE)), "RR4 left, but the twin needs its bit"
    syn = tcp(str(twin.address), 80, 47201)
    check(lb, Case("the twin forwards after RR4 left", syn, XDP_TX, expect=forwarded(syn, twin.backends[0])))
    lb.apply(BASE)
    assert lb.maps.vip_filter() == filter_words(addresses(BASE)), "the twin left, but RR4 needs its bit"
    syn = tcp(str(RR4.address), 80, 47202)
    check(lb, Case("RR4 forwards after the twin left", syn, XDP_TX, expect=forwarded(syn, RR4.backends[0])))


def test_traffic_to_an_address_that_shares_a_vips_bit_still_passes(lb: Lb) -> None:
    """A set bit only means "maybe": the VIP lookup decides."""
    twin_addr = colliding_address(WEB4.address, addresses(BASE))
    check(lb, Case("tcp to an address whose bit a vip set", tcp(str(twin_addr), 80, 47301), XDP_PASS,
                   reason=R.PASS_NOT_VIP))


class LoggingMap:
    """A bpfsys.Map that logs its writes into a shared list, in order."""

    def __init__(self, m: Any, log: list[tuple[str, bytes, Any]]):
        self._m, self._log = m, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        self._log.append((self._m.name, bytes(self._m._key(key)), value))
        self._m.update(key, value, flags)

    def delete(self, key: Any) -> bool:
        self._log.append((self._m.name + " delete", bytes(self._m._key(key)), None))
        return self._m.delete(key)


def test_apply_sets_a_bit_before_the_vip_and_clears_it_after_the_delete(lb: Lb) -> None:
    new = vip("10.10.0.200", 80, model.Protocol.TCP, backends("10.10.9.", 1, 0x0B))
    log: list[tuple[str, bytes, Any]] = []
    spy = Maps({**lb.prog.maps, **{m: LoggingMap(lb.prog.maps[m], log) for m in (abi.Map.VIPS, abi.Map.VIP_FILTER)}})
    vip_key, bit = bytes(spy.vip_key(new.key)), filter_bit(new.address)
    word = bytes(spy.filter_map.Key(bit // 64))

    def filter_writes(bit_set: bool) -> list[int]:
        return [n for n, (m, k, v) in enumerate(log)
                if m == abi.Map.VIP_FILTER and k == word and bool(v.value >> (bit % 64) & 1) == bit_set]

    Balancer(spy).apply(plus(BASE, new), macs={})
    insert = log.index(next(e for e in log if e[:2] == (abi.Map.VIPS, vip_key)))
    assert [n for n in filter_writes(True) if n < insert], f"the bit was not set before the insert: {log}"

    log.clear()
    Balancer(spy).apply(BASE, macs={})
    delete = log.index(next(e for e in log if e[:2] == (abi.Map.VIPS + " delete", vip_key)))
    assert filter_writes(False) and all(n > delete for n in filter_writes(False)), log
    assert lb.maps.vip_filter() == filter_words(addresses(BASE))
