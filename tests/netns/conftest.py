"""Fixtures for tests/netns: real sockets across namespaces built by lbxdp.lab.rig.

The topology (client, balancer, backends on one bridge; DSR) is drawn in lbxdp/lab/rig.py's
docstring, the other shapes in lbxdp/lab/shapes.py's. Test bodies use the Rig API (rig.run, rig.tcp_names, rig.ping, ...) and never call
netlink verbs themselves. Every fixture removes what it built, even when the test fails, and
checks that nothing of it is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lbxdp.lab.rig import HOST_IF, LB, Rig, RigSpec, Server


def _assert_gone(rig: Rig, servers: list[Server]) -> None:
    left = rig.leftovers() + [f"server pid {s.pid}" for s in servers if s.alive()]
    assert not left, f"rig {rig.spec.prefix} left behind: {', '.join(left)}"


def _teardown(rig: Rig) -> None:
    servers = list(rig.servers.values())
    rig.down()
    _assert_gone(rig, servers)


@pytest.fixture(scope="session", autouse=True)
def require_root() -> None:
    """Scope: session, autouse (so it runs before any rig is built).

    tests/netns create network namespaces and must run as root, as they do in CI. Not being root
    errors every netns test with one clear message instead of skipping them silently.
    """
    if os.geteuid() != 0:
        pytest.fail("tests/netns build network namespaces and need root: run them as root "
                    "(e.g. sudo .venv/bin/python -m pytest tests/netns)", pytrace=False)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """An up rig: namespaces <prefix>-{sw,cli,lb,be1,be2,be3}, echo servers running, no XDP.

    Scope: module (tests in one module share it; a module that attaches the balancer must detach
    it before it ends). Depends on: root. Prefix: unique per run ("lbx" + 5 hex digits).
    Cleanup: Rig.down() (servers by PID, then namespaces), then asserts nothing is left.
    If building fails, Rig.up() has already removed what it built.
    """
    r = Rig(RigSpec()).up()
    try:
        yield r
    finally:
        _teardown(r)


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    """make(**RigSpec fields) -> an up Rig with its own unique prefix, for tests that need
    another shape (e.g. backends=2) or must not share state.

    Scope: function. Depends on: root. Cleanup: every rig it built is taken down and checked,
    in reverse order, even if the test failed.
    """
    built: list[Rig] = []

    def make(**spec) -> Rig:
        r = Rig(RigSpec(**spec))
        built.append(r)
        return r.up()

    try:
        yield make
    finally:
        errors = []
        for r in reversed(built):
            try:
                _teardown(r)
            except Exception as e:  # noqa: BLE001 - tear down the others, then report
                errors.append(str(e))
        assert not errors, "; ".join(errors)


@pytest.fixture
def native_peer(rig: Rig) -> Iterator[Rig]:
    """The module's rig with the XDP_PASS stub on lb's peer port in sw, as native mode needs
    (a veth drops XDP_TX frames unless its peer runs an XDP program; see bpf/stub.c).

    Scope: function. Depends on: rig, bcc. Cleanup: detaches the stub.
    """
    rig.attach_peer_stub()
    try:
        yield rig
    finally:
        rig.detach_peer_stub()


@pytest.fixture(scope="module")
def attached(rig: Rig) -> Iterator[Rig]:
    """The module's rig with lbxdp attached to lb's eth0 in generic mode, through the real command
    (`python -m lbxdp --netns <lb> attach eth0 --config <rig config, rr>`).

    Scope: module. Depends on: rig, root, bcc. Cleanup: `lbxdp detach` (program and pins
    removed) and the temporary config file deleted, even if the module's tests failed.
    (test_metrics.py has its own copy of this fixture.)
    """
    cmd = [sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB)]
    with tempfile.NamedTemporaryFile("w", prefix="lbxdp-", suffix=".toml", delete=False) as f:
        f.write(rig.lb_config_toml(scheduler="rr", with_mac=False))
    try:
        proc = subprocess.run([*cmd, "attach", HOST_IF, "--config", f.name, "--mode", "generic"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        yield rig
    finally:
        subprocess.run([*cmd, "detach", HOST_IF], capture_output=True, timeout=60)
        Path(f.name).unlink()
