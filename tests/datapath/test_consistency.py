"""Cross-node consistency through the real program (issue 14): two separately compiled and loaded
builds, filled with the same VIP but with different VIP and backend entry ids (as two nodes with
different histories have), send every new flow to the same backend. A flow that lands on a node
that has never seen it (ECMP moved it) thus reaches the backend it started on, as long as the
backend set is the same (flow_hash has no seed; the Maglev fill depends on the keys only).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from lbxdp import model

from .conftest import compiled
from .frames import BASE, LB_MAC, XDP_TX, backends, new_flows, vip
from .harness import Lb

WEB = vip("10.10.0.40", 80, model.Protocol.TCP,
          tuple(dataclasses.replace(b, weight=w) for b, w in zip(backends("10.10.40.", 5, 0x40), (1, 2, 1, 3, 1))),
          model.Scheduler.MAGLEV)
OTHER = vip("10.10.0.41", 80, model.Protocol.TCP, backends("10.10.41.", 7, 0x41), model.Scheduler.MAGLEV)
FLOWS = 2000


def backend_macs(lb: Lb, frames: list[bytes]) -> list[bytes]:
    out = []
    for f in frames:
        r = lb.run(f)
        assert r.retval == XDP_TX
        out.append(r.data[:6])   # the destination MAC: the backend's
    return out


def test_two_builds_with_different_entry_ids_pick_the_same_backend_for_every_flow(lb: Lb) -> None:
    """a: the session's build, with the base config and WEB; b: a build of its own, OTHER and WEB."""
    frames = new_flows(str(WEB.address), 80, FLOWS, first=3000)
    with compiled() as b_prog:
        a, b = lb, Lb(b_prog)
        a.apply(model.Config(vips=(*BASE.vips, WEB)))
        b.apply(model.Config(vips=(OTHER, WEB)))           # OTHER first: other VIP and backend ids
        b.maps.set_own_mac(LB_MAC)
        assert a.vip_id(WEB) != b.vip_id(WEB)
        assert [a.backend_id(WEB, x) for x in WEB.backends] != [b.backend_id(WEB, x) for x in WEB.backends]
        got_a, got_b = backend_macs(a, frames), backend_macs(b, frames)
    assert got_a == got_b
    spread = Counter(got_a)
    assert len(spread) == len(WEB.backends), spread      # a real spread, not one backend for all
