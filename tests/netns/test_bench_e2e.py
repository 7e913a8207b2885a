"""scripts/bench_e2e.py --short (issue 15): the end-to-end benchmark runs in the suite so it
cannot rot. One round, 1 s per cell, three rigs of its own (l2, nat and routed, the last with
`lbxdp decap` on its backends for lbxdp-ipip and lbxdp-gue), torn down by the script.

Asserts: it completes; every configuration produced a non-zero rate on every metric it has
(UDP for all but HAProxy), each cell's CPU per operation is positive and below a sane bound and
its busy share within the machine's CPUs; the routed configurations really went through the
tunnel (the backends' decap programs opened at least as many packets as UDP replies came back);
and no namespace of any rig is left afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pyroute2 import netns

from lbxdp.lab import processes

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_e2e.py"
CONFIGS = {"direct", "lbxdp-dsr", "lbxdp-nat", "nftables", "haproxy", "lbxdp-ipip", "lbxdp-gue"}


def test_bench_e2e_short() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--short", "--json"], capture_output=True, text=True,
                          timeout=240, env=processes.python_env())
    assert proc.returncode == 0, f"bench_e2e --short failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout)
    meta, summary, cells = out["meta"], out["summary"], out["cells"]
    assert set(summary) == CONFIGS
    for name, per in summary.items():
        want = {"keepalive", "newconn"} | (set() if name == "haproxy" else {"udp"})
        assert set(per) == want, f"{name}: metrics {sorted(per)}"
        for metric, s in per.items():
            assert s["rate_median"] > 0, f"{name} {metric}: no operations"
            for c in cells[name][metric]:
                assert c["cpu_us_per_op"] is not None and 0 < c["cpu_us_per_op"] < 10_000, (name, metric, c)
                assert 0 < c["cpu"]["busy"] <= 100 * os.cpu_count() + 10, (name, metric, c["cpu"])
            if metric != "udp":
                assert all(c["non_2xx"] == 0 for c in cells[name][metric]), (name, metric)
            if metric == "keepalive":
                assert all(c["socket_errors"] == 0 for c in cells[name][metric]), (name, metric)
    # the ratios are computed against nftables, which is its own 1.0
    assert summary["nftables"]["keepalive"]["rate_vs_nft"] == 1.0
    # ipip/gue: every UDP request answered was decapsulated by a backend (plus the TCP packets)
    for name in ("lbxdp-ipip", "lbxdp-gue"):
        udp_ops = sum(c["ops"] for c in cells[name]["udp"])
        assert meta["decapped"][name] >= udp_ops > 0, (name, meta["decapped"], udp_ops)
    assert meta["note"] and "rt" in meta["note"]
    assert len(meta["prefixes"]) == 3
    left = [n for n in netns.listnetns() if any(n.startswith(p + "-") for p in meta["prefixes"])]
    assert not left, f"bench_e2e left namespaces behind: {left}"
