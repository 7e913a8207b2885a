"""Issue 8: failures of the control plane never take the data path down, and lbxdp's directories
are its own.

Real daemon (`python -m lbxdp --netns <lb> run eth0`, tests/netns/daemon.py), real command, real
TCP through the VIP. What each test pins down:
- test_run_dir_deleted_while_running: the daemon puts back its run directory (schema, pid file,
  applied state), keeps forwarding, and a reload afterwards works.
- test_a_reload_that_raises_keeps_everything: a reload failing with an error that is not a
  config error (the instance's lock file replaced by a directory: IsADirectoryError) is one
  `reload-failed` line; the program, the pins and the running config stay; the next reload works.
- test_restart_after_kill_with_the_metrics_port_taken: after kill -9, a daemon that cannot bind
  its metrics port exits non-zero, says what it left (`left-attached`), and the program the
  killed daemon attached keeps forwarding with its pins.
- test_attach_says_which_maps_it_recreated: "maps kept" only when every map was kept.
- test_pin_or_run_root_not_private_is_refused: a root owned by another user or writable by
  others stops `attach` before anything is created or attached.
"""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.fixture
def daemons(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(config) -> an attached `lbxdp run` (tests/netns/daemon.py). Scope: function.
    Cleanup: every daemon stopped by PID, `lbxdp detach`, no pin or run state left."""
    yield from started_daemons(rig, tmp_path)


def lbxdp(rig: Rig, *argv: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert not check or proc.returncode == 0, f"lbxdp {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}"
    return proc


def xdp_prog_id(rig: Rig) -> int | None:
    """Id of the XDP program on lb's eth0, read with `ip -j link` (None: no program)."""
    (link,) = json.loads(rig.run(LB, "ip", "-j", "link", "show", "dev", HOST_IF).stdout)
    xdp = link.get("xdp")
    return xdp["prog"]["id"] if xdp else None


def assert_forwarding(rig: Rig, prog_id: int) -> None:
    """The same program is attached, its pins are there, and new TCP connections to the VIP work."""
    inst = Instance(HOST_IF, rig.ns(LB))
    assert xdp_prog_id(rig) == prog_id
    assert inst.prog_pin.exists() and (inst.pin_dir / "lbx_flows").exists()
    names = rig.tcp_names(rig.spec.vip4, count=9, timeout=20)
    assert names[FAILED] == 0 and sum(names.values()) == 9 and set(names) <= set(BACKENDS), names


def test_run_dir_deleted_while_running(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg)
    prog_id = int(d.events("attached")[0][1]["prog_id"])
    inst = Instance(HOST_IF, rig.ns(LB))
    shutil.rmtree(inst.run_dir)

    d.wait_event("run-dir-restored", timeout=10)
    assert d.alive()
    assert inst.schema_file.exists() and (inst.run_dir / "applied.toml").exists()
    assert_forwarding(rig, prog_id)
    assert lbxdp(rig, "status", HOST_IF, "--json").returncode == 0

    # A reload afterwards finds the daemon (its pid file is back) and applies.
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS, weights={"be1": 3}))
    lbxdp(rig, "reload")
    d.wait_event("reloaded", timeout=20)
    assert not d.events("reload-failed") and not d.events("left-attached")
    assert_forwarding(rig, prog_id)


def test_a_reload_that_raises_keeps_everything(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg)
    prog_id = int(d.events("attached")[0][1]["prog_id"])
    lock = Instance(HOST_IF, rig.ns(LB)).run_dir / "lock"
    lock.unlink()
    lock.mkdir()
    try:
        cfg.write_text(rig.vip_toml(4, "tcp", ["be1"]))
        lbxdp(rig, "reload")
        _, ev = d.wait_event("reload-failed", timeout=20)
        assert ev["type"] == "IsADirectoryError" and ev["kept"] == "the running config", ev
        time.sleep(1.5)   # a loop turn or two: the daemon must still be there
        assert d.alive() and not d.events("left-attached")
        assert_forwarding(rig, prog_id)
        # The running config stayed: all three backends still get connections.
        assert set(rig.tcp_names(rig.spec.vip4, count=30, timeout=20)) == set(BACKENDS)
    finally:
        lock.rmdir()
    lbxdp(rig, "reload")
    d.wait_event("reloaded", timeout=20)
    assert set(rig.tcp_names(rig.spec.vip4, count=9, timeout=20)) == {"be1"}


def test_restart_after_kill_with_the_metrics_port_taken(rig: Rig, daemons, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    d = daemons(cfg)
    prog_id = int(d.events("attached")[0][1]["prog_id"])
    d.kill()

    # Another process holds the port inside lb's namespace (where the daemon would listen).
    holder = subprocess.Popen([*rig.ns_cmd(LB), sys.executable, "-c",
                               "import socket, sys, time\n"
                               "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
                               "print(s.getsockname()[1], flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    again = None
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        again = Daemon(rig, cfg, tmp_path / "again.log", metrics=f"127.0.0.1:{port}")
        rc = again.popen.wait(120)
        again.stop()
        assert rc != 0, again.text()
        _, left = again.events("left-attached")[0]
        assert left["interface"].startswith(HOST_IF), left
        assert "Traceback" not in again.text() and "cannot serve metrics" in again.text(), again.text()
        assert_forwarding(rig, prog_id)
    finally:
        holder.kill()
        holder.wait(10)
        if again is not None:
            again.stop()
    # And the next start adopts it.
    d = daemons(cfg)
    assert d.events("attached")[0][1]["adopted"] == "True"


def test_attach_says_which_maps_it_recreated(rig: Rig, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    inst = Instance(HOST_IF, rig.ns(LB))
    attach = ["attach", HOST_IF, "--config", str(cfg), "--mode", "generic"]
    try:
        lbxdp(rig, *attach)
        assert "re-attached (maps kept)" in lbxdp(rig, *attach).stdout
        (inst.pin_dir / "lbx_rr").unlink()
        out = lbxdp(rig, *attach).stdout
        assert "maps kept" not in out and "recreated" in out and "lbx_rr" in out, out
        assert_forwarding(rig, xdp_prog_id(rig))
    finally:
        lbxdp(rig, "detach", HOST_IF, check=False)
    assert not inst.pin_dir.exists()


@pytest.mark.parametrize("which", ["pin-root-nobody", "run-root-777", "instance-dir-nobody"])
def test_pin_or_run_root_not_private_is_refused(rig: Rig, tmp_path: Path, which: str) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(rig.vip_toml(4, "tcp", BACKENDS))
    pins = Path("/sys/fs/bpf") / f"lbxdp-test-{rig.spec.prefix}"
    run = tmp_path / "run"
    env = dict(os.environ, LBXDP_PIN_ROOT=str(pins), LBXDP_RUN_ROOT=str(run))
    pins.mkdir(mode=0o700)
    run.mkdir(mode=0o700)
    try:
        if which == "pin-root-nobody":
            os.chown(pins, 65534, 65534)
            bad = pins
        elif which == "run-root-777":
            run.chmod(0o777)
            bad = run
        else:
            bad = run / "netns" / rig.ns(LB)
            bad.mkdir(parents=True, mode=0o700)
            os.chown(bad, 65534, 65534)
        proc = lbxdp(rig, "attach", HOST_IF, "--config", str(cfg), "--mode", "generic", check=False, env=env)
        assert proc.returncode == 2, proc
        assert proc.stderr.startswith(f"lbxdp: error: {bad} is ") and f"chown root: {bad}; chmod 700 {bad}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert xdp_prog_id(rig) is None
        assert not list(pins.rglob("*")) and not list((run).rglob("prog"))
        assert lbxdp(rig, "status", HOST_IF, check=False, env=env).returncode == 2
    finally:
        lbxdp(rig, "detach", HOST_IF, check=False, env=env)
        shutil.rmtree(pins, ignore_errors=True)
        if pins.exists():
            pins.rmdir()


def test_a_first_attach_that_fails_to_compile_leaves_no_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bcc pins each map as it creates it; a first attach whose program then fails to load (here:
    a connection table of 0 entries, which the kernel refuses) must remove the maps it pinned."""
    from lbxdp import control, loader, model
    from lbxdp.errors import LbxError
    from lbxdp.lab.namespaces import in_netns

    ns = f"lbxft{os.getpid()}"
    pins = Path("/sys/fs/bpf") / f"lbxdp-test-{ns}"
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(pins))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        inst = Instance("v0")
        with in_netns(ns), pytest.raises(LbxError, match="failed to compile or load"):
            control.attach(inst, model.Config(), build=loader.BuildConfig(inst.pin_dir, flow_capacity=0),
                           allow_empty=True)
        assert not list(pins.rglob("*")), "a failed first attach left pins"
        assert not inst.run_dir.exists()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(pins, ignore_errors=True)
