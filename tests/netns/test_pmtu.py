"""Path MTU through lbxdp in DSR: ICMP errors about a VIP flow reach the flow's backend.

Shape multi (lbxdp/lab/shapes.py): cli - rt - {lb1, lb2, be1, be2} on one core segment. The
backends answer the client from the VIP (on their lo) through rt, whose hop to the client is
1280 bytes while everything else is 1500. The client advertises an MSS for 1500, so a backend's
full-sized segments reach rt, which sends "fragmentation needed" / "packet too big" to the VIP:
rt routes that to lb1 or lb2 (ECMP), and only if lbxdp steers it to the flow's backend (the same
Maglev table on both balancers) does the backend learn the path MTU. Without steering the
balancer's kernel drops it and the download stalls (a PMTU black hole): the steering-off run
(lbx_ctl LBX_CTL_F_NO_ICMP_STEER on both balancers) proves the test can fail.

Route caches (the learnt PMTU) are flushed on the backends before each run, and every run uses
new client ports, so no run passes on what an earlier one learnt.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lbxdp import abi, bpfsys, paths
from lbxdp.lab import configs
from lbxdp.lab.rig import HOST_IF, RT, Rig, Shape

from . import transfer

PORT = 9000
SIZE = 1 << 20
DOWNLOADS = 20

class _Ctl(ctypes.Structure):   # struct lbx_ctl (bpf/abi.h): only flags is touched
    _fields_ = [("mac", ctypes.c_uint8 * 6), ("flags", ctypes.c_uint16), ("rest", ctypes.c_uint8 * 56)]


assert ctypes.sizeof(_Ctl) == abi.CTL_SIZE


def lbxdp(rig: Rig, lb: str, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(lb), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"lbxdp {' '.join(argv)} on {lb} failed: {proc.stderr}"
    return proc.stdout


def set_steering(rig: Rig, on: bool) -> None:
    for lb in rig.balancers:
        pin = paths.Instance(HOST_IF, rig.ns(lb)).pin_dir / abi.Map.CTL.value
        with bpfsys.Map.pinned(pin, ctypes.c_uint32, _Ctl) as m:
            ctl = m.lookup(0)
            ctl.flags = (ctl.flags & ~abi.CTL_F_NO_ICMP_STEER) | (0 if on else abi.CTL_F_NO_ICMP_STEER)
            m.update(0, ctl)


def flush_pmtu(rig: Rig) -> None:
    transfer.forget_pmtu(rig, *rig.backends)


def downloads(rig: Rig, family: int, n: int, deadline: float) -> list[dict]:
    return transfer.run(rig, transfer.Direction.DOWNLOAD, family, PORT, SIZE, n, deadline)


@pytest.fixture
def pmtu_rig(rig_factory):
    rig = rig_factory(shape=Shape.MULTI, balancers=2, backends=2)
    rig.run(RT, "ip", "link", "set", rig.layout.ifname(RT, "front"), "mtu", "1280")
    vips = [dataclasses.replace(v, port=PORT, backends=tuple(dataclasses.replace(b, port=PORT) for b in v.backends))
            for v in (rig.vip(f, "tcp", scheduler="maglev") for f in (4, 6))]
    with tempfile.NamedTemporaryFile("w", prefix="lbxdp-pmtu-", suffix=".toml", delete=False) as f:
        f.write(configs.dump(*vips))
    attached: list[str] = []
    try:
        with transfer.servers(rig, transfer.Direction.DOWNLOAD, SIZE, PORT):
            try:
                for lb in rig.balancers:
                    lbxdp(rig, lb, "attach", HOST_IF, "--config", f.name, "--mode", "generic")
                    attached.append(lb)
                yield rig
            finally:
                for lb in attached:
                    subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(lb), "detach", HOST_IF],
                                   capture_output=True, timeout=60)
    finally:
        Path(f.name).unlink()


def _steered(rig: Rig) -> int:
    total = 0
    for lb in rig.balancers:
        st = json.loads(lbxdp(rig, lb, "status", HOST_IF, "--json"))
        total += sum(v for k, v in _reasons(st).items() if k.endswith("icmp_steered"))
    return total


def _reasons(st: dict) -> dict[str, int]:
    out = {}
    for r in st.get("reasons", []) if isinstance(st.get("reasons"), list) else []:
        out[f"{r.get('verdict')}_{r.get('reason')}"] = r.get("packets", 0)
    if isinstance(st.get("reasons"), dict):
        for k, v in st["reasons"].items():
            out[k] = v.get("packets", v) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_downloads_complete_through_a_smaller_hop_and_stall_without_steering(pmtu_rig: Rig, family: int) -> None:
    rig = pmtu_rig
    # steering on: 20 downloads of 1 MB, each promptly
    flush_pmtu(rig)
    runs = downloads(rig, family, DOWNLOADS, deadline=10.0)
    assert all(r["bytes"] == SIZE for r in runs), f"incomplete downloads: {runs}"
    assert max(r["seconds"] for r in runs) < 5.0, runs
    # right after `lbxdp flows flush` on both balancers, with the PMTU forgotten
    for lb in rig.balancers:
        lbxdp(rig, lb, "flows", "flush", "-i", HOST_IF)
    flush_pmtu(rig)
    runs = downloads(rig, family, DOWNLOADS, deadline=10.0)
    assert all(r["bytes"] == SIZE for r in runs), f"incomplete downloads after a flush: {runs}"
    # steering off: the same transfer stalls (the balancer's kernel drops the errors)
    set_steering(rig, False)
    try:
        flush_pmtu(rig)
        t0 = time.monotonic()
        stalled = downloads(rig, family, 1, deadline=4.0)
        assert stalled[0]["bytes"] < SIZE, f"completed without steering: the test cannot fail ({stalled})"
        assert time.monotonic() - t0 < 30
    finally:
        set_steering(rig, True)
    flush_pmtu(rig)
    runs = downloads(rig, family, 2, deadline=10.0)
    assert all(r["bytes"] == SIZE for r in runs), f"steering back on: {runs}"
