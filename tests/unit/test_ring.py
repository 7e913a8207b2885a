"""lbxdp.ring: the properties the balancer relies on, for both fills (Python and the C helper).

Maglev (M = table size, N = backends):
  - equal backends each get 1/N of the table (within 1%; in fact within one slot),
  - weights give proportional shares (within 1%),
  - removing one of N backends changes at most 1/N + 1% of the slots (M = 65537; smaller tables
    miss this bound, see test_removal_disruption_small_table),
  - adding it back restores the table exactly, by key,
  - the table depends on the set of (key, weight) pairs only: not on their order, not on the run,
    not on which fill computed it (pinned by a digest and by an independent reference fill).
weighted_rr: exact counts, equal weights -> identity, bounded gaps.

The "c" variants build _ring.c into a temporary directory (skipped without a C compiler), so they
run whether or not `python -m lbxdp.ring build` was run here.
"""

from __future__ import annotations

import array
import hashlib
import math
import random
import re
import shutil
from collections import Counter
from fractions import Fraction

import pytest

from lbxdp import ring

BIG = 65537


def keys(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(n)]


def equal(n: int) -> list[tuple[str, int]]:
    return [(k, 1) for k in keys(n)]


def by_key(backends, table) -> list[str]:
    return [backends[i][0] for i in table]


def changed(a: list[str], b: list[str]) -> float:
    return sum(x != y for x, y in zip(a, b, strict=True)) / len(a)


def reference_maglev(backends, m: int) -> list[int]:
    """The paper's pseudocode 1, transcribed without optimisation (permutation[i][next[i]]),
    with the weighted turns written with fractions: the spec the fast fills must match."""
    live = sorted((k, w, i) for i, (k, w) in enumerate(backends) if w > 0)
    perm = [ring.permutation(k, m) for k, _, _ in live]
    wmax = max(w for _, w, _ in live)
    nxt, credit, entry, filled = [0] * len(live), [Fraction(0)] * len(live), [-1] * m, 0
    while True:
        for i, (_, w, orig) in enumerate(live):
            credit[i] += Fraction(w, wmax)
            if credit[i] < 1:
                continue
            credit[i] -= 1
            offset, skip = perm[i]
            c = (offset + nxt[i] * skip) % m
            while entry[c] >= 0:
                nxt[i] += 1
                c = (offset + nxt[i] * skip) % m
            entry[c] = orig
            nxt[i] += 1
            filled += 1
            if filled == m:
                return entry


@pytest.fixture(scope="session")
def c_helper(tmp_path_factory):
    """The C helper compiled from this checkout's _ring.c into a session temp dir (removed by
    pytest); skips the test when there is no C compiler."""
    if not shutil.which("cc"):
        pytest.skip("no C compiler (cc): cannot build the ring helper")
    return ring.load_accelerator(ring.build_accelerator(dest=tmp_path_factory.mktemp("ring")))


@pytest.fixture(params=["python", "c"])
def fill(request, monkeypatch):
    """Makes ring.maglev() use one fill for this test: 'python' or 'c' (the param's value)."""
    lib = None if request.param == "python" else request.getfixturevalue("c_helper")
    monkeypatch.setattr(ring, "_lib", lambda: lib)
    return request.param


# ---------------------------------------------------------------- is_prime

def test_is_prime_matches_a_sieve():
    n = 20000
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = bytes(len(range(p * p, n, p)))
    assert [i for i in range(n) if ring.is_prime(i)] == [i for i in range(n) if sieve[i]]


@pytest.mark.parametrize("n, prime", [
    (65537, True), (4099, True), (2**31 - 1, True), (2**61 - 1, True),
    (-7, False), (2**32 + 1, False), (65537 * 65539, False),
    (561, False), (3215031751, False),     # Carmichael; strong pseudoprime to bases 2, 3, 5, 7
])
def test_is_prime_large_and_tricky(n, prime):
    assert ring.is_prime(n) is prime


# ---------------------------------------------------------------- maglev: shares

@pytest.mark.parametrize("m, n", [(BIG, n) for n in (2, 3, 7, 10, 50, 100)]
                         + [(4099, n) for n in (2, 3, 7, 10, 40)] + [(10007, 100)])
def test_equal_backends_get_equal_shares(fill, m, n):
    assert m > 100 * n
    counts = Counter(ring.maglev(equal(n), m))
    assert sorted(counts) == list(range(n))
    assert max(abs(c / m - 1 / n) for c in counts.values()) <= 0.01
    assert max(counts.values()) - min(counts.values()) <= 1     # the round structure: exact


@pytest.mark.parametrize("m", [BIG, 16381])
@pytest.mark.parametrize("weights", [(1, 2, 3, 4), (10, 20, 70), (1, 1, 1, 100), (3, 5, 7, 11, 13)])
def test_weights_give_proportional_shares(fill, m, weights):
    backends = list(zip(keys(len(weights)), weights))
    counts = Counter(ring.maglev(backends, m))
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[i] / m - w / total) <= 0.01, (i, w, counts[i])


# ---------------------------------------------------------------- maglev: disruption

def removals(n: int) -> list[int]:
    """First, middle and last by key, and up to three more picked by a seeded draw."""
    rest = [i for i in range(n) if i not in (0, n // 2, n - 1)]
    return sorted({0, n // 2, n - 1, *random.Random(n).sample(rest, min(3, len(rest)))})


@pytest.mark.parametrize("n", [2, 3, 5, 7, 10, 20, 50, 100, 200])
def test_removing_one_of_n_changes_about_one_nth(fill, n):
    """Measured (max over the removals here, M = 65537): 1/N plus 0.00% (N=2), 0.02% (3),
    0.09% (5), 0.20% (7), 0.22% (10), 0.44% (20), 0.46% (50), 0.58% (100), 0.80% (200)."""
    backends = equal(n)
    before = by_key(backends, ring.maglev(backends, BIG))
    for r in removals(n):
        rest = backends[:r] + backends[r + 1:]
        after = by_key(rest, ring.maglev(rest, BIG))
        assert backends[r][0] not in after
        assert changed(before, after) <= 1 / n + 0.01, (r, changed(before, after))


@pytest.mark.parametrize("m, n, measured", [(4099, 5, 0.0059), (4099, 10, 0.0134), (4099, 20, 0.0186)])
def test_removal_disruption_small_table(fill, m, n, measured):
    """The extra disruption shrinks as M grows, not as M/N grows: a 4099-slot table misses the
    1/N + 1% bound from N = 10 although M > 100 N (M = 65537: + 0.23% at N = 10, + 0.44% at
    N = 20). The figures are pinned; the cases over the bound are reported as xfail."""
    backends = equal(n)
    before = by_key(backends, ring.maglev(backends, m))
    worst = 0.0
    for r in range(n):
        rest = backends[:r] + backends[r + 1:]
        worst = max(worst, changed(before, by_key(rest, ring.maglev(rest, m))) - 1 / n)
    assert worst == pytest.approx(measured, abs=0.0001)
    if worst > 0.01:
        pytest.xfail(f"plain Maglev at M={m}, N={n} changes 1/N + {worst:.2%} of the slots")


@pytest.mark.parametrize("weights", [(1, 2, 3, 4), (10, 20, 70), (3, 5, 7, 11, 13)])
def test_removing_a_weighted_backend_changes_about_its_share(fill, weights):
    backends = list(zip(keys(len(weights)), weights))
    before = by_key(backends, ring.maglev(backends))
    for r, w in enumerate(weights):
        rest = backends[:r] + backends[r + 1:]
        assert changed(before, by_key(rest, ring.maglev(rest))) <= w / sum(weights) + 0.01


@pytest.mark.parametrize("n", [3, 10, 100])
def test_adding_a_backend_back_restores_the_table(fill, n):
    backends = equal(n)
    before = by_key(backends, ring.maglev(backends))
    for r in removals(n):
        rest = backends[:r] + backends[r + 1:]
        back = rest + [backends[r]]                       # at the end this time
        assert by_key(back, ring.maglev(back)) == before


def test_only_weight_ratios_matter(fill):
    scaled = [(k, 10 * w) for k, w in zip(keys(4), (1, 2, 3, 7))]
    assert ring.maglev(scaled) == ring.maglev([(k, w // 10) for k, w in scaled])


def test_weight_zero_is_the_same_as_absent(fill):
    backends = list(zip(keys(6), (3, 0, 1, 1, 0, 2)))
    table = ring.maglev(backends, 4099)
    assert {1, 4} & set(table) == set()
    present = [b for b in backends if b[1] > 0]
    assert by_key(backends, table) == by_key(present, ring.maglev(present, 4099))


# ---------------------------------------------------------------- maglev: determinism

def test_order_of_backends_does_not_matter(fill):
    backends = list(zip(keys(20), [1, 2, 3, 4] * 5))
    want = by_key(backends, ring.maglev(backends))
    rng = random.Random(7)
    for _ in range(3):
        shuffled = rng.sample(backends, len(backends))
        assert by_key(shuffled, ring.maglev(shuffled)) == want


def test_table_is_pinned(fill):
    """A changed hash or fill reshuffles every VIP's new flows on upgrade: make it deliberate."""
    assert ring.permutation("10.0.0.1:80", BIG) == (16735, 56956)
    assert ring.permutation("[2001:db8::1]:443", 4099) == (590, 2354)
    backends = [("10.0.0.1:80", 1), ("10.0.0.2:80", 2), ("10.0.0.3:80", 3)]
    assert list(ring.maglev(backends, 13)) == [2, 1, 2, 2, 1, 1, 1, 2, 0, 2, 2, 0, 2]
    text = ",".join(map(str, ring.maglev(backends)))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "fa3dbba82894e8c0"


def random_case(rng: random.Random, primes: list[int]) -> tuple[list[tuple[str, int]], int]:
    m = rng.choice(primes)
    n = rng.randint(1, min(60, m - 1))
    weights = [rng.choice((0, 1, 1, 1, 2, 3, 7, 100)) for _ in range(n)]
    if not any(weights):
        weights[0] = 1
    return [(f"be-{rng.getrandbits(32):08x}:{i}", w) for i, w in enumerate(weights)], m


def test_fills_match_the_reference(fill):
    rng = random.Random(1)
    primes = [p for p in range(2, 1000) if ring.is_prime(p)]
    for _ in range(150):
        backends, m = random_case(rng, primes)
        assert list(ring.maglev(backends, m)) == reference_maglev(backends, m), (backends, m)


def test_c_and_python_fills_agree(c_helper, monkeypatch):
    rng = random.Random(2)
    primes = [251, 1021, 4099, 10007, 16381, BIG]
    for _ in range(60):
        backends, m = random_case(rng, primes)
        monkeypatch.setattr(ring, "_lib", lambda: c_helper)
        c = ring.maglev(backends, m)
        monkeypatch.setattr(ring, "_lib", lambda: None)
        assert c == ring.maglev(backends, m), (backends, m)


def test_shape_and_empty_inputs(fill):
    table = ring.maglev(equal(3))
    assert isinstance(table, array.array) and table.typecode == "I"
    assert len(table) == ring.DEFAULT_TABLE_SIZE
    assert len(ring.maglev(equal(3), 7)) == 7
    for empty in ([], [("a:1", 0), ("b:1", 0)]):
        out = ring.maglev(empty)
        assert isinstance(out, array.array) and out.typecode == "I" and len(out) == 0


def test_one_backend_owns_everything(fill):
    assert set(ring.maglev([("a:1", 0), ("b:1", 5)], 101)) == {1}


def test_values_fill_the_table_in_place_of_indices(fill):
    """values= (the balancer passes backend ids) gives the index table mapped through values."""
    backends = [("a:1", 3), ("b:1", 0), ("c:1", 1), ("d:1", 2)]
    ids = [4095, 7, 2**32 - 1, 0]
    assert ring.maglev(backends, 4099, values=ids) == array.array("I", (ids[i] for i in ring.maglev(backends, 4099)))


@pytest.mark.parametrize("values, message", [
    ([1, 2], "2 values for 3 backends"),
    ([1, 2, -1], "value -1 is not a u32"),
    ([1, 2, 2**32], "is not a u32"),
    ([1, 2, True], "value True is not a u32"),
])
def test_bad_values(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ring.maglev(equal(3), 101, values=values)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("backends, size, message", [
    (equal(3), 65536, "table size 65536 is not prime"),
    (equal(3), 1, "table size 1 is not prime"),
    (equal(3), 4099.0, "table size 4099.0 is not an integer"),
    (equal(3), True, "is not an integer"),
    (equal(3), 3, "must be larger than the number of backends with a weight (3)"),
    ([], 2**61 - 1, "larger than 2147483647"),
    (equal(2) + [("10.0.0.1:80", 1)], 7, "key '10.0.0.1:80' appears twice"),
    ([("a:1", -1)], 7, "weight -1 is out of range"),
    ([("a:1", 2**32)], 7, "weight 4294967296 is out of range"),
    ([("a:1", 1.5)], 7, "weight 1.5 is not an integer"),
    ([("a:1", True)], 7, "weight True is not an integer"),
    ([("a:1", "1")], 7, "weight '1' is not an integer"),
    ([(1, 1)], 7, "key 1 is not a non-empty string"),
    ([("", 1)], 7, "key '' is not a non-empty string"),
    ([("a:1", 1, 2)], 7, "is not a (key, weight) pair"),
    (["a:1"], 7, "is not a (key, weight) pair"),
])
def test_bad_input_is_a_value_error_naming_it(backends, size, message):
    with pytest.raises(ValueError) as e:
        ring.maglev(backends, size)
    assert message in str(e.value)


def test_weight_zero_backends_do_not_count_against_the_size():
    assert set(ring.maglev(equal(2) + [("z:1", 0)], 3)) == {0, 1}


# ---------------------------------------------------------------- weighted_rr

def test_rr_equal_weights_is_the_identity():
    for n in (1, 2, 5, 17):
        assert list(ring.weighted_rr(equal(n))) == list(range(n))
        assert list(ring.weighted_rr([(k, 7) for k in keys(n)])) == list(range(n))


def test_rr_is_nginx_smooth_round_robin():
    assert list(ring.weighted_rr([("a", 5), ("b", 1), ("c", 1)])) == [0, 0, 1, 0, 2, 0, 0]


@pytest.mark.parametrize("weights", [(5, 1, 1), (1, 2, 3, 4), (10, 20, 70), (1, 1, 1, 100),
                                     (3, 0, 6, 9), (4, 6), (1, 200), (7, 11, 13, 17, 19)])
def test_rr_counts_and_gaps(weights):
    backends = list(zip(keys(len(weights)), weights))
    seq = list(ring.weighted_rr(backends))
    g = math.gcd(*weights)
    assert Counter(seq) == {i: w // g for i, w in enumerate(weights) if w}
    assert seq == list(ring.weighted_rr(backends))
    period = len(seq)
    for i, w in enumerate(weights):
        if not w:
            continue
        at = [t for t, x in enumerate(seq) if x == i]
        gaps = [(b - a) % period or period for a, b in zip(at, at[1:] + at[:1])]
        # never more than twice the ideal spacing (measured at most 1.99x over 3000 random
        # weight sets of 2..40 backends; a plain "all of i, then all of j" would hit period - w)
        assert max(gaps) <= 2 * period / (w // g), (i, gaps)


def test_rr_random_weights_are_spread():
    rng = random.Random(3)
    for _ in range(200):
        weights = [rng.randint(1, 30) for _ in range(rng.randint(2, 15))]
        seq = list(ring.weighted_rr(list(zip(keys(len(weights)), weights))))
        g = math.gcd(*weights)
        for i, w in enumerate(weights):
            at = [t for t, x in enumerate(seq) if x == i]
            gaps = [(b - a) % len(seq) or len(seq) for a, b in zip(at, at[1:] + at[:1])]
            assert max(gaps) <= 2 * len(seq) / (w // g)


def test_rr_empty_zero_and_limits():
    assert len(ring.weighted_rr([])) == 0
    assert len(ring.weighted_rr([("a", 0)])) == 0
    assert ring.weighted_rr([("a", 0)]).typecode == "I"
    with pytest.raises(ValueError, match="period is 2000001 slots"):
        ring.weighted_rr([("a", 1_000_000), ("b", 1_000_001)])
    assert len(ring.weighted_rr([("a", 3), ("b", 4)], limit=7)) == 7
    with pytest.raises(ValueError, match="appears twice"):
        ring.weighted_rr([("a", 1), ("a", 2)])
    with pytest.raises(ValueError, match="out of range"):
        ring.weighted_rr([("a", -1)])


# ---------------------------------------------------------------- the C helper's build

def test_build_failure_says_what_failed(tmp_path):
    with pytest.raises(RuntimeError, match="cannot run /nonexistent/cc"):
        ring.build_accelerator(dest=tmp_path, cc="/nonexistent/cc")
    with pytest.raises(RuntimeError, match="failed"):
        ring.build_accelerator(dest=tmp_path, cc="false")
    assert list(tmp_path.iterdir()) == []


def test_status_reports_the_fill(monkeypatch, capsys):
    monkeypatch.setattr(ring, "_lib", lambda: None)
    assert ring.main(["status"]) == 1
    assert "filled in Python" in capsys.readouterr().out
