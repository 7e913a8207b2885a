"""Pins of a version whose half-open table was an LRU hash (before the bucket array of
bpf/maps.h): migrate.upgrade() recreates that table empty (its keys are no array indexes), keeps
the connection table, and the new program's gate works over the adopted pins: a round-robin SYN
goes half-open and its ACK follows it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from scapy.layers.l2 import Ether

from lbxdp import abi, bpfsys, loader, migrate
from lbxdp.balancer import Balancer
from lbxdp.maps import Maps
from lbxdp.paths import Instance

from .frames import BASE, LB_MAC, RR4, XDP_TX, tcp
from .harness import one_cpu

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
LRU_RELEASE = "bc4b286"   # half-open entries with their SYN's time, in an LRU hash
BPF_MAP_TYPE_LRU_HASH = 9


@pytest.fixture
def old_bpf(tmp_path: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", LRU_RELEASE, "bpf"], capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {LRU_RELEASE} is not in this checkout: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    return tmp_path / "bpf"


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Instance]:
    pin_root = Path(f"/sys/fs/bpf/lbxdp-test-houp-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(pin_root))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    try:
        yield Instance("houp0")
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)


def _dst(run: bpfsys.TestRun) -> bytes:
    assert run.retval == XDP_TX
    return bytes(Ether(run.data))[:6]


def test_an_lru_half_open_pin_is_recreated_as_the_bucket_array(old_bpf: Path, inst: Instance) -> None:
    build = loader.BuildConfig(pin_dir=inst.pin_dir)
    old = loader.compile_program(loader.BuildConfig(pin_dir=inst.pin_dir, src_dir=old_bpf))
    new = None
    try:
        inst.run_dir.mkdir(parents=True)
        loader.save_schema(inst, old.schema, old.source, old.layouts)
        old_maps = Maps(old.maps)
        old_maps.set_own_mac(LB_MAC)
        Balancer(old_maps).apply(BASE, macs={})
        runner = bpfsys.TestRunner(old.fd)
        addr = str(RR4.address)
        with one_cpu():
            opened = _dst(runner.run(bytes(tcp(addr, 80, 46000))))
            assert _dst(runner.run(bytes(tcp(addr, 80, 46000, flags="A")))) == opened
            runner.run(bytes(tcp(addr, 80, 46001)))      # a handshake in flight
        assert old.maps[abi.Map.HALF_OPEN].info.type == BPF_MAP_TYPE_LRU_HASH
        assert old.maps[abi.Map.HALF_OPEN].count() == 2 and old_maps.flow_count() == 1

        adopted = migrate.upgrade(inst, build)
        new = loader.compile_program(build)
        old.close()
        old = None

        assert adopted[abi.Map.HALF_OPEN] == migrate.RECREATED, adopted
        assert adopted[abi.Map.FLOWS] == migrate.KEPT, adopted
        maps = Maps(new.maps)
        ho = maps.m[abi.Map.HALF_OPEN].info
        assert (ho.type, ho.max_entries * abi.HALF_OPEN_WAYS) == (bpfsys.BPF_MAP_TYPE_ARRAY, abi.HALF_OPEN_CAPACITY)
        assert maps.half_open_entries() == 0 and maps.flow_count() == 1
        maps.set_own_mac(LB_MAC)
        Balancer(maps).apply(BASE, macs={})
        runner = bpfsys.TestRunner(new.fd)
        with one_cpu():
            assert _dst(runner.run(bytes(tcp(addr, 80, 46000, flags="A")))) == opened, "the recorded flow moved"
            syn = _dst(runner.run(bytes(tcp(addr, 80, 46002))))
            assert maps.half_open_entries() == 1
            assert _dst(runner.run(bytes(tcp(addr, 80, 46002, flags="A")))) == syn
        assert maps.flow_count() == 2
    finally:
        if old is not None:
            old.close()
        if new is not None:
            new.close()
