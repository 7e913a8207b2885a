"""Drains, slow starts and backups as the balancer weighs them, and the applied state that keeps
them between processes: pure logic, no kernel."""

from __future__ import annotations

import ipaddress

import pytest

from lbxdp import applied, model
from lbxdp.balancer import WEIGHT_SCALE, Runtime, usable
from lbxdp.cli.params import parse_endpoint, parse_vip
from lbxdp.errors import LbxError

A = ipaddress.ip_address


def vip(*backends: model.Backend, slow_start: float = 0.0) -> model.Vip:
    return model.Vip(A("10.0.0.1"), 80, model.Protocol.TCP, backends=backends, slow_start=slow_start)


B1, B2 = model.Backend(A("10.0.1.1"), 80), model.Backend(A("10.0.1.2"), 80, weight=3)
BK = model.Backend(A("10.0.1.9"), 80, backup=True)


def ref(v: model.Vip, b: model.Backend) -> model.BackendId:
    return v.id_of(b)


def test_weights_are_scaled_and_drains_weigh_nothing() -> None:
    v = vip(B1, B2)
    assert usable(v, Runtime()) == [(0, WEIGHT_SCALE), (1, 3 * WEIGHT_SCALE)]
    assert usable(v, Runtime(draining=frozenset({ref(v, B1)}))) == [(1, 3 * WEIGHT_SCALE)]


def test_backups_only_while_no_primary_is_usable() -> None:
    v = vip(B1, B2, BK)
    assert [i for i, _ in usable(v, Runtime())] == [0, 1]
    all_drained = Runtime(draining=frozenset({ref(v, B1), ref(v, B2)}))
    assert usable(v, all_drained) == [(2, WEIGHT_SCALE)]
    zero = vip(model.Backend(A("10.0.1.1"), 80, weight=0), BK)
    assert usable(zero, Runtime()) == [(1, WEIGHT_SCALE)]


def test_slow_start_ramps_from_zero_to_the_weight() -> None:
    v = vip(B1, B2, slow_start=10)
    joined = {ref(v, B2): 100.0}
    weights = [Runtime(joined=joined, now=t).weight(v, B2) for t in (100.0, 102.5, 105.0, 110.0, 200.0)]
    assert weights == [0, 60, 150, 300, 300]   # read at the last STEP boundary: 102.5 -> 102
    assert Runtime(joined=joined, now=105.0).ramping(v) and not Runtime(joined=joined, now=110.0).ramping(v)
    assert Runtime(joined=joined, now=101).weight(v, B1) == WEIGHT_SCALE  # joined at no known time


def test_state_tracks_joins_and_forgets_what_left() -> None:
    v1 = vip(B1)
    st = applied.State().moved_to(model.Config((v1,)), now=10.0)
    assert st.joined == {v1.id_of(B1): 10.0}
    v2 = vip(B1, B2)
    st.draining[v2.id_of(B1)] = 50.0
    st2 = st.moved_to(model.Config((v2,)), now=20.0)
    assert st2.joined == {v2.id_of(B1): 10.0, v2.id_of(B2): 20.0}
    assert st2.expired_drains(49.0) == [] and st2.expired_drains(50.0) == [v2.id_of(B1)]
    done = st2.moved_to(st2.without(st2.expired_drains(50.0)), now=50.0)
    assert done.cfg.vips[0].backends == (B2,) and done.draining == {}
    rt = st2.runtime(now=30.0)
    assert rt.draining == frozenset({ref(v2, B1)})


def test_state_survives_a_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path))
    from lbxdp.paths import Instance
    inst = Instance("eth9")
    st = applied.State().moved_to(model.Config((vip(B1, B2, BK, slow_start=5),)), now=1.0)
    st.draining[model.BackendId.parse("10.0.0.9:80/tcp|10.0.1.9:80")] = 3.0   # kept, though of no VIP
    applied.save(inst, st)
    back = applied.load(inst)
    assert back.cfg == st.cfg and back.joined == st.joined and back.draining == st.draining
    with applied.locked(inst):
        pass
    assert applied.load(Instance("none")).cfg == model.Config()


@pytest.mark.parametrize("text,expect", [
    ("10.0.0.1:80", (A("10.0.0.1"), 80)),
    ("[fd00::1]:53", (A("fd00::1"), 53)),
    ("10.0.0.1:*", (A("10.0.0.1"), 0)),
])
def test_parse_endpoint(text: str, expect: tuple) -> None:
    assert parse_endpoint(text, "backend") == expect


@pytest.mark.parametrize("text", ["10.0.0.1", "fd00::1:80", "[10.0.0.1]:80", "10.0.0.1:70000", "x:80", ""])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(LbxError) as ei:
        parse_endpoint(text, "backend")
    assert ei.value.exit_code == 2 and repr(text) in ei.value.message


def test_parse_vip_names_match_status_names() -> None:
    k = parse_vip("[fd00::1]:53/udp")
    assert k == model.VipKey(A("fd00::1"), 53, model.Protocol.UDP) and k.name == "[fd00::1]:53/udp"
    with pytest.raises(LbxError):
        parse_vip("10.0.0.1:80/sctp")
