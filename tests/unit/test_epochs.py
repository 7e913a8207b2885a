"""Slow start and drains on shared wall-clock epochs (issue 14): nodes step together.

Two nodes get the same config at slightly different moments (as from etcd), and their daemons were
started at different moments: at any wall-clock instant they must hold the same weights (so the
same tables), and end a drain at the same boundary.
"""

from __future__ import annotations

from ipaddress import ip_address as A

import pytest

from lbxdp import applied, edits, model
from lbxdp.balancer import STEP, WEIGHT_SCALE, epoch_ceil, epoch_floor
from lbxdp.daemon import TICK, TICK_LAG, until_next_tick

B1 = model.Backend(A("10.0.1.1"), 80)
B2 = model.Backend(A("10.0.1.2"), 80, weight=3)
OLD = model.Config((model.Vip(A("10.0.0.1"), 80, model.Protocol.TCP, backends=(B1,), slow_start=30),))
NEW = model.Config((model.Vip(A("10.0.0.1"), 80, model.Protocol.TCP, backends=(B1, B2), slow_start=30),))
T0 = 1_700_000_000.0


def node(started: float, told: float) -> applied.State:
    """A node whose state began at `started` (its own history) and got NEW at `told`."""
    return applied.State().moved_to(OLD, started).moved_to(NEW, told)


def weights(st: applied.State, now: float) -> list[int]:
    rt = st.runtime(now)
    v = st.cfg.vips[0]
    return [rt.weight(v, b) for b in v.backends]


def test_epoch_helpers() -> None:
    assert STEP == TICK == 1.0
    assert epoch_floor(T0 + 0.7) == T0 and epoch_ceil(T0 + 0.2) == T0 + 1 and epoch_ceil(T0) == T0


def test_two_nodes_told_at_different_moments_hold_the_same_weights_at_every_instant() -> None:
    a = node(started=T0 - 5000.3, told=T0 + 0.12)
    b = node(started=T0 - 100.4, told=T0 + 0.81)    # another daemon, another moment in the same step
    assert a.joined[NEW.vips[0].id_of(B2)] == b.joined[NEW.vips[0].id_of(B2)] == T0 + 1
    seen = set()
    for i in range(0, 400):
        now = T0 + 0.81 + i * 0.0777
        wa, wb = weights(a, now), weights(b, now)
        assert wa == wb, (now, wa, wb)
        seen.add(wa[1])
    assert len(seen) > 20 and max(seen) == 3 * WEIGHT_SCALE   # it did ramp, in many steps, to the end


def test_the_ramp_moves_only_at_boundaries() -> None:
    st = node(started=T0, told=T0 + 0.5)
    joined = T0 + 1
    for k in range(1, 30):
        inside = {weights(st, joined + k + f)[1] for f in (0.0, 0.3, 0.999)}
        assert inside == {int(3 * WEIGHT_SCALE * (k / 30))}, (k, inside)


def test_without_epochs_the_nodes_would_differ() -> None:
    """The property above is not free: read at raw instants, the two nodes' joins differ."""
    a = node(started=T0, told=T0 + 0.12)
    b = node(started=T0, told=T0 + 0.81)
    v = NEW.vips[0]
    a_raw, b_raw = T0 + 0.12, T0 + 0.81   # what the joins were before epochs
    now = T0 + 10.5
    share = [int(3 * WEIGHT_SCALE * (now - j) / 30) for j in (a_raw, b_raw)]
    assert share[0] != share[1]
    assert weights(a, now) == weights(b, now)
    assert a.joined[v.id_of(B2)] == b.joined[v.id_of(B2)]


@pytest.mark.parametrize("asked", [0.01, 0.5, 0.99])
def test_a_drain_ends_at_a_boundary(asked: float) -> None:
    bid = NEW.vips[0].id_of(B1)
    ch = edits.backend_drain(NEW, bid, T0 + 30 + asked)
    assert ch.drain == {bid: T0 + 31}


@pytest.mark.parametrize("phase", [0.0, 0.004, 0.3, 0.999])
def test_the_daemon_ticks_just_after_each_boundary(phase: float) -> None:
    now = T0 + 7 + phase
    at = now + until_next_tick(now)
    assert at == pytest.approx(T0 + 8 + TICK_LAG)
