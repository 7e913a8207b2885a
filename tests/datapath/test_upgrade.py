"""Upgrades keep the pins: an instance made by an older release is adopted by this one with its
flows, VIPs, backends, tables and reason counters (lbxdp.migrate).

Each old release's bpf/ is extracted from git (`git archive <commit> bpf`) and compiled through
the loader with a bpf-dir override into a pin directory of its own, filled by the control plane
and given flows by BPF_PROG_TEST_RUN, with the schema file that release wrote (map descriptions
only: neither release saved reason names). Then, while the old program is still loaded (as it
would still be attached), migrate.upgrade() converts the pins and the new program is compiled
against them. Without the migration the new program does not even load: the verifier refuses
its read of backend.mode past the pinned 32-byte value.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import abi, bpfsys, loader, migrate
from lbxdp.balancer import Balancer
from lbxdp.maps import Maps
from lbxdp.paths import Instance

from .frames import BASE, HASH4, LB_MAC, OTHER4, WEB4, XDP_PASS, XDP_TX, tcp
from .harness import one_cpu

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]

# The releases whose pins this version must adopt: the first one, and the one before issue 9.
OLD_RELEASES = {
    "ea8d660": "first release: 14 reasons, 32-byte backend, no lbx_ctl",
    "9207d09": "hardening release: 21 reasons, 32-byte backend",
}


@pytest.fixture
def old_bpf(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The bpf/ directory of an old release, extracted from git into tmp_path (removed with it)."""
    commit = request.param
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "bpf"], capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {commit} is not in this checkout: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    return tmp_path / "bpf"


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Instance]:
    """An instance whose pins live in a bpffs directory of this run and whose run directory is
    under tmp_path. Cleanup: the pin root removed, always."""
    pin_root = Path(f"/sys/fs/bpf/lbxdp-test-upg-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(pin_root))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    try:
        yield Instance("upg0")
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)


def _flows(n: int) -> list[bytes]:
    """SYNs of n flows to the round-robin VIP (a new flow there would likely take another backend)
    and n to the hash VIP."""
    return [bytes(tcp(str(WEB4.address), 80, 42000 + i)) for i in range(n)] + \
        [bytes(tcp(str(HASH4.address), 80, 43000 + i)) for i in range(n)]


def _ack(syn: bytes) -> bytes:
    """The same flow's next segment: an ACK instead of the SYN (TCP flags byte, checksum unchecked)."""
    f = bytearray(syn)
    f[14 + 20 + 13] = 0x10
    return bytes(f)


@pytest.mark.parametrize("old_bpf", list(OLD_RELEASES), indirect=True, ids=list(OLD_RELEASES))
def test_upgrade_keeps_flows_vips_tables_and_counters(old_bpf: Path, inst: Instance) -> None:
    build = loader.BuildConfig(pin_dir=inst.pin_dir)
    old = loader.compile_program(loader.BuildConfig(pin_dir=inst.pin_dir, src_dir=old_bpf))
    new = None
    try:
        # What the old release's attach left: its maps filled, its schema (descriptions only).
        inst.run_dir.mkdir(parents=True)
        inst.schema_file.write_text(json.dumps(old.schema))
        old_maps = Maps(old.maps)
        old_maps.set_own_mac(LB_MAC)   # no-op for the first release (no lbx_ctl)
        Balancer(old_maps).apply(BASE, macs={})
        runner = bpfsys.TestRunner(old.fd)
        flows = _flows(12)
        with one_cpu():
            first = [runner.run(f) for f in flows]
            assert {r.retval for r in first} == {XDP_TX}
            assert runner.run(bytes(tcp(OTHER4, 80, 44000))).retval == XDP_PASS
        dst_macs = [r.data[:6] for r in first]
        assert len(set(dst_macs[:12])) > 1, "the round-robin flows should use several backends"
        vips, backends = old_maps.vips(), old_maps.backends()
        tables = {m.id: old_maps.table(m.id) for m in vips.values()}
        stats = {m.id: old_maps.vip_stats(m.id) for m in vips.values()}
        old_names = migrate.LEGACY_REASONS[old.maps[abi.Map.REASONS].info.max_entries]
        reasons = {old_names[r]: v for r, v in old_maps.reasons().items() if r < len(old_names) and v[0]}
        assert reasons.get("TX_FORWARD", (0, 0))[0] == len(flows) and reasons.get("PASS_NOT_VIP")
        n_flows = old_maps.flow_count()

        # The upgrade, with the old program still loaded (it would still be attached).
        adopted = migrate.upgrade(inst, build)
        new = loader.compile_program(build)
        loader.save_schema(inst, new.schema)
        old.close()
        old = None

        assert adopted[abi.Map.BACKENDS].startswith("migrated ("), adopted
        assert adopted[abi.Map.REASONS].startswith("migrated ("), adopted
        assert adopted[abi.Map.FLOWS] == migrate.KEPT, adopted
        # issue 11 added vip_meta.changed_at: the VIPs are converted (changed_at 0: settled)
        # the tables of these releases held a u32 per slot: rewritten packed (bpf/abi.h), slot for slot
        assert adopted[abi.Map.VIPS].startswith("migrated (") and \
            adopted[abi.Map.TABLES] == f"migrated ({sum(1 for t in tables.values() if t)} entries)", adopted
        for name, how in adopted.items():
            assert how != migrate.RECREATED, f"{name} was recreated: its entries are lost"
        maps = Maps(new.maps)
        assert maps.be_map.info.value_size == abi.BACKEND_SIZE
        assert maps.m[abi.Map.REASONS].info.max_entries == abi.Reason.MAX
        # VIPs, backends (now with their mode), tables, counters: as they were.
        assert maps.vips() == vips
        assert {k: (e.vip_id, e.address, e.port, e.mac, e.in_table) for k, e in maps.backends().items()} == \
            {k: (e.vip_id, e.address, e.port, e.mac, e.in_table) for k, e in backends.items()}
        assert {e.mode for e in maps.backends().values()} == {abi.FwdMode.DSR}
        assert {i: maps.table(i) for i in tables} == tables
        assert {r.name: v for r, v in maps.reasons().items() if v[0]} == reasons
        assert maps.flow_count() == n_flows

        # What attach does next: its own MAC, the same config again (nothing to change).
        maps.set_own_mac(LB_MAC)
        assert Balancer(maps).apply(BASE, macs={}).empty
        runner = bpfsys.TestRunner(new.fd)
        with one_cpu():
            after = [runner.run(_ack(f)) for f in flows]
        assert [r.retval for r in after] == [XDP_TX] * len(flows)
        assert [r.data[:6] for r in after] == dst_macs, "a flow changed its backend across the upgrade"
        assert {m.id: maps.vip_stats(m.id).new_flows for m in vips.values()} == \
            {i: s.new_flows for i, s in stats.items()}, "an established flow was counted as a new one"
        assert maps.reasons()[abi.Reason.TX_FORWARD][0] == 2 * len(flows)
    finally:
        if old is not None:
            old.close()
        if new is not None:
            new.close()


def test_same_layout_keeps_every_map(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-attaching the same version converts nothing: every map is the pinned one, same id. With
    the fingerprint saved, no staging compile is needed to tell; without it, the staging compile
    finds every layout equal."""
    build = loader.BuildConfig(pin_dir=inst.pin_dir)
    first = loader.compile_program(build)
    try:
        loader.save_schema(inst, first.schema)   # no fingerprint: compared map by map
        ids = {n: m.info.id for n, m in first.maps.items()}
        assert migrate.upgrade(inst, build) == {n: migrate.KEPT for n in ids}
        loader.save_schema(inst, first.schema, first.source, first.layouts)
        with monkeypatch.context() as m:
            m.setattr(loader, "compile_program", lambda b: pytest.fail("compiled to compare equal layouts"))
            assert migrate.upgrade(inst, build) == {n: migrate.KEPT for n in ids}
        second = loader.compile_program(build)
        try:
            assert {n: m.info.id for n, m in second.maps.items()} == ids
        finally:
            second.close()
    finally:
        first.close()
    assert not (inst.pin_dir / migrate.STAGING).exists()


LAST_RELEASE = "9de896e"   # the last release with u32 table slots and per-CPU LRU limiter buckets


@pytest.mark.parametrize("old_bpf", [LAST_RELEASE], indirect=True)
def test_upgrade_from_the_last_release_repacks_tables_and_keeps_handshakes(old_bpf: Path, inst: Instance) -> None:
    """The release before packed tables (bpf/abi.h LBX_TABLE_SLOTS_PER_WORD) and set-associative
    limiter buckets (bpf/limit.h): its u32 tables are rewritten slot for slot, so a handshake
    begun before the upgrade (its SYN forwarded by the old program: the hash VIP by its table, the
    round-robin VIP from the half-open table) ends on the same backend after it; every other map
    is kept or converted; only the limiter's buckets (soft state: a source starts again with a
    full bucket) are recreated."""
    build = loader.BuildConfig(pin_dir=inst.pin_dir)
    old = loader.compile_program(loader.BuildConfig(pin_dir=inst.pin_dir, src_dir=old_bpf))
    new = None
    try:
        loader.save_schema(inst, old.schema)   # what that release's attach saved (same reason names)
        old_maps = Maps(old.maps)
        old_maps.set_own_mac(LB_MAC)
        Balancer(old_maps).apply(BASE, macs={})
        assert old.maps[abi.Map.TABLE_TMPL].info.value_size == 4, "not the release this test is about"
        flows = _flows(12)
        with one_cpu():
            first = [bpfsys.TestRunner(old.fd).run(f) for f in flows]
        assert {r.retval for r in first} == {XDP_TX}
        tables = {m.id: old_maps.table(m.id) for m in old_maps.vips().values()}
        assert sum(len(t) for t in tables.values()) > 8, "tables to repack"

        adopted = migrate.upgrade(inst, build)
        new = loader.compile_program(build)
        old.close()
        old = None
        assert adopted[abi.Map.TABLES] == f"migrated ({sum(1 for t in tables.values() if t)} entries)", adopted
        assert {n: how for n, how in adopted.items() if how == migrate.RECREATED} == \
            {abi.Map.SRC_LIMIT: migrate.RECREATED, abi.Map.SRC_LIMIT4: migrate.RECREATED}, adopted
        maps = Maps(new.maps)
        assert maps.m[abi.Map.TABLE_TMPL].info.value_size == 8
        assert {i: maps.table(i) for i in tables} == tables
        with one_cpu():
            after = [bpfsys.TestRunner(new.fd).run(_ack(f)) for f in flows]
        assert [r.retval for r in after] == [XDP_TX] * len(flows)
        assert [r.data[:6] for r in after] == [r.data[:6] for r in first], "a handshake changed its backend"
    finally:
        if old is not None:
            old.close()
        if new is not None:
            new.close()
