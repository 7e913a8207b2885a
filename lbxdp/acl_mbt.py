"""The ACL's multibit trie (bpf/acl.h, issue 11): every scope's rules in one flat array of u32.

The kernel's LPM trie (lbx_acl) walks one bit per node: +115..160 ns for a new flow at 1,000
random prefixes (docs/benchmarks.md). This builder turns the same rule set into a multibit trie
in one array value (the blob, lbx_acl_mbt's inner map, swapped in whole like the trie), which the
program walks one address byte per level (the first two bytes at once for a big root):

  header  word scope * 2 + (family is IPv6), scopes 0..max_vips (max_vips: the global scope):
          offset << 4 | LBX_ACL_MBT_H_* flags << 2 | the scope's /0 verdict; 0: no rules
  node    256 words (one address byte), or 65,536 for a big root (two bytes)
  entry   offset << 3 | LBX_ACL_MBT_LEAF | verdict; offset 0: nothing below
  leaf    the prefixes below an entry when there are at most LEAF_MAX (path compression: sparse
          prefixes cost one leaf, not a chain of nodes): their count, then per prefix, longest
          first, its verdict word, its words and its mask's (1 + 1 + 1 words for IPv4, 1 + 4 + 4
          for IPv6), in the order the CPU loads the packet's address words; the first that
          contains the source is its longest match there
  verdict 0: none here, else enum lbx_acl_action + 1

Verdicts are "best match so far": a prefix that ends in a node is expanded over the slots it
covers; the walk keeps the last verdict it met, and a leaf's if the source is inside it. Prefixes
are inserted shortest first, so a longer one overwrites the slots it shares with a shorter one.

Budget: the blob has LBX_ACL_MBT_WORDS words. A (scope, family) that does not fit is marked
LBX_ACL_MBT_H_FALLBACK and the program asks the kernel trie for it, which always holds every
rule (the truth; what `lbxdp acl` and status read back).
"""

from __future__ import annotations

import array
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Union

from . import abi

Net = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Addr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

BIG_ROOT_MIN_RULES = 256   # a (scope, family) with this many rules gets a 16-bit root (256 KiB)
H_BIG = 0x4                # LBX_ACL_MBT_H_BIG << 2
H_FALLBACK = 0x8           # LBX_ACL_MBT_H_FALLBACK << 2
LEAF = 0x4                 # LBX_ACL_MBT_LEAF
LEAF_MAX = 4               # LBX_ACL_MBT_LEAF_MAX: prefixes in one leaf
PAD = abi.ACL_MBT_PAD      # words after LBX_ACL_MBT_WORDS (a leaf read at a masked offset stays inside)


def header_words(max_vips: int) -> int:
    """Header words: one per (scope, family), scopes 0..max_vips, and one: the words in use."""
    return 2 * (max_vips + 1) + 1


@dataclass
class Built:
    """One blob: its words, and per (scope, family) the words it takes or that it falls back."""
    words: array.array                                              # 'I', only the used part
    placed: dict[tuple[int, int], int] = field(default_factory=dict)   # (scope, 4|6) -> words
    fallback: set[tuple[int, int]] = field(default_factory=set)


class _Over(Exception):
    pass


def _addr_words(raw: bytes) -> list[int]:
    """Address bytes as the CPU loads them in 32-bit words (native order, like the program)."""
    return list(array.array("I", raw))


def build(rules: Iterable[tuple[int, Net, int]], max_vips: int, max_words: int,
          big_root_min: int = BIG_ROOT_MIN_RULES) -> Built:
    """rules: (scope, network, enum lbx_acl_action), one action per (scope, network). Scopes are
    placed in order (the global one, max_vips, first; then by id); one that does not fit in
    max_words is left to the kernel trie."""
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for scope, net, action in rules:
        if not 0 <= scope <= max_vips:
            raise ValueError(f"ACL scope {scope} outside 0..{max_vips}")
        groups.setdefault((scope, net.version), []).append(
            (net.prefixlen, int(net.network_address), int(action) + 1))
    hdr = header_words(max_vips)
    out = Built(array.array("I", bytes(4 * hdr)))
    for key in sorted(groups, key=lambda k: (k[0] != max_vips, k[0], k[1])):
        scope, fam = key
        mark = len(out.words)
        try:
            head = _Placer(out.words, 32 if fam == 4 else 128, max_words).place(
                sorted(groups[key]), len(groups[key]) >= big_root_min)
        except _Over:
            del out.words[mark:]
            head = H_FALLBACK
            out.fallback.add(key)
        else:
            out.placed[key] = len(out.words) - mark
        out.words[2 * scope + (fam == 6)] = head
    out.words[hdr - 1] = len(out.words)
    return out


class _Placer:
    def __init__(self, words: array.array, bits: int, max_words: int):
        self.w, self.bits, self.max = words, bits, max_words

    def alloc(self, n: int) -> int:
        at = len(self.w)
        if at + n > self.max or at + n >= 1 << 28:
            raise _Over
        self.w.frombytes(bytes(4 * n))
        return at

    def place(self, rules: list[tuple[int, int, int]], big: bool) -> int:
        dflt = 0
        if rules and rules[0][0] == 0:
            dflt = rules[0][2]
            rules = rules[1:]
        width = 16 if big else 8
        root = self.node(rules, 0, width)
        return root << 4 | (H_BIG if big else 0) | dflt

    def node(self, rules: list[tuple[int, int, int]], used: int, width: int) -> int:
        """A node for rules (shortest first, all longer than used bits) indexed by the next width
        bits; returns its offset."""
        at = self.alloc(1 << width)
        below: dict[int, list[tuple[int, int, int]]] = {}
        end = used + width
        for length, addr, v in rules:
            idx = (addr >> (self.bits - end)) & ((1 << width) - 1)
            if length > end:
                below.setdefault(idx, []).append((length, addr, v))
                continue
            span = 1 << (end - length)
            first = at + (idx & ~(span - 1))
            self.w[first:first + span] = array.array("I", [v]) * span    # shortest first: overwrite
        for idx, sub in below.items():
            slot = at + idx
            if len(sub) <= LEAF_MAX:
                child = self.leaf(sub) << 3 | LEAF
            else:
                child = self.node(sub, end, 8) << 3
            self.w[slot] = child | (self.w[slot] & 3)
        return at

    def leaf(self, rules: list[tuple[int, int, int]]) -> int:
        n = self.bits // 8
        rec: list[int] = [len(rules)]
        for length, addr, v in sorted(rules, reverse=True):    # longest first
            mask = ((1 << length) - 1) << (self.bits - length)
            rec += [v] + _addr_words(addr.to_bytes(n, "big")) + _addr_words(mask.to_bytes(n, "big"))
        at = self.alloc(len(rec))
        self.w[at:at + len(rec)] = array.array("I", rec)
        return at


def lookup(words: array.array, scope: int, addr: Addr) -> int | None:
    """The walk bpf/acl.h does, in Python (tests): enum lbx_acl_action, None for no match, or -1
    for a (scope, family) left to the kernel trie."""
    head = words[2 * scope + (addr.version == 6)]
    if head & H_FALLBACK:
        return -1
    if not head:
        return None
    best, off, raw = head & 3, head >> 4, addr.packed
    pos, e = 0, 0
    if head & H_BIG:
        e, pos = words[off + (raw[0] << 8 | raw[1])], 2
    else:
        e, pos = words[off + raw[0]], 1
    while True:
        best = (e & 3) or best
        off = e >> 3
        if not off:
            break
        if e & LEAF:
            n = len(raw) // 4
            src = _addr_words(raw)
            for k in range(words[off]):
                p = off + 1 + k * (1 + 2 * n)
                if all((src[i] ^ words[p + 1 + i]) & words[p + 1 + n + i] == 0 for i in range(n)):
                    best = words[p]
                    break
            break
        e, pos = words[off + raw[pos]], pos + 1
    return best - 1 if best else None


def acl_action(v: int | None) -> abi.AclAction | None:
    return None if v is None or v < 0 else abi.AclAction(v)
