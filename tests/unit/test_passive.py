"""Passive health's decisions (lbxdp.passive): failures counted since a baseline across the
program's resets, the max_ejected cap, and the tracker's suspect/settle cycle. No kernel."""

from __future__ import annotations

import pytest

from lbxdp.passive import Failures, Signals, Tracker, decide, ejection_cap, failures_since, may_eject


def sig(consecutive=0, rst=0, retx=0, synack=0, timeouts=0) -> Signals:
    return Signals(consecutive, rst, retx, synack, timeouts)


def test_failures_add_up_since_the_baseline_without_a_synack():
    assert failures_since(sig(3, rst=3, synack=7), sig(10, rst=8, retx=2, synack=7)) == Failures(7, 5, 2, 0)


def test_a_synack_since_the_baseline_counts_only_the_failures_after_it():
    # 5 failures, a SYN-ACK (the program resets the count), then 2 more rsts
    assert failures_since(sig(5, rst=5, synack=1), sig(2, rst=7, synack=2)) == Failures(2, 2, 0, 0)


def test_a_reset_seen_only_as_a_lower_count_is_a_reset_too():
    assert failures_since(sig(9, retx=9), sig(1, retx=10)).total == 1


def test_timeouts_after_the_last_synack_count():
    assert failures_since(sig(0, synack=4, timeouts=2), sig(1, retx=1, synack=4, timeouts=5)) == Failures(4, 0, 1, 3)
    # timeouts seen before a newer SYN-ACK do not: the rebase starts from that SYN-ACK
    assert failures_since(sig(0, synack=4, timeouts=2), sig(0, synack=5, timeouts=5)).total == 0


@pytest.mark.parametrize("n,share,cap", [(1, 0.5, 0), (2, 0.5, 1), (4, 0.5, 2), (10, 0.3, 3), (3, 1.0, 3),
                                         (5, 0.0, 0), (7, 0.5, 3)])
def test_the_cap_is_the_floor_of_the_share(n, share, cap):
    assert ejection_cap(n, share) == cap
    assert may_eject(n, cap - 1, share) if cap else not may_eject(n, 0, share)
    assert not may_eject(n, cap, share)


def test_decide_ejects_up_to_the_cap_most_failures_first_and_caps_the_rest():
    confirmed = [("v", "b1", 10), ("v", "b2", 30), ("v", "b3", 20), ("v", "b4", 10)]
    v = decide(confirmed, {"v": 4}, {}, {"v": 0.5})
    assert v.eject == ("b2", "b3") and v.capped == ("b1", "b4")


def test_decide_counts_backends_already_down_for_passive_health():
    v = decide([("v", "b3", 10)], {"v": 4}, {"v": 2}, {"v": 0.5})
    assert v.eject == () and v.capped == ("b3",)


def test_decide_keeps_each_vip_to_its_own_cap():
    v = decide([("a", "a1", 10), ("a", "a2", 10), ("b", "b1", 10)], {"a": 2, "b": 10}, {}, {"a": 0.5, "b": 0.1})
    assert set(v.eject) == {"a1", "b1"} and v.capped == ("a2",)


def test_a_spoofed_flood_that_suspects_everyone_ejects_at_most_the_cap():
    """Every backend of a 10-backend VIP confirmed failing (the worst a flood plus an outage can
    do): exactly floor(10 x 0.3) go down, whatever the order."""
    confirmed = [("v", f"b{i}", 100 + i) for i in range(10)]
    v = decide(confirmed, {"v": 10}, {}, {"v": 0.3})
    assert len(v.eject) == 3 and len(v.capped) == 7


def test_tracker_suspects_once_at_the_threshold_and_counts_again_after_settling():
    t = Tracker(failures={"b": 10})
    assert t.observe({"b": sig(0)}) == {}                       # first sight: the baseline
    assert t.observe({"b": sig(9, rst=9)}) == {}
    got = t.observe({"b": sig(10, rst=10)})
    assert got == {"b": Failures(10, 10, 0, 0)}
    assert t.observe({"b": sig(50, rst=50)}) == {}              # pending: not suspected twice
    t.settle("b", sig(50, rst=50))                             # cleared by its check
    assert t.observe({"b": sig(59, rst=59)}) == {}
    assert t.observe({"b": sig(60, rst=60)})["b"].total == 10


def test_tracker_starts_from_the_current_signals_and_ignores_exempt_backends():
    t = Tracker(failures={"b": 3})
    t.observe({"b": sig(100, rst=100)})                         # an old count (e.g. a daemon restart)
    assert t.observe({"b": sig(102, rst=102)}) == {}
    assert t.observe({"b": sig(200, rst=200)}, exempt={"b"}) == {}   # down: the baseline follows
    assert t.observe({"b": sig(202, rst=202)}) == {}
    assert "b" in t.observe({"b": sig(203, rst=203)})


def test_tracker_forgets_backends_that_are_gone():
    t = Tracker(failures={"b": 1})
    t.observe({"b": sig(0)})
    t.observe({"b": sig(5)})
    assert "b" in t.pending
    t.observe({})
    assert "b" not in t.pending and "b" not in t.base


S = 10**9   # ns


def dsr(pending=0, since=0, retx=0, synack=0) -> Signals:
    """A dsr VIP's signals: consecutive = retransmissions since the last ACK."""
    return Signals(retx, 0, retx, synack, 0, pending, since)


def test_pending_handshakes_count_once_the_first_is_past_the_timeout():
    base = dsr(0, 0)
    now = dsr(7, since=100 * S)
    assert failures_since(base, now, 100 * S + int(0.29 * S), 0.3) == Failures()
    assert failures_since(base, now, 100 * S + int(0.3 * S), 0.3) == Failures(7, 0, 0, 0, 7)
    assert failures_since(base, now, 200 * S, None).total == 0, "no timeout (nat): not counted"
    # the retransmissions of the same handshakes: the larger count, not the sum
    assert failures_since(base, dsr(7, 100 * S, retx=3), 101 * S, 0.3) == Failures(7, 0, 3, 0, 7)
    assert failures_since(base, dsr(2, 100 * S, retx=5), 101 * S, 0.3).total == 5


def test_pending_handshakes_already_in_the_baseline_count_only_in_the_same_run():
    # settled at 7 pending of the run that began at 100 s: 3 more since
    assert failures_since(dsr(7, 100 * S), dsr(10, 100 * S), 101 * S, 0.3).unfinished == 3
    # an ACK (synack moved) ended that run: the new run's 4 all count
    assert failures_since(dsr(7, 100 * S), dsr(4, 105 * S, synack=1), 106 * S, 0.3).unfinished == 4


def test_tracker_suspects_a_silent_backend_on_unfinished_handshakes_and_keeps_quiet_after_a_clear():
    t = Tracker(failures={"b": 5}, timeout={"b": 0.3})
    assert t.observe({"b": dsr()}, now_ns=10 * S) == {}
    assert t.observe({"b": dsr(5, 10 * S)}, now_ns=10 * S + S // 10) == {}      # not yet 0.3 s old
    got = t.observe({"b": dsr(6, 10 * S)}, now_ns=10 * S + S // 3)
    assert got == {"b": Failures(6, 0, 0, 0, 6)}
    t.settle("b", dsr(6, 10 * S), quiet_until=12 * S)                          # its check passed
    assert t.observe({"b": dsr(50, 10 * S)}, now_ns=11 * S) == {}               # quiet: a flood
    assert t.observe({"b": dsr(50, 10 * S)}, now_ns=12 * S)["b"].unfinished == 44


@pytest.mark.parametrize("mode, port, timeout", [("dsr", 80, 0.5), ("gue", 80, 0.5), ("nat", 8080, 2.0)])
def test_the_timeout_defaults_to_half_a_second_on_dsr_and_two_on_nat(mode, port, timeout):
    """[vip.passive_health] timeout: dsr/ipip/gue see the handshake's final ACK one client RTT after
    its SYN (model.DSR_PASSIVE_TIMEOUT); nat keeps its SYN_SENT scan's 2 s."""
    from lbxdp import config, model
    text = (f'[[vip]]\naddress = "10.0.9.1"\nport = 80\nprotocol = "tcp"\nmode = "{mode}"\n'
            f'  [vip.passive_health]\n  failures = 5\n'
            f'  [[vip.backend]]\n  address = "10.1.0.5"\n  port = {port}\n  mac = "02:00:00:00:00:05"\n')
    cfg = config.parse(text)
    assert cfg.vips[0].passive_health == model.PassiveHealth(5, timeout, 0.5)
    assert config.parse(config.dump(cfg)) == cfg
