"""Admission of new flows (bpf/admit.h): CIDR allow/deny (acl.h) and per-source limits (limit.h).

Set up through the real control plane (Balancer.apply of a config with allow/deny and
new_flow_limit keys). The `lb` fixture re-applies frames.BASE (no rules, no limits) before each
test; the limiter's per-source state is emptied here, since BASE does not touch it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import threading
import time
from typing import Iterator

import pytest

from lbxdp import abi, model
from lbxdp.maps import addr_bytes, src_limit_set, src_limit_tat

from .conftest import compiled
from .frames import (BASE, CLIENT4, LB_MAC, CLIENT6, DNS4, TCP_, WEB4, WEB6, OTHER4, XDP_DROP, XDP_PASS, XDP_TX, backends,
                     plus, tcp, tcp_bytes, udp, vip)
from .harness import Case, Lb, check
from .harness import new_flow as _tx

pytestmark = pytest.mark.root
R = abi.Reason
V4, V6 = str(WEB4.address), str(WEB6.address)
# One backend each: tests that start several flows know where every one goes.
ONE4 = vip("10.10.0.30", 80, TCP_, backends("10.10.30.", 1, 0x30))
ONE6 = vip("fd10::30", 80, TCP_, backends("fd10:30::", 1, 0x31))
ONEU4 = vip("10.10.0.31", 53, model.Protocol.UDP, backends("10.10.31.", 1, 0x32))
O4, O6, OU4 = str(ONE4.address), str(ONE6.address), str(ONEU4.address)
BASE1 = plus(BASE, ONE4, ONE6, ONEU4)
net = ipaddress.ip_network


def with_admission(cfg: model.Config, glob: model.Admission = model.Admission(),
                   **per_vip: model.Admission) -> model.Config:
    """cfg with [balancer] admission glob and, per VIP of frames (by name: WEB4=...), its own."""
    from . import frames
    named = {"ONE4": ONE4, "ONE6": ONE6, "ONEU4": ONEU4}
    keys = {(named.get(name) or getattr(frames, name)).key: a for name, a in per_vip.items()}
    vips = tuple(dataclasses.replace(v, admission=keys.get(v.key, v.admission)) for v in cfg.vips)
    return dataclasses.replace(cfg, vips=vips, balancer=dataclasses.replace(cfg.balancer, admission=glob))


def clear_limiter(lb: Lb) -> None:
    """Empty every set of the limiter's per-CPU arrays that holds a bucket (bpf/limit.h)."""
    for m in (lb.prog.maps[abi.Map.SRC_LIMIT], lb.prog.maps[abi.Map.SRC_LIMIT4]):
        used = [int(keys[i]) for keys, values, n in m.batches() for i in range(n) if any(bytes(values[i]))]
        for k in used:
            m.zero(k)


@pytest.fixture
def fresh(lb: Lb) -> Iterator[Lb]:
    """lb with an empty limiter; BASE (no rules) is applied again afterwards, so nothing leaks."""
    clear_limiter(lb)
    yield lb
    lb.apply(BASE)
    clear_limiter(lb)


def _drop(desc: str, pkt, reason: abi.Reason) -> Case:
    return Case(desc, pkt, XDP_DROP, reason=reason)


# --- CIDR allow/deny ------------------------------------------------------------------------------

ACL = with_admission(
    BASE,
    model.Admission(deny=(net("198.51.100.0/24"), net("2001:db8:bad::/48"))),
    WEB4=model.Admission(allow=(net("192.0.2.0/24"),), deny=(net("192.0.2.128/25"),)),
    WEB6=model.Admission(allow=(net("2001:db8::/64"),)),
)

ACL_CASES = [
    _tx("v4: a source on the VIP's allow list", tcp(V4, 80, 42001), WEB4),
    _drop("v4: a source on no allow rule of the VIP", tcp(V4, 80, 42002, src="203.0.113.5"), R.DROP_ACL_NOT_ALLOWED),
    _drop("v4: the longest match decides: deny /25 inside allow /24", tcp(V4, 80, 42003, src="192.0.2.200"),
          R.DROP_ACL_DENY),
    _drop("v4: a global deny applies to a VIP with its own allow list", tcp(V4, 80, 42004, src="198.51.100.7"),
          R.DROP_ACL_DENY),
    _drop("v4: a global deny applies to a VIP without rules", udp(V4, 53, 42005, src="198.51.100.7"),
          R.DROP_ACL_DENY),
    _tx("v4: another VIP on the same address has no allow list", udp(V4, 53, 42006, src="203.0.113.5"), DNS4),
    Case("v4: traffic for no VIP from a denied source is not the ACL's", tcp(OTHER4, 80, 42007, src="198.51.100.7"),
         XDP_PASS, reason=R.PASS_NOT_VIP),
    _tx("v6: a source in the VIP's allowed /64", tcp(V6, 80, 42008, src=CLIENT6), WEB6),
    _drop("v6: a source outside it", tcp(V6, 80, 42009, src="2001:db8:1::5"), R.DROP_ACL_NOT_ALLOWED),
    _drop("v6: the global deny /48", tcp(V6, 80, 42010, src="2001:db8:bad:1::5"), R.DROP_ACL_DENY),
]


@pytest.mark.parametrize("case", ACL_CASES, ids=lambda c: c.desc)
def test_acl(fresh: Lb, case: Case) -> None:
    fresh.apply(ACL)
    check(fresh, case)


def test_the_trie_holds_the_rules_and_an_implicit_not_allowed_per_allow_list(fresh: Lb) -> None:
    fresh.apply(ACL)
    entries = fresh.maps.acl()
    glob = fresh.maps.global_scope
    assert {(e.scope, str(e.network), e.action) for e in entries if e.scope == glob} == {
        (glob, "198.51.100.0/24", abi.AclAction.DENY), (glob, "2001:db8:bad::/48", abi.AclAction.DENY)}
    web4 = fresh.vip_id(WEB4)
    assert {(str(e.network), e.action) for e in entries if e.scope == web4} == {
        ("192.0.2.0/24", abi.AclAction.ALLOW), ("192.0.2.128/25", abi.AclAction.DENY),
        ("0.0.0.0/0", abi.AclAction.NOT_ALLOWED), ("::/0", abi.AclAction.NOT_ALLOWED)}
    fresh.apply(BASE)
    assert fresh.maps.acl() == frozenset() and fresh.maps.admission() == {}


def test_status_reads_each_scopes_rules_and_limit_back(fresh: Lb) -> None:
    """lbxdp.view.read_admission (status, the exporter) over the real maps: rule counts without the
    implicit "not allowed" /0s, the limit back from lbx_admit's nanoseconds."""
    from lbxdp import view
    cfg = with_admission(ACL, model.Admission(deny=ACL.balancer.admission.deny,
                                              new_flow_limit=model.NewFlowLimit(300, 40)))
    fresh.apply(cfg)
    got = view.read_admission(fresh.maps)
    assert got[fresh.maps.global_scope] == view.AdmissionStatus(0, 2, 300, 40)
    assert got[fresh.vip_id(WEB4)] == view.AdmissionStatus(1, 1)
    assert got[fresh.vip_id(WEB6)] == view.AdmissionStatus(1, 0)
    fresh.apply(BASE)
    assert view.read_admission(fresh.maps) == {}


def test_replacing_rules_never_drops_allowed_traffic(fresh: Lb) -> None:
    """A thread sends new flows from an allowed source while the rule set flips between two that
    both allow it, 40 times (each flip a new trie swapped in). Zero drops. A rule set updated in
    place (delete the old entries, insert the new) would refuse some of them in between: the
    VIP's implicit "not allowed" /0 outlives its allow rule."""
    a = with_admission(BASE1, ONE4=model.Admission(allow=(net("192.0.2.0/24"),)))
    b = with_admission(BASE1, model.Admission(deny=(net("203.0.113.0/24"),)),
                       ONE4=model.Admission(allow=(net("192.0.2.0/25"), net("10.0.0.0/8"))))
    fresh.apply(a)
    frames = [tcp_bytes(O4, 80, 1024 + i, CLIENT4) for i in range(30000)]
    stop, verdicts = threading.Event(), []

    def send() -> None:
        for f in frames:
            if stop.is_set():
                return
            verdicts.append(fresh.runner.run(f).retval)

    t = threading.Thread(target=send)
    deadline = time.monotonic() + 20
    t.start()
    try:
        for i in range(40):
            fresh.apply(b if i % 2 == 0 else a)
            assert time.monotonic() < deadline
    finally:
        stop.set()
        t.join(timeout=30)
    assert len(verdicts) > 100, "the sender did not overlap the swaps"
    assert verdicts.count(XDP_TX) == len(verdicts), \
        f"{len(verdicts) - verdicts.count(XDP_TX)} of {len(verdicts)} allowed frames not forwarded"
    fresh.apply(b)    # and the swaps did change the rules
    check(fresh, _drop("after the swaps", tcp(O4, 80, 42101, src="203.0.113.9"), R.DROP_ACL_DENY))


def test_established_flows_of_a_newly_denied_prefix_are_purged_and_dropped(fresh: Lb) -> None:
    """Documented choice (README, allow/deny): applying rules that refuse a source deletes its
    flows' connection-table entries, so the next packet is a new flow and meets the rules; the
    established fast path itself never looks at the ACL. Other flows keep their entries."""
    fresh.apply(BASE1)
    for flags in ("S", "A"):    # the handshake's ACK records the flow (select.h)
        check(fresh, _tx("a flow from the soon denied prefix", tcp(O4, 80, 42201, src="198.51.100.7", flags=flags),
                         ONE4))
        check(fresh, _tx("a flow from an allowed source", tcp(O4, 80, 42202, flags=flags), ONE4))
    assert fresh.maps.flow_count() == 2
    fresh.apply(with_admission(BASE1, model.Admission(deny=(net("198.51.100.0/24"),))))
    assert fresh.maps.flow_count() == 1
    check(fresh, _drop("its next segment is dropped", tcp(O4, 80, 42201, src="198.51.100.7", flags="A"),
                       R.DROP_ACL_DENY))
    check(fresh, _tx("the allowed flow goes on", tcp(O4, 80, 42202, flags="A"), ONE4))


def test_vip_meta_says_which_vips_admit_reads_lbx_admit_for(fresh: Lb) -> None:
    """admit() looks lbx_admit up only for a VIP whose meta has LBX_VIP_F_ADMIT (its own or the
    global scope has rules). Rules added to or removed from existing VIPs rewrite the flag,
    not the table (changed_at stays); a VIP added while the global scope has rules is born with it."""
    def flagged() -> dict[str, bool]:
        return {k.name: bool(m.flags & abi.VIP_F_ADMIT) for k, m in fresh.maps.vips().items()}
    fresh.apply(BASE1)
    before = fresh.maps.vips()
    assert not any(flagged().values())
    fresh.apply(with_admission(BASE1, ONE4=model.Admission(deny=(net("203.0.113.0/24"),))))
    assert [n for n, f in flagged().items() if f] == [ONE4.key.name]
    check(fresh, _drop("the VIP's rule applies", tcp(O4, 80, 42301, src="203.0.113.1"), R.DROP_ACL_DENY))
    check(fresh, _tx("another VIP has none", tcp(O6, 80, 42302, src="2001:db8::1"), ONE6))
    glob = with_admission(BASE, model.Admission(deny=(net("203.0.113.0/24"),)))
    fresh.apply(glob)
    assert all(flagged().values())
    fresh.apply(dataclasses.replace(glob, vips=BASE1.vips))    # ONE4, ONE6, ONEU4 new under global rules
    assert all(flagged().values())
    check(fresh, _drop("a new VIP meets the global rules", tcp(O4, 80, 42303, src="203.0.113.2"), R.DROP_ACL_DENY))
    fresh.apply(BASE1)
    after = fresh.maps.vips()
    assert not any(flagged().values())
    assert {k: (m.table_tag, m.changed_at) for k, m in after.items()} == \
        {k: (m.table_tag, m.changed_at) for k, m in before.items() if k in after}
    check(fresh, _tx("no rules again", tcp(O4, 80, 42304, src="203.0.113.3"), ONE4))


# --- per-source limits of new flows ----------------------------------------------------------------

def limited(rate: int, burst: int, glob: bool = False) -> model.Config:
    lim = model.Admission(new_flow_limit=model.NewFlowLimit(rate, burst))
    return with_admission(BASE1, lim) if glob else with_admission(BASE1, ONE4=lim, ONE6=lim, ONEU4=lim)


def test_burst_then_dropped_with_the_reason_per_source(fresh: Lb) -> None:
    fresh.apply(limited(rate=1, burst=5))    # one token a second: none comes back during the test
    for i in range(5):
        check(fresh, _tx(f"new flow {i + 1} of the burst", tcp(O4, 80, 43000 + i), ONE4))
    check(fresh, _drop("the burst is spent", tcp(O4, 80, 43010), R.DROP_SRC_RATE))
    check(fresh, _tx("another source has its own bucket", tcp(O4, 80, 43011, src="192.0.2.11"), ONE4))
    check(fresh, _tx("nor does an ACK of an unknown flow (a handshake's last)", tcp(O4, 80, 43012, flags="A"), ONE4))
    for i, flags in enumerate(("R", "F", "")):    # only a SYN opens a TCP flow (parse.h's LBX_PKT_F_SYN)
        check(fresh, _tx(f"nor a segment of an unknown flow with flags {flags!r}", tcp(O4, 80, 43014 + i, flags=flags),
                         ONE4))
    check(fresh, _drop("a SYN still is", tcp(O4, 80, 43017), R.DROP_SRC_RATE))
    check(fresh, _tx("a VIP without a limit", udp(V4, 53, 43013), DNS4))


def test_established_flows_never_pay(fresh: Lb) -> None:
    """A flow's first datagrams are charged until the flow is recorded (one, or two with the
    handshake gate of select.h, which records a UDP flow at its second datagram); then never."""
    fresh.apply(limited(rate=1, burst=3))
    for i in range(2):
        check(fresh, _tx("the flow's first datagrams", udp(OU4, 53, 43300), ONEU4))
    for sport in range(43301, 43304):    # new flows take the tokens left, then are refused
        if fresh.run(udp(OU4, 53, sport)).retval == XDP_DROP:
            break
    else:
        pytest.fail("a burst of 3 admitted 4 or more flows")
    check(fresh, _drop("no token left", udp(OU4, 53, 43310), R.DROP_SRC_RATE))
    for i in range(3):
        check(fresh, _tx("the established flow goes on", udp(OU4, 53, 43300), ONEU4))


def test_ipv6_sources_are_limited_by_their_64(fresh: Lb) -> None:
    fresh.apply(limited(rate=1, burst=2))
    check(fresh, _tx("first of the /64", tcp(O6, 80, 43100, src="2001:db8:5::1"), ONE6))
    check(fresh, _tx("another address of the same /64", tcp(O6, 80, 43101, src="2001:db8:5::2:3"), ONE6))
    check(fresh, _drop("a third: the /64's burst is spent", tcp(O6, 80, 43102, src="2001:db8:5::ffff"),
                       R.DROP_SRC_RATE))
    check(fresh, _tx("the next /64 has its own", tcp(O6, 80, 43103, src="2001:db8:5:1::1"), ONE6))


def test_a_global_limit_counts_a_source_over_every_vip(fresh: Lb) -> None:
    fresh.apply(limited(rate=1, burst=2, glob=True))
    check(fresh, _tx("to one VIP", tcp(O4, 80, 43200), ONE4))
    check(fresh, _tx("to another", udp(V4, 53, 43201), DNS4))
    check(fresh, _drop("the global burst is spent", tcp(O4, 80, 43202), R.DROP_SRC_RATE))


def test_the_limiter_admits_the_configured_rate_within_10_percent(fresh: Lb) -> None:
    """rate 2000/s, burst 1, one source, as many new flows as the test can send for 1.5 s. The
    buckets are per CPU (bpf/limit.h): the test pins itself to one CPU, else it could see up to
    nCPU x rate. Expected admitted = burst + rate x elapsed."""
    rate, window = 2000, 1.5
    fresh.apply(limited(rate=rate, burst=1))
    frames = [tcp_bytes(O4, 80, 1024 + i % 64000, f"192.0.2.{20 + i // 64000}") for i in range(3 * 64000)]
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        # only one source: 192.0.2.20 (the frames of the next addresses are not reached in time)
        before = fresh.maps.reasons()
        start = time.monotonic()
        sent = 0
        while sent < 64000 and time.monotonic() - start < window:
            fresh.runner.run(frames[sent])
            sent += 1
        elapsed = time.monotonic() - start
        delta = fresh.reason_delta(before)
    finally:
        os.sched_setaffinity(0, cpus)
    admitted = delta.get(R.TX_FORWARD, (0, 0))[0]
    dropped = delta.get(R.DROP_SRC_RATE, (0, 0))[0]
    assert admitted + dropped == sent
    assert sent > 3 * rate * elapsed, f"only {sent} frames in {elapsed:.2f} s: too slow to test {rate}/s"
    expected = 1 + rate * elapsed
    assert abs(admitted - expected) <= 0.1 * expected, \
        f"admitted {admitted} of {sent} in {elapsed:.3f} s; expected {expected:.0f} (rate {rate}/s)"


def _bucket(lb: Lb, family: int, src: str, scope_id: int) -> int | None:
    """The TAT of src's bucket in scope scope_id, found where lbxdp.maps.src_limit_set says the
    program keeps it (any CPU's copy: the test runs may land on either)."""
    m = lb.prog.maps[abi.Map.SRC_LIMIT4 if family == abi.FAMILY_V4 else abi.Map.SRC_LIMIT]
    raw, scope = addr_bytes(ipaddress.ip_address(src)), abi.acl_scope(family, scope_id)
    tats = [src_limit_tat(family, raw, scope, bytes(v))
            for v in m.lookup(src_limit_set(family, raw, scope, m.info.max_entries))]
    return max((t for t in tats if t), default=None)


def test_the_control_plane_finds_each_sources_bucket_where_the_program_put_it(fresh: Lb) -> None:
    """lbxdp.maps.src_limit_set mirrors limit.h's src_set_index (explain copies a source's set by
    it): after one SYN the source's bucket is in that set, v4 and v6 (by its /64)."""
    fresh.apply(limited(rate=1, burst=5))
    ids = {k.address.version: m.id for k, m in fresh.maps.vips().items() if k in (ONE4.key, ONE6.key)}
    assert _bucket(fresh, abi.FAMILY_V4, "192.0.2.77", ids[4]) is None
    check(fresh, _tx("a SYN from 192.0.2.77", tcp(O4, 80, 43400, src="192.0.2.77"), ONE4))
    check(fresh, _tx("a SYN from 2001:db8:77::1", tcp(O6, 80, 43401, src="2001:db8:77::1"), ONE6))
    assert _bucket(fresh, abi.FAMILY_V4, "192.0.2.77", ids[4]) is not None
    assert _bucket(fresh, abi.FAMILY_V4, "192.0.2.78", ids[4]) is None
    assert _bucket(fresh, abi.FAMILY_V6, "2001:db8:77::ffff", ids[6]) is not None, "keyed by the /64"
    assert _bucket(fresh, abi.FAMILY_V6, "2001:db8:78::1", ids[6]) is None


def test_a_new_source_in_a_full_set_takes_the_bucket_with_the_least_debt(fresh: Lb) -> None:
    """Five sources whose buckets share one set of four ways (bpf/limit.h): the fifth takes the
    way whose TAT is smallest, so the source deepest in debt keeps its bucket and stays refused,
    and the one forgotten starts again with a full bucket (an eviction never refuses anyone)."""
    fresh.apply(limited(rate=1, burst=2))
    vid = next(m.id for k, m in fresh.maps.vips().items() if k == ONE4.key)
    m = fresh.prog.maps[abi.Map.SRC_LIMIT4]
    scope, sets = abi.acl_scope(abi.FAMILY_V4, vid), m.info.max_entries
    want = src_limit_set(abi.FAMILY_V4, addr_bytes(ipaddress.ip_address("198.18.0.1")), scope, sets)
    same = [a for a in (str(ipaddress.ip_address("198.18.0.0") + i) for i in range(1, 1 << 20))
            if src_limit_set(abi.FAMILY_V4, addr_bytes(ipaddress.ip_address(a)), scope, sets) == want][:5]
    assert len(same) == 5
    deep, light, newcomer = same[0], same[1:4], same[4]
    port = iter(range(43500, 43600))
    for _ in range(2):
        check(fresh, _tx(f"{deep} spends its burst of 2", tcp(O4, 80, next(port), src=deep), ONE4))
    check(fresh, _drop(f"{deep} is refused", tcp(O4, 80, next(port), src=deep), R.DROP_SRC_RATE))
    for a in light:
        check(fresh, _tx(f"{a}: one flow (one token of debt)", tcp(O4, 80, next(port), src=a), ONE4))
    assert all(_bucket(fresh, abi.FAMILY_V4, a, vid) for a in same[:4])
    check(fresh, _tx(f"{newcomer}: a fifth source in the full set", tcp(O4, 80, next(port), src=newcomer), ONE4))
    assert _bucket(fresh, abi.FAMILY_V4, newcomer, vid) is not None
    assert _bucket(fresh, abi.FAMILY_V4, deep, vid) is not None, "the deepest debt is never the one forgotten"
    forgotten = [a for a in light if _bucket(fresh, abi.FAMILY_V4, a, vid) is None]
    assert len(forgotten) == 1
    check(fresh, _drop(f"{deep} is still refused", tcp(O4, 80, next(port), src=deep), R.DROP_SRC_RATE))
    for _ in range(2):
        check(fresh, _tx(f"{forgotten[0]} starts again with a full bucket", tcp(O4, 80, next(port), src=forgotten[0]),
                         ONE4))


# --- the rows above can fail ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unprotected() -> Iterator[Lb]:
    """The program built with -DLBX_NO_ADMISSION (admit.h admits everything), BASE applied; its own
    pin dir, removed on exit (conftest.compiled)."""
    with compiled(defines=("LBX_NO_ADMISSION",)) as prog:
        lb = Lb(prog)
        lb.apply(BASE)
        lb.maps.set_own_mac(LB_MAC)
        yield lb


def test_without_the_admission_stage_the_drop_rows_fail(unprotected: Lb) -> None:
    """Every ACL row that expects a drop, and the limiter's, fail on a build without admit():
    the frames are forwarded instead. So the rows above test admit.h, not something else."""
    unprotected.apply(ACL)
    drops = [c for c in ACL_CASES if c.verdict == XDP_DROP]
    assert len(drops) >= 5
    for case in drops:
        with pytest.raises(pytest.fail.Exception, match="verdict XDP_TX, expected XDP_DROP"):
            check(unprotected, case)
    unprotected.apply(limited(rate=1, burst=1))
    clear_limiter(unprotected)
    check(unprotected, _tx("first flow", tcp(O4, 80, 44000), ONE4))
    with pytest.raises(pytest.fail.Exception, match="verdict XDP_TX, expected XDP_DROP"):
        check(unprotected, _drop("the burst is spent", tcp(O4, 80, 44001), R.DROP_SRC_RATE))
