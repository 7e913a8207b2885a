"""Issue 8: config input that used to clear or wedge a running balancer.

Real `lbxdp attach` / `lbxdp run` in the rig's balancer namespace, real TCP through the VIP:
- an applied state that cannot be read back (damaged applied.toml) stops `status` with one line
  that says how to fix it, and `attach --config` of a good file replaces it, keeping the
  program's maps and connection table;
- an empty (truncated) config reloaded, attached, or given to a new daemon is refused while the
  instance has VIPs, unless --allow-empty;
- a reload of a FIFO neither freezes the daemon nor makes it deaf to SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lbxdp.paths import Instance
from lbxdp.lab.rig import FAILED, HOST_IF, LB, Rig

from .daemon import REPO, Daemon, started_daemons

BACKENDS = ["be1", "be2", "be3"]


def lbxdp(rig: Rig, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv], capture_output=True,
                          text=True, timeout=180, cwd=REPO)


def assert_forwarding(rig: Rig, backends: list[str] = BACKENDS) -> None:
    names = rig.tcp_names(rig.spec.vip4, count=9, timeout=20)
    assert names[FAILED] == 0 and sum(names.values()) == 9 and set(names) <= set(backends), names


def vip_names(rig: Rig) -> list[str]:
    import json
    proc = lbxdp(rig, "vip", "ls", "-i", HOST_IF, "--json")
    assert proc.returncode == 0, proc.stderr
    return sorted(r["vip"] for r in json.loads(proc.stdout))


@pytest.fixture
def detached(rig: Rig) -> Iterator[None]:
    """Scope: function. Whatever the test attached to lb's eth0 is detached afterwards, and no
    pin or run state may be left."""
    try:
        yield
    finally:
        lbxdp(rig, "detach", HOST_IF)
        inst = Instance(HOST_IF, rig.ns(LB))
        assert not inst.pin_dir.exists() and not inst.run_dir.exists(), "pins or run state left behind"


@pytest.fixture
def daemons(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(config, args=...) -> an attached `lbxdp run` (tests/netns/daemon.py). Scope:
    function. Cleanup: every daemon stopped by PID, `lbxdp detach`, no pin or run state left."""
    yield from started_daemons(rig, tmp_path)


def test_unreadable_applied_state_never_blocks_attach(rig: Rig, tmp_path: Path, detached) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    proc = lbxdp(rig, "attach", HOST_IF, "--config", str(cfg), "--mode", "generic")
    assert proc.returncode == 0, proc.stderr
    assert_forwarding(rig)
    flows_before = int(lbxdp(rig, "flows", "count", "-i", HOST_IF, "--json").stdout.split('"entries": ')[1].split(",")[0])
    assert flows_before > 0

    applied_toml = Instance(HOST_IF, rig.ns(LB)).run_dir / "applied.toml"
    applied_toml.write_bytes(b'[[vip]]\naddress = "10.0.0.1"\nsend = "\x01\n')   # what the old dump could write

    for argv in (["status", HOST_IF], ["vip", "del", "-i", HOST_IF, f"{rig.spec.vip4}:{rig.spec.port}/tcp"]):
        bad = lbxdp(rig, *argv)
        assert bad.returncode != 0
        error, hint = bad.stderr.splitlines()
        assert error.startswith("lbxdp: error: lbxdp's record of what eth0") and "unreadable" in error, bad.stderr
        assert "applied.toml" not in error and "Traceback" not in bad.stderr
        assert hint == (f"  hint: re-attach with a config to replace it: lbxdp --netns {rig.ns(LB)} attach {HOST_IF} "
                        "--config FILE (the maps and the connection table are kept)")
    assert_forwarding(rig)   # the data path never noticed

    cfg.write_text(rig.vip_toml(4, "tcp", ["be1", "be2"]))
    again = lbxdp(rig, "attach", HOST_IF, "--config", str(cfg), "--mode", "generic")
    assert again.returncode == 0, again.stderr
    assert "unreadable" in again.stderr and "kept: the maps and the connection table" in again.stderr
    assert "re-attached (maps kept)" in again.stdout, again.stdout
    status = lbxdp(rig, "status", HOST_IF)
    assert status.returncode == 0, status.stderr
    assert_forwarding(rig, ["be1", "be2"])
    flows_after = int(lbxdp(rig, "flows", "count", "-i", HOST_IF, "--json").stdout.split('"entries": ')[1].split(",")[0])
    assert flows_after >= flows_before   # the connection table was kept (be3's entries age out by LRU only)


def test_attach_of_an_empty_config_is_refused_unless_allowed(rig: Rig, tmp_path: Path, detached) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS) + rig.vip_toml(4, "udp", BACKENDS))
    assert lbxdp(rig, "attach", HOST_IF, "--config", str(cfg), "--mode", "generic").returncode == 0
    empty = tmp_path / "empty.toml"
    empty.write_text("# truncated\n")
    t = time.monotonic()
    bad = lbxdp(rig, "attach", HOST_IF, "--config", str(empty), "--mode", "generic")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.splitlines()[0] == (f"lbxdp: error: {empty} has no [[vip]]; it would remove all 2 VIPs of "
                                          f"{HOST_IF} (netns {rig.ns(LB)}); pass --allow-empty to do that")
    assert time.monotonic() - t < 30   # refused before compiling
    assert len(vip_names(rig)) == 2
    assert_forwarding(rig)
    ok = lbxdp(rig, "attach", HOST_IF, "--config", str(empty), "--mode", "generic", "--allow-empty")
    assert ok.returncode == 0, ok.stderr
    assert vip_names(rig) == []


def test_truncated_config_reloaded_keeps_every_vip(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg)
    assert_forwarding(rig)
    cfg.write_text("")
    assert lbxdp(rig, "reload", "-i", HOST_IF).returncode == 0
    _, ev = d.wait_event("reload-failed", timeout=20)
    assert ev["error"] == (f"{cfg} has no [[vip]]; it would remove all 1 VIPs of {HOST_IF} (netns {rig.ns(LB)}); "
                           "pass --allow-empty to do that"), ev
    assert len(vip_names(rig)) == 1
    assert_forwarding(rig)
    assert d.alive()


def test_truncated_config_reloaded_with_allow_empty_removes_the_vips(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg, args=("--allow-empty",))
    assert_forwarding(rig)
    cfg.write_text("")
    assert lbxdp(rig, "reload", "-i", HOST_IF).returncode == 0
    d.wait_event("reloaded", timeout=20)
    assert vip_names(rig) == []
    assert not d.events("reload-failed")


def test_daemon_start_with_an_empty_config_over_vips_is_refused(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg)
    d.kill()                                     # leaves the program attached, with its VIP
    cfg.write_text("")
    again = Daemon(rig, cfg, tmp_path / "again.log")
    try:
        rc = again.popen.wait(120)
    finally:
        again.stop()
    assert rc == 2, again.text()
    assert "has no [[vip]]; it would remove all 1 VIPs" in again.text()
    assert len(vip_names(rig)) == 1
    assert_forwarding(rig)


def test_reload_of_a_fifo_neither_freezes_the_daemon_nor_ignores_sigterm(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg)
    cfg.unlink()
    os.mkfifo(cfg)                               # nobody ever writes: a blocking open would hang
    assert lbxdp(rig, "reload", "-i", HOST_IF).returncode == 0
    _, ev = d.wait_event("reload-failed", timeout=20)
    assert "not a regular file" in ev["error"], ev
    assert_forwarding(rig)
    t = time.monotonic()
    rc = d.stop()
    assert time.monotonic() - t < 5 and rc == 0, d.text()
    assert any(line for _, line in d.lines if " stopped " in line + " "), d.text()
