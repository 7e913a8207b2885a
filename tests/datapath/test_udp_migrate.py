"""UDP flow migration (issue 13): a UDP flow recorded on a backend that goes down moves to a live
backend on its next packet when its VIP says on_backend_down = "migrate", and stays when it says
"keep" (the default: a stateful UDP service keeps its sessions while a check flaps).

What runs is what lbxdp.control runs on a health transition: Balancer.apply with the backend in
Runtime.down (the table loses it), then control._migrating_entries + Maps.purge_flows (the
migrate VIPs' flows of the newly down backends leave the connection table); then real datagrams
of the recorded flows go through the program.
"""

from __future__ import annotations

import dataclasses

import pytest
from scapy.layers.l2 import Ether

from lbxdp import control, model
from lbxdp.balancer import Runtime

from .frames import BASE, UDP_, XDP_TX, backends, plus, udp, vip

pytestmark = pytest.mark.root


def _vip(addr: str, tag: int, on_down: str) -> model.Vip:
    return dataclasses.replace(vip(addr, 5000, UDP_, backends(f"10.10.{tag}.", 3, tag, port=5000),
                                   model.Scheduler.MAGLEV), table_size=4099, on_backend_down=on_down)


MIG = _vip("10.10.0.50", 0x50, "migrate")
KEEP = _vip("10.10.0.51", 0x51, "keep")


def to(lb, v: model.Vip, sport: int) -> model.Backend:
    out = lb.run(udp(str(v.address), 5000, sport))
    assert out.retval == XDP_TX
    [be] = [b for b in v.backends if b.mac == Ether(out.data).dst]
    return be


@pytest.mark.parametrize("v", [MIG, KEEP], ids=["migrate", "keep"])
def test_udp_flow_of_a_down_backend(lb, v):
    cfg = plus(BASE, v)
    lb.apply(cfg)
    first = {sport: to(lb, v, sport) for sport in range(30000, 30120)}   # recorded (settled VIP)
    victim = v.backends[0]
    pinned = [s for s, b in first.items() if b == victim]
    assert len(pinned) > 10
    assert all(to(lb, v, s) == first[s] for s in first)               # established: they stay
    down = frozenset({v.id_of(victim)})
    lb.apply(cfg, Runtime(down=down))
    purged = lb.maps.purge_flows(control._migrating_entries(lb.maps, cfg, set(down)))
    after = {s: to(lb, v, s) for s in first}
    if v.on_backend_down is model.OnBackendDown.MIGRATE:
        assert purged == len(pinned)
        assert victim not in after.values()
        assert all(after[s] == first[s] for s in first if s not in pinned)   # only its flows moved
    else:
        assert purged == 0
        assert all(after[s] == first[s] for s in first)
    # a new flow never goes to the down backend either way
    assert victim not in {to(lb, v, s) for s in range(31000, 31100)}
