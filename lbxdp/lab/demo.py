"""`lbxdp demo`: the whole product on a namespace rig, in about half a minute.

Builds the rig (client, balancer, N backends on one L2 segment, see lbxdp.lab.rig), attaches
lbxdp to the balancer with the real CLI (the config built by lbxdp.lab.configs), sends real TCP
connections and UDP datagrams to a v4 and a v6 VIP from the client, prints which backend served
what and the balancer's own counters, then removes everything: on success, on failure, on Ctrl-C
and on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any, Callable

from ..errors import LbxError
from .rig import Rig
from .shapes import HOST_IF, LB, RigSpec
from .traffic import FAILED


def lbxdp(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real `lbxdp` command, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "lbxdp", *argv], capture_output=True, text=True, timeout=120)


def _checked(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise LbxError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(backends: int = 3, connections: int = 30, mode: str = "native", scheduler: str = "rr",
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns what it measured (per VIP, backend -> answers) and the status."""
    old = signal.signal(signal.SIGTERM, _sigterm)
    rig = Rig(RigSpec(backends=backends))
    lb_ns = rig.ns(LB)
    attached = False
    try:
        echo(f"building the rig {rig.spec.prefix}: client, balancer, {backends} backends on one segment ...")
        rig.up()
        if mode == "native":
            # Native XDP_TX on a veth is delivered only if the peer runs an XDP program too.
            rig.attach_peer_stub()
        with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="lbxdp-demo-", delete=False) as f:
            f.write(rig.lb_config_toml(scheduler=scheduler, with_mac=False))
            cfg_path = f.name
        echo(f"$ lbxdp --netns {lb_ns} attach {HOST_IF} --config {cfg_path} --mode {mode}")
        out = _checked(lbxdp("--netns", lb_ns, "attach", HOST_IF, "--config", cfg_path, "--mode", mode), "attach")
        attached = True
        echo("  " + out.strip().replace("\n", "\n  "))
        results: dict[str, Counter[str]] = {}
        for vip in (rig.spec.vip4, rig.spec.vip6):
            for proto in ("tcp", "udp"):
                fn = rig.tcp_names if proto == "tcp" else rig.udp_names
                label = f"{'[' + str(vip) + ']' if vip.version == 6 else vip}:{rig.spec.port}/{proto}"
                results[label] = fn(vip, count=connections, timeout=60)
        _print_results(results, rig.backends, connections, echo)
        echo(f"\n$ lbxdp --netns {lb_ns} status {HOST_IF}")
        status_text = _checked(lbxdp("--netns", lb_ns, "status", HOST_IF), "status")
        echo(status_text.rstrip())
        status = json.loads(_checked(lbxdp("--netns", lb_ns, "status", HOST_IF, "--json"), "status --json"))
        failed = sum(c[FAILED] for c in results.values())
        if failed:
            raise LbxError(f"{failed} of {connections * len(results)} requests got no answer")
        return {"results": {k: dict(v) for k, v in results.items()}, "status": status}
    except KeyboardInterrupt:
        echo("interrupted: cleaning up")
        raise
    finally:
        if attached:
            lbxdp("--netns", lb_ns, "detach", HOST_IF)
        rig.down()
        if "cfg_path" in locals():
            os.unlink(cfg_path)
        signal.signal(signal.SIGTERM, old)
        echo(f"removed the rig {rig.spec.prefix} (namespaces, servers, pins)")


def _print_results(results: dict[str, Counter[str]], backends: list[str], sent: int,
                   echo: Callable[[str], None]) -> None:
    echo(f"\nanswers per backend ({sent} TCP connections / UDP datagrams per VIP, each a new flow):")
    head = "  {:<24}" + " {:>6}" * (len(backends) + 1)
    echo(head.format("VIP", *backends, "failed"))
    for label, names in results.items():
        echo(head.format(label, *(names.get(b, 0) for b in backends), names.get(FAILED, 0)))
