"""Issue 8: `lbxdp run` follows the interface's MAC, so the program keeps forwarding exactly the
frames addressed to the balancer after the MAC changes.

Real daemon (`python -m lbxdp --netns <lb> run eth0`, tests/netns/daemon.py), real TCP through the
VIP. lb's eth0 gets a new MAC (`ip link set dev eth0 address`, the veth takes it while up) and the
client is pointed at it with a permanent neighbour entry; the daemon's tick rewrites lbx_ctl
(control.sync_own_mac) and logs `own-mac-changed old=... new=...`. Then frames to the new MAC
are forwarded, and frames still sent to the old MAC (the client pointed back at it; the bridge has
learnt the old MAC on lb's port) are passed under PASS_NOT_FOR_US, read from `status --json`.
Without the tick's sync no `own-mac-changed` comes, and the new MAC's frames are not forwarded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lbxdp.lab.rig import CLI, FAILED, HOST_IF, LB, Rig

from .daemon import REPO, Daemon, started_daemons

BACKENDS = ["be1", "be2", "be3"]
NEW_MAC = "02:6c:62:00:01:03"   # locally administered, unlike any MAC the rig assigns


@pytest.fixture
def daemons(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(config) -> an attached `lbxdp run` (tests/netns/daemon.py). Scope: function.
    Cleanup: every daemon stopped by PID, `lbxdp detach`, no pin or run state left."""
    yield from started_daemons(rig, tmp_path)


@pytest.fixture
def lb_mac(rig: Rig) -> Iterator[str]:
    """lb's eth0 MAC before the test (what the rig assigned). Scope: function. Cleanup: lb's eth0
    gets it back and the client's neighbour entry for lb is removed (ARP finds it again)."""
    old = rig.mac(LB)
    try:
        yield old
    finally:
        rig.run(LB, "ip", "link", "set", "dev", HOST_IF, "address", old)
        rig.run(CLI, "ip", "neigh", "del", str(rig.addr4(LB)), "dev", HOST_IF, check=False)


def client_sends_to(rig: Rig, mac: str) -> None:
    """The client's frames to lb (the VIP's gateway) go to `mac` from now on."""
    rig.run(CLI, "ip", "neigh", "replace", str(rig.addr4(LB)), "lladdr", mac, "dev", HOST_IF,
            "nud", "permanent")


def reasons(rig: Rig) -> dict[tuple[str, str], int]:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), "status", HOST_IF, "--json"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return {(r["verdict"], r["reason"]): r["packets"] for r in json.loads(proc.stdout)["reasons"]}


def assert_forwards(rig: Rig) -> None:
    names = rig.tcp_names(rig.spec.vip4, count=6, timeout=20)
    assert names[FAILED] == 0 and sum(names.values()) == 6 and set(names) <= set(BACKENDS), names


def test_daemon_follows_a_mac_change(rig: Rig, daemons, lb_mac: str) -> None:
    d = daemons(rig.vip_toml(4, "tcp", BACKENDS))
    client_sends_to(rig, lb_mac)
    assert_forwards(rig)
    assert not d.events("own-mac-changed")

    rig.run(LB, "ip", "link", "set", "dev", HOST_IF, "address", NEW_MAC)
    client_sends_to(rig, NEW_MAC)
    _, ev = d.wait_event("own-mac-changed", timeout=10)   # one tick is 1 s
    assert (ev["old"], ev["new"]) == (lb_mac, NEW_MAC), ev
    assert_forwards(rig)

    before = reasons(rig)
    client_sends_to(rig, lb_mac)
    names = rig.tcp_names(rig.spec.vip4, count=3, timeout=10)
    assert not any(n for n in names if n != FAILED), names     # passed to lb's stack, which drops them
    after = reasons(rig)
    key = ("pass", "not_for_us")
    assert after[key] - before[key] >= 3, (before, after)
    assert after[("tx", "forward")] == before[("tx", "forward")], (before, after)
    assert len(d.events("own-mac-changed")) == 1 and d.alive()
