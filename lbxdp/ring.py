"""A VIP's lookup table: which backend each slot sends new flows to.

Pure functions, no kernel and no maps: (stable key, weight) pairs in, array('I') of indices into
those pairs out (maglev() can write given values, e.g. backend ids, instead). The balancer
writes backend ids into the VIP's inner map (DESIGN.md, "select").

maglev(): weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
  Software Network Load Balancer", NSDI 2016, section 3.4, pseudocode 1).
  - Backend permutation: d = BLAKE2b(key as UTF-8, digest 16 bytes, person=PERSON);
    h1, h2 = the two little-endian 64-bit halves of d; offset = h1 % M, skip = h2 % (M - 1) + 1.
    Slot j of the permutation is (offset + j * skip) % M, a permutation of 0..M-1 because M is
    prime. It depends on the key and M only, so a backend's preferences do not move when others
    come or go: removing one of N backends moves about 1/N of the slots (tests/unit/test_ring.py
    measures it), and adding it back restores the table exactly.
  - Fill: backends take turns in key order (so the table does not depend on input order); on its
    turn a backend takes the next free slot of its permutation, until all M are taken.
  - Weights: in each round backend i adds w_i to a credit and takes a turn only when the credit
    reaches max(w) (then pays max(w) back), so it gets w_i / max(w) of the turns a max-weight
    backend gets and a share of w_i / sum(w) of the table, give or take a couple of slots
    (integer credits: no float drift). Equal weights give the paper's algorithm unchanged.
  The turn order is fixed in advance; only the probing depends on the table, and that greedy
  probe loop is sequential. It runs in C when the helper is built (_ring.c, `python -m lbxdp.ring
  build`, run by scripts/install.sh), else in Python: identical tables, C 15-20x faster
  (scripts/bench_ring.py prints both).

weighted_rr(): nginx's smooth weighted round robin over one period: backend i appears w_i / g
  times (g = gcd of the weights), spread out rather than in runs; equal weights give 0, 1, ..., n-1.

Both raise ValueError for any bad input, with a message naming it.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import functools
import hashlib
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

DEFAULT_TABLE_SIZE = 65537
"""Prime. Equal backends get equal shares at any size (give or take one slot); at this size
removing one of N backends also moves at most 1/N + 1% of the slots, measured up to N = 1000
(smaller tables move more: 1/N + 1.3% at 4099 slots and N = 10; see tests/unit/test_ring.py)."""

MAX_TABLE_SIZE = 2**31 - 1
"""Largest Maglev size (prime): slot arithmetic in the C helper is 32-bit."""

MAX_WEIGHT = 2**32 - 1
"""Weights are u32 in the C helper."""

RR_LIMIT = 1 << 20
"""Default cap on a weighted_rr() sequence's length (sum of weights / their gcd)."""

PERSON = b"lbxdp.maglev.v1"
"""BLAKE2b personalisation for the Maglev permutation hash. Changing it (or the hash) reshuffles
every table on upgrade: new flows of every VIP would move at once."""

ACCEL_ENV = "LBXDP_RING_PURE"
"""Set to a non-empty value to ignore the C helper (debugging, comparing)."""

_SRC = Path(__file__).with_name("_ring.c")

assert array.array("I").itemsize == 4, "array('I') must hold u32"


def is_prime(n: int) -> bool:
    """True if n is prime. Miller-Rabin with the first 12 primes as bases, which is exact for
    n < 3.3 * 10**24 (Sorenson & Webster 2015), far beyond any table size."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def maglev(backends: Sequence[tuple[str, int]], size: int = DEFAULT_TABLE_SIZE, *,
           values: Sequence[int] | None = None) -> array.array:
    """Weighted Maglev lookup table of `size` (prime) slots.

    backends: (stable key, weight) pairs, key e.g. '10.0.0.1:80'. A backend's permutation depends
    only on its key, and turns go in key order, so the table is a function of the set of
    (key, weight) pairs, not of their order. Entry = index into the original `backends`, or
    values[index] if values are given (u32s, one per backend: e.g. backend ids, written by the
    fill itself, which spares mapping 65537 indices afterwards).
    Weight-0 backends get no slots (and change nothing); a backend whose share is under one
    slot (size * w / sum(w) < 1) may get none either. All weights 0, or no backends -> empty array.
    """
    pairs = _checked(backends)
    vals = _checked_values(values, len(pairs)) if values is not None else range(len(pairs))
    live = sorted((key, w, i) for i, (key, w) in enumerate(pairs) if w > 0)
    _check_size(size, len(live))
    if not live:
        return array.array("I")
    perms = [permutation(key, size) for key, _, _ in live]
    offsets = [o for o, _ in perms]
    skips = [s for _, s in perms]
    weights = [w for _, w, _ in live]
    slot_values = [vals[i] for _, _, i in live]
    lib = _lib()
    if lib is not None:
        return _fill_c(lib, size, offsets, skips, weights, slot_values)
    return _fill_py(size, offsets, skips, weights, slot_values)


def weighted_rr(backends: Sequence[tuple[str, int]], *, limit: int = RR_LIMIT) -> array.array:
    """One period of nginx's smooth weighted round robin, as indices into `backends`.

    Backend i appears w_i / g times (g = gcd of the positive weights), interleaved: at each step
    every backend adds its weight to a running score, the highest score (first in input order on
    a tie) is picked and pays back the total. Equal weights -> 0, 1, ..., n-1; weights 5, 1, 1
    -> 0 0 1 0 2 0 0. Weight-0 backends never appear; no positive weight -> empty array.
    ValueError if the period would be longer than `limit`. Cost: period x backends steps.
    """
    pairs = _checked(backends)
    live = [(i, w) for i, (_, w) in enumerate(pairs) if w > 0]
    if not live:
        return array.array("I")
    g = math.gcd(*(w for _, w in live))
    idx = [i for i, _ in live]
    ws = [w // g for _, w in live]
    total = sum(ws)
    if total > limit:
        raise ValueError(f"round robin period is {total} slots (sum of weights / their gcd {g}); "
                         f"at most {limit}: use smaller or less coprime weights")
    score = [0] * len(ws)
    out = array.array("I", [0]) * total
    for t in range(total):
        score = [s + w for s, w in zip(score, ws)]
        best = score.index(max(score))
        score[best] -= total
        out[t] = idx[best]
    return out


def permutation(key: str, size: int) -> tuple[int, int]:
    """(offset, skip) of `key`'s Maglev permutation in a table of `size` slots."""
    d = hashlib.blake2b(key.encode(), digest_size=16, person=PERSON).digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def accelerator() -> Path | None:
    """The C helper in use, or None when tables are filled in Python."""
    return _so_path() if _lib() is not None else None


def build_accelerator(dest: Path | None = None, cc: str = "cc") -> Path:
    """Compile _ring.c into a shared object and return its path (default: beside this module,
    named after the source's digest; older builds there are removed). Raises RuntimeError with
    the compiler's output if it fails."""
    out = _so_path(dest)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    cmd = [cc, "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-o", str(tmp), str(_SRC)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run {cc}: {e} (install gcc and libc6-dev)") from e
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()}")
    os.replace(tmp, out)
    for old in out.parent.glob("_ring-*.so"):
        if old != out:
            old.unlink(missing_ok=True)
    _lib.cache_clear()
    return out


def load_accelerator(path: Path) -> ctypes.CDLL:
    """Open a built helper and declare its one function."""
    lib = ctypes.CDLL(str(path))
    u32, p32 = ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)
    lib.lbx_maglev_fill.argtypes = [u32, u32, p32, p32, p32, p32, ctypes.c_void_p]
    lib.lbx_maglev_fill.restype = ctypes.c_int
    return lib


# ---------------------------------------------------------------- internals

def _checked(backends: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    pairs = list(backends)
    seen: set[str] = set()
    for n, item in enumerate(pairs):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"backend #{n}: {item!r} is not a (key, weight) pair")
        key, w = item
        if not isinstance(key, str) or not key:
            raise ValueError(f"backend #{n}: key {key!r} is not a non-empty string")
        if key in seen:
            raise ValueError(f"backend #{n}: key {key!r} appears twice")
        seen.add(key)
        if not isinstance(w, int) or isinstance(w, bool):
            raise ValueError(f"backend {key!r}: weight {w!r} is not an integer")
        if not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"backend {key!r}: weight {w} is out of range 0..{MAX_WEIGHT}")
    return pairs


def _checked_values(values: Sequence[int], n: int) -> list[int]:
    vals = list(values)
    if len(vals) != n:
        raise ValueError(f"{len(vals)} values for {n} backends")
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFFFFFF:
            raise ValueError(f"value {v!r} is not a u32")
    return vals


def _check_size(size: int, live: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(f"table size {size!r} is not an integer")
    if not is_prime(size):
        raise ValueError(f"table size {size} is not prime (Maglev needs a prime; e.g. 65537, 4099, 251)")
    if size > MAX_TABLE_SIZE:
        raise ValueError(f"table size {size} is larger than {MAX_TABLE_SIZE}")
    if size <= live:
        raise ValueError(f"table size {size} must be larger than the number of backends with a "
                         f"weight ({live}); use 100x that or more for even shares")


def _turns(weights: list[int], m: int) -> list[int]:
    """Who fills each of the m slots, in order: the weighted round schedule (see _ring.c).

    The schedule repeats every max(w) rounds (every credit is back to 0 then), and dividing all
    weights by their gcd does not change it: compute one period of the reduced weights and
    repeat it."""
    n = len(weights)
    g = math.gcd(*weights)
    ws = [w // g for w in weights]
    wmax = max(ws)
    period: list[int] = []
    credit = [0] * n
    rng = range(n)
    for _ in range(wmax):
        for i in rng:
            c = credit[i] + ws[i]
            if c >= wmax:
                credit[i] = c - wmax
                period.append(i)
            else:
                credit[i] = c
        if len(period) >= m:
            return period[:m]
    return (period * (m // len(period) + 1))[:m]


def _fill_py(m: int, offsets: list[int], skips: list[int], weights: list[int],
             values: list[int]) -> array.array:
    """The greedy fill in Python, slot for slot the same as lbx_maglev_fill() in _ring.c."""
    table = array.array("I", [0]) * m
    taken = bytearray(m)
    nxt = list(offsets)
    for i in _turns(weights, m):
        c, s = nxt[i], skips[i]
        while taken[c]:
            c = (c + s) % m         # measured faster than compare-and-subtract in CPython 3.11
        taken[c] = 1
        table[c] = values[i]
        nxt[i] = (c + s) % m
    return table


def _fill_c(lib: ctypes.CDLL, m: int, offsets: list[int], skips: list[int], weights: list[int],
            values: list[int]) -> array.array:
    arr = ctypes.c_uint32 * len(offsets)
    table = array.array("I", [0]) * m
    rc = lib.lbx_maglev_fill(m, len(offsets), arr(*offsets), arr(*skips), arr(*weights),
                             arr(*values), table.buffer_info()[0])
    if rc != 0:
        raise MemoryError(f"lbx_maglev_fill: out of memory for a {m}-slot table")
    return table


def _so_path(dest: Path | None = None) -> Path:
    digest = hashlib.sha256(_SRC.read_bytes()).hexdigest()[:16]
    return (dest or _SRC.parent) / f"_ring-{digest}.so"


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if os.environ.get(ACCEL_ENV):
        return None
    try:
        path = _so_path()
        lib = load_accelerator(path)
    except OSError:
        log.info("lbxdp.ring: C helper not built (python -m lbxdp.ring build); "
                 "filling Maglev tables in Python, 15-20x slower")
        return None
    log.debug("lbxdp.ring: using %s", path)
    return lib


def main(argv: list[str] | None = None) -> int:
    """`python -m lbxdp.ring build|status`. Exit status 0 when the C helper is in use afterwards,
    1 when tables would be filled in Python (status) or the build failed (build)."""
    ap = argparse.ArgumentParser(prog="python -m lbxdp.ring",
                                 description="Build or check the C helper that fills Maglev tables.")
    ap.add_argument("command", choices=["build", "status"])
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler (default: $CC or cc)")
    a = ap.parse_args(argv)
    if a.command == "build":
        try:
            print(f"built {build_accelerator(cc=a.cc)}")
        except (RuntimeError, OSError) as e:
            print(f"lbxdp.ring: {e}", file=sys.stderr)
            return 1
    path = accelerator()
    if path is None:
        why = (f"{ACCEL_ENV} is set" if os.environ.get(ACCEL_ENV)
               else "no C helper: python -m lbxdp.ring build")
        print(f"Maglev tables: filled in Python ({why})")
        return 1
    print(f"Maglev tables: filled by the C helper {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
