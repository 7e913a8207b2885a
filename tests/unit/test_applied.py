"""lbxdp.applied: the applied state reads back what was saved, and an unreadable one is a
one-line error for status and edits but never an obstacle to applying a full config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lbxdp import applied, config, model
from lbxdp.paths import Instance

CFG = """
[[vip]]
address = "10.0.0.1"
port = 53
protocol = "udp"
  [vip.health]
  type = "udp"
  send = "ping\\u0000\\u0001\\r\\n\\"'\\\\"
  expect = "\\u007fok"
  [[vip.backend]]
  address = "10.0.1.1"
  mac = "02:00:00:00:00:01"
"""


X = model.BackendId.parse("10.0.0.1:53/udp|10.0.1.1:53")


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Instance:
    """An instance whose run root is this test's tmp_path (no kernel, no pins)."""
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(tmp_path / "pin"))
    return Instance("eth0", "ns1")


def test_saved_state_with_control_characters_loads_back(inst: Instance) -> None:
    st = applied.State(config.parse(CFG), draining={X: 1.0})
    applied.save(inst, st)
    back = applied.load(inst)
    assert back.cfg == st.cfg and back.draining == {X: 1.0}
    assert back.cfg.vips[0].health.udp_payload == b"ping\x00\x01\r\n\"'\\"


@pytest.mark.parametrize("damage", [b"[[vip]\n", b"\xff\xfe", b'[[vip]]\naddress = "10.0.0.1"\n',
                                    b'send = "a\x01b"\n'])
def test_unreadable_state_is_one_line_with_the_fix(inst: Instance, damage: bytes) -> None:
    applied.save(inst, applied.State(config.parse(CFG)))
    (inst.run_dir / "applied.toml").write_bytes(damage)
    with pytest.raises(applied.Unreadable) as ei:
        applied.load(inst)
    e = ei.value
    assert "\n" not in e.message and "eth0 (netns ns1)" in e.message and "unreadable" in e.message
    assert "applied.toml" not in e.message
    assert e.hint.startswith("re-attach with a config to replace it: lbxdp --netns ns1 attach eth0 --config FILE")


def test_unreadable_state_is_replaced_by_a_full_config(inst: Instance, caplog: pytest.LogCaptureFixture) -> None:
    applied.save(inst, applied.State(config.parse(CFG), overrides={X: model.HealthOverride.DOWN}))
    (inst.run_dir / "applied.toml").write_text("not toml [")
    with caplog.at_level(logging.WARNING):
        st = applied.load_to_replace(inst)
    assert st.cfg.vips == () and st.overrides == {X: "down"}   # runtime.json was readable: kept
    [rec] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "unreadable" in rec.getMessage() and "kept: the maps and the connection table" in rec.getMessage()
    (inst.run_dir / "runtime.json").write_text("{")
    assert applied.load_to_replace(inst).cfg.vips == ()


def test_missing_state_of_an_attached_instance_is_unreadable_not_empty(inst: Instance) -> None:
    """A removed run directory must not read as "told nothing": the next edit or health step
    would then apply an empty config and remove every VIP of a forwarding program."""
    assert applied.load(inst).cfg.vips == ()          # never attached: empty is the truth
    inst.prog_pin.parent.mkdir(parents=True)
    inst.prog_pin.write_text("")                     # attached (a pinned program)
    with pytest.raises(applied.Unreadable) as ei:
        applied.load(inst)
    assert "missing" in ei.value.message
    assert applied.load_to_replace(inst).cfg.vips == ()   # a full config still replaces it
