"""Fixtures of the datapath tests: the real program, filled by the real control plane.

BPF_PROG_TEST_RUN keeps map state between runs (the connection table keeps its flows, the
round-robin positions move on), so the function-scoped `lb` fixture puts the shared program back
in a known state before every test: the base config, an empty connection table, round-robin
positions at zero.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import loader

from .frames import BASE, LB_MAC
from .harness import Lb


@contextlib.contextmanager
def compiled(source: loader.Source = loader.BALANCER, defines: tuple[str, ...] = ()) -> Iterator[loader.Program]:
    """source compiled (with the -D switches `defines`) and loaded with its maps pinned under
    /sys/fs/bpf/lbxdp-test-<uuid>; the program closed and the pin dir removed on exit, always,
    even when compiling fails. Skips the test unless root."""
    if os.geteuid() != 0:
        pytest.skip("the datapath tests load an XDP program: run them as root")
    pin_dir = Path(f"/sys/fs/bpf/lbxdp-test-{uuid.uuid4().hex[:12]}")
    prog = None
    try:
        prog = loader.compile_program(loader.BuildConfig(pin_dir=pin_dir, defines=defines), source)
        yield prog
    finally:
        if prog is not None:
            prog.close()
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def compiled_lb() -> Iterator[Lb]:
    """The lbxdp program compiled and loaded once per test session, filled with frames.BASE.

    Builds: loader.compile_program with a pin dir unique to this run
    (/sys/fs/bpf/lbxdp-test-<uuid>), then Balancer.apply(frames.BASE) with every backend MAC
    given in the config (no neighbour resolution). Scope: session (compiling takes a second or
    two). Depends on: root, bpffs, bcc. Cleanup: prog.close() and the pin dir removed, always,
    even when compiling or applying fails.
    """
    with compiled() as prog:
        lb = Lb(prog)
        lb.apply(BASE)
        yield lb


@pytest.fixture
def lb(compiled_lb: Lb) -> Lb:
    """The session's program, reset for one test: BASE applied, its own MAC frames.LB_MAC, no flows,
    rr positions at zero.

    Scope: function. Depends on: compiled_lb. Cleanup: none needed; the next test resets again
    (so a test that applies another config, or fails half-way, cannot leak into the next one).
    """
    compiled_lb.apply(BASE)
    compiled_lb.maps.set_own_mac(LB_MAC)
    compiled_lb.clear_flows()
    for meta in compiled_lb.maps.vips().values():
        compiled_lb.maps.reset_vip_counters(meta.id)
    return compiled_lb
