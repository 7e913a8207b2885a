"""A seeded mutation fuzz (scripts/fuzz_datapath.py, 20,000 frames): no forwarded frame breaks an
invariant (addressed to the balancer's MAC, lengths consistent with the frame, TTL > 0, a
plausible unicast source, a VIP's address, port and protocol, only the MACs rewritten; an ICMP
error only if it quotes a VIP flow, from a router, with a sane MTU).

The script runs a million frames and prints figures; this is its bounded, failing form, on the
session's program filled by the real control plane (frames.BASE, own MAC frames.LB_MAC).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .frames import BASE, LB_MAC
from .harness import Lb

pytestmark = pytest.mark.root

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_datapath.py"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_datapath", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("seed", [11, 12])
def test_mutated_frames_never_forwarded_broken(lb: Lb, seed: int) -> None:
    fz = _fuzz_module()
    rep = fz.fuzz(lb.runner, lb.maps, BASE, LB_MAC, frames=10_000, seed=seed, max_seconds=120)
    assert rep.frames == 10_000
    assert rep.verdicts["XDP_TX"] > 500, f"too few frames forwarded to mean anything: {dict(rep.verdicts)}"
    assert rep.reasons.get("TX_ICMP_STEERED", 0) > 40, f"too few ICMP errors steered: {rep.reasons}"
    detail = "\n".join(f"{','.join(bad)}: {fz.decode(f)}\n  {f.hex()}" for f, bad in rep.examples)
    assert rep.bad_frames == 0, f"{rep.bad_frames} forwarded frames break {dict(rep.broken)}:\n{detail}"


@pytest.mark.parametrize("seed", [21])
def test_mutated_frames_to_encap_vips_never_forwarded_broken(lb: Lb, seed: int) -> None:
    """The same fuzz over the ipip/gue VIPs of test_encap.py: every encapsulated output must carry
    the input's IP packet untouched behind a consistent outer header (encapsulated_ok())."""
    import dataclasses

    from .test_encap import CFG, OWN

    lb.apply(CFG)
    lb.maps.set_own_addresses(OWN)
    try:
        encap_only = dataclasses.replace(CFG, vips=tuple(v for v in CFG.vips if v.mode.encap and v.mtu is None))
        fz = _fuzz_module()
        rep = fz.fuzz(lb.runner, lb.maps, encap_only, LB_MAC, frames=6_000, seed=seed, max_seconds=120)
    finally:
        from lbxdp.maps import OwnAddresses
        lb.maps.set_own_addresses(OwnAddresses())
    assert rep.verdicts["XDP_TX"] > 300, f"too few frames forwarded to mean anything: {dict(rep.verdicts)}"
    detail = "\n".join(f"{','.join(bad)}: {fz.decode(f)}\n  {f.hex()}" for f, bad in rep.examples)
    assert rep.bad_frames == 0, f"{rep.bad_frames} forwarded frames break {dict(rep.broken)}:\n{detail}"

