"""lbxdp.model's own rules (Config.problems) on models built in code, lbxdp.edits' pure edits,
BackendId round trips, and paths.atomic_write: no kernel, no TOML."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from lbxdp import applied, config, edits, model
from lbxdp.errors import LbxError
from lbxdp.health import HealthCheck
from lbxdp.model import Backend, BackendId, Config, HealthOverride, Problem, Protocol, Scheduler, Vip, VipKey
from lbxdp.paths import Instance, atomic_write

A = ipaddress.ip_address
BE1, BE2 = Backend(A("10.0.1.1"), 80), Backend(A("10.0.1.2"), 80, weight=2)
V = Vip(A("10.0.0.1"), 80, Protocol.TCP, backends=(BE1, BE2))
CFG = Config((V,))
ID1 = V.id_of(BE1)


def first(cfg: Config) -> Problem | None:
    p = cfg.problems()
    return p[0] if p else None


def with_vip(**kw: object) -> Config:
    return Config((replace(V, **kw),))


def with_backend(i: int = 0, **kw: object) -> Config:
    bes = list(V.backends)
    bes[i] = replace(bes[i], **kw)
    return with_vip(backends=tuple(bes))


# --- the model's rules, on models built in code -------------------------------------------------

def test_a_valid_model_has_no_problem() -> None:
    assert CFG.problems() == [] and CFG.warnings() == []


@pytest.mark.parametrize("cfg, path, message", [
    (with_backend(weight=-1), "vip[0].backend[0].weight", "-1 is out of range (0-1000)"),
    (with_backend(weight=1001), "vip[0].backend[0].weight", "1001 is out of range (0-1000)"),
    (with_backend(address=A("fd00::1")), "vip[0].backend[0].address",
     "'fd00::1' is IPv6 but the VIP is IPv4; dsr mode cannot cross address families"),
    (with_backend(port=81), "vip[0].backend[0].port", "81 differs from the VIP port 80; dsr mode cannot rewrite ports"),
    (with_backend(address=A("10.0.0.1")), "vip[0].backend[0].address", "'10.0.0.1' is the VIP's own address"),
    (with_backend(address=A("10.0.1.2")), "vip[0].backend[1]", "duplicate backend 10.0.1.2:80 (also backend[0])"),
    (with_backend(mac="02:00:00:00:00:01\n"), "vip[0].backend[0].mac", "is not a MAC address like 02:00:00:00:00:01"),
    (with_backend(mac="01:00:00:00:00:01"), "vip[0].backend[0].mac", "is not a unicast MAC address"),
    (with_backend(address=A("224.0.0.1")), "vip[0].backend[0].address", "'224.0.0.1' cannot be a backend"),
    (with_vip(address=A("127.0.0.1")), "vip[0].address", "'127.0.0.1' cannot be a VIP"),
    (with_vip(port=70000), "vip[0].port", "70000 is out of range (0-65535; 0 = any port)"),
    (with_vip(table_size=4096), "vip[0].table_size", "4096 is not prime"),
    (with_vip(table_size=101), "vip[0].table_size", "101 is less than 100 x 2 backends"),
    (with_vip(slow_start=-1), "vip[0].slow_start", "-1 is out of range (0-3600 seconds)"),
    (with_vip(on_all_down="maybe"), "vip[0].on_all_down", "'maybe' is not one of: drop, pass"),
    (with_vip(backends=()), "vip[0].backend", "a VIP needs at least one backend"),
    (with_vip(backends=(replace(BE1, weight=0), replace(BE2, weight=0))), "vip[0].backend",
     "every backend has weight 0: the VIP could take no flow"),
    (with_vip(health=HealthCheck("tcp", interval=1.0, timeout=2.0)), "vip[0].health.timeout",
     "2 is longer than the interval 1"),
    (Config((replace(V, port=0, backends=(replace(BE1, port=0),), health=HealthCheck("tcp")),)),
     "vip[0].backend[0].health.port", "is required: an any-port backend has no port to check"),
    (Config((V, V)), "vip[1]", "duplicate VIP 10.0.0.1:80/tcp (also vip[0])"),
    (Config((V,), metrics_listen="localhost:1"), "metrics.listen", "'localhost:1' is not ADDRESS:PORT"),
])
def test_problems_name_the_key_path(cfg: Config, path: str, message: str) -> None:
    p = first(cfg)
    assert p is not None and p.path == path and message in p.message, p


@pytest.mark.parametrize("bad", [with_backend(weight=-1), with_backend(port=81), with_vip(table_size=4096),
                                 with_backend(address=A("fd00::1")), Config((V, V))])
def test_a_file_and_a_model_get_the_same_error(bad: Config) -> None:
    """What the model says of itself is what a config file with the same values gets."""
    [p, *_] = bad.problems()
    doc = config.dump(bad)
    with pytest.raises(config.ConfigError) as ei:
        config.parse(doc)
    assert (ei.value.path, ei.value.detail) == (p.path, p.message)


def test_closed_sets_are_enums_and_their_strings_still_compare() -> None:
    v = Vip(A("10.0.0.1"), 80, Protocol.TCP, backends=(BE1,), on_all_down="pass", on_backend_down="migrate")
    assert v.on_all_down is model.OnAllDown.PASS and v.on_backend_down is model.OnBackendDown.MIGRATE
    assert v.on_all_down == "pass" and model.XdpMode("generic") == "generic"
    # messages format them as their strings ("cannot attach XDP to eth0 in native mode")
    assert f"{model.XdpMode.NATIVE} {model.CheckType.UDP} {model.OnAllDown.PASS}" == "native udp pass"
    assert HealthCheck("udp").type is model.CheckType.UDP
    assert config.parse(config.dump(Config((v,)))) == Config((v,))


def test_all_backups_is_a_warning() -> None:
    cfg = with_vip(backends=(replace(BE1, backup=True), replace(BE2, backup=True)))
    assert cfg.problems() == []
    [w] = cfg.warnings()
    assert w.path == "vip[0].backend" and "every backend of 10.0.0.1:80/tcp is a backup" in w.message


# --- BackendId ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["10.0.0.1:80/tcp|10.0.1.1:80", "[fd00::1]:53/udp|[fd00::11]:53",
                                 "10.0.0.1:*/udp|10.0.1.1:*"])
def test_backend_id_round_trips_through_its_key(key: str) -> None:
    bid = BackendId.parse(key)
    assert bid.key == str(bid) == key and BackendId.parse(bid.key) == bid
    assert bid == (bid.vip, bid.address, bid.port)       # the tuple it replaced
    assert f"{bid.vip.name}|{bid.name}" == key


@pytest.mark.parametrize("key", ["x", "10.0.0.1:80/tcp", "10.0.0.1:80/sctp|10.0.1.1:80", "10.0.0.1:80/tcp|10.0.1.1",
                                 "10.0.0.1:80/tcp|[10.0.1.1]:80", "|"])
def test_backend_id_refuses_what_is_not_a_key(key: str) -> None:
    with pytest.raises(ValueError):
        BackendId.parse(key)


def test_vip_key_parse_is_the_inverse_of_name() -> None:
    for k in (V.key, VipKey(A("fd00::1"), 0, Protocol.UDP)):
        assert VipKey.parse(k.name) == k


def test_runtime_written_by_the_previous_version_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.json keeps its 'VIP|BACKEND' key strings: a file of the previous version loads."""
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path))
    inst = Instance("eth9")
    inst.run_dir.mkdir(parents=True)
    inst.applied_file.write_text(config.dump(CFG))
    old = {"draining": {"10.0.0.1:80/tcp|10.0.1.1:80": 50.0}, "joined": {"10.0.0.1:80/tcp|10.0.1.2:80": 1.0},
           "health": {"10.0.0.1:80/tcp|10.0.1.2:80": {"healthy": False}},
           "overrides": {"10.0.0.1:80/tcp|10.0.1.1:80": "up"}}
    inst.runtime_file.write_text(json.dumps(old))
    st = applied.load(inst)
    assert st.draining == {ID1: 50.0} and st.overrides == {ID1: HealthOverride.UP}
    assert st.down() == {V.id_of(BE2)}
    applied.save(inst, st)
    assert json.loads(inst.runtime_file.read_text()) == old


# --- edits ----------------------------------------------------------------------------------------

def test_vip_add_and_del() -> None:
    key = VipKey(A("10.0.0.2"), 53, Protocol.UDP)
    ch = edits.vip_add(CFG, key, (Backend(A("10.0.1.1"), 53),), Scheduler.RR, table_size=7, slow_start=2.0)
    new = ch.cfg.vips[1]
    assert (new.key, new.scheduler, new.table_size, new.slow_start) == (key, Scheduler.RR, model.DEFAULT_TABLE_SIZE, 2.0)
    assert ch.cfg.problems() == [] and CFG.vips == (V,)          # pure: the input is unchanged
    assert edits.vip_del(ch.cfg, key).cfg == CFG
    with pytest.raises(LbxError, match="VIP 10.0.0.1:80/tcp exists already"):
        edits.vip_add(CFG, V.key, (BE1,))
    with pytest.raises(LbxError, match="no VIP 10.0.0.2:53/udp on this balancer"):
        edits.vip_del(CFG, key)


def test_backend_add_del_and_set_weight() -> None:
    b3 = Backend(A("10.0.1.3"), 80, mac="02:AB:00:00:00:03")
    cfg = edits.backend_add(CFG, V.key, b3).cfg
    assert cfg.vips[0].backends[-1] == replace(b3, mac="02:ab:00:00:00:03")
    with pytest.raises(LbxError, match="has backend 10.0.1.3:80 already"):
        edits.backend_add(cfg, V.key, b3)
    assert edits.backend_del(cfg, V.id_of(b3)).cfg == CFG
    assert edits.backend_set_weight(CFG, ID1, 7).cfg.vips[0].backends[0].weight == 7
    with pytest.raises(LbxError, match="10.0.0.1:80/tcp has no backend 10.0.1.9:80"):
        edits.backend_del(CFG, BackendId(V.key, A("10.0.1.9"), 80))


def test_drain_and_health_overrides_are_runtime_changes() -> None:
    ch = edits.backend_drain(CFG, ID1, 123.0)
    assert ch.cfg is CFG and dict(ch.drain) == {ID1: 123.0} and not ch.health
    ch = edits.backend_set_health(CFG, ID1, HealthOverride.DOWN)
    assert ch.cfg is CFG and dict(ch.health) == {ID1: HealthOverride.DOWN}
    with pytest.raises(LbxError, match="no backend 10.0.1.9:80 on VIP 10.0.0.1:80/tcp"):
        edits.backend_set_health(CFG, BackendId(V.key, A("10.0.1.9"), 80), HealthOverride.UP)


def test_an_invalid_edit_is_named_in_the_verb_s_words() -> None:
    bad = edits.backend_set_weight(CFG, ID1, -1).cfg
    with pytest.raises(LbxError) as ei:
        edits.validated(bad, "backend set-weight")
    assert ei.value.message == ("backend set-weight: VIP 10.0.0.1:80/tcp backend 10.0.1.1:80 weight: "
                                "-1 is out of range (0-1000)")
    assert ei.value.exit_code == 2
    last = edits.backend_del(edits.backend_del(CFG, ID1).cfg, V.id_of(BE2)).cfg
    with pytest.raises(LbxError, match="^backend del: VIP 10.0.0.1:80/tcp backend: a VIP needs at least one"):
        edits.validated(last, "backend del")


# --- atomic_write ---------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_files_mode_0600(tmp_path: Path) -> None:
    f = tmp_path / "state.json"
    f.write_text("old")
    os.chmod(f, 0o644)
    atomic_write(f, "new" * 100000)
    assert f.read_text() == "new" * 100000
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]     # no temporary file left


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "applied.toml"
    f.write_text("old")

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write(f, "new")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["applied.toml"]


def test_every_run_dir_file_is_named_by_the_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path))
    inst = Instance("eth0", "ns1")
    names = {p.name for p in (inst.applied_file, inst.runtime_file, inst.checks_file, inst.pid_file,
                              inst.schema_file, inst.state_file, inst.lock_file)}
    assert names == {"applied.toml", "runtime.json", "checks.json", "daemon.pid", "schema.json", "state.json", "lock"}
    assert {p.parent for p in (inst.applied_file, inst.lock_file)} == {inst.run_dir}
