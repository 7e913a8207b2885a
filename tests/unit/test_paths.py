"""Names that become paths: `lbxdp detach` (and every command taking IFNAME or --netns) refuses a
name the kernel would refuse, and never removes anything outside the instance's own directories.

Through lbxdp.cli.main() (what the user runs), as root pretended (os.geteuid patched), with the
pin and run roots in this test's tmp_path (LBXDP_PIN_ROOT / LBXDP_RUN_ROOT): nothing here touches
bpffs or an interface. Each test lays out sentinel files (another instance's pins, a directory
outside the roots) and checks that every one is still there afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbxdp.errors import LbxError
from lbxdp.paths import Instance, check_ifname, check_netns


@dataclass
class Layout:
    pins: Path
    run: Path
    outside: Path
    sentinels: list[Path]

    def intact(self) -> list[Path]:
        """Sentinels that are gone (should be none)."""
        return [p for p in self.sentinels if not p.exists()]


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    """Pin and run roots under tmp_path holding instance 'keep0' (host) and 'keep1' (netns ns1),
    plus tmp_path/x/data, a directory outside both roots. Roots set through the environment;
    pytest removes tmp_path."""
    pins, run, outside = tmp_path / "pins", tmp_path / "run", tmp_path / "x"
    sentinels = []
    for root in (pins, run):
        for d in (root / "keep0", root / "netns" / "ns1" / "keep1"):
            d.mkdir(parents=True)
            (d / "prog").write_text("not really a pin")
            sentinels.append(d / "prog")
    outside.mkdir()
    (outside / "data").write_text("precious")
    sentinels.append(outside / "data")
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(pins))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(run))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return Layout(pins, run, outside, sentinels)


BAD_IFNAMES = ["", ".", "..", "../x", "../../../../x", "../x/data", "a/b", "x" * 16, "a b", "a\tb", "a:b",
               'a"b', "a\\b"]


@pytest.mark.parametrize("name", BAD_IFNAMES)
def test_detach_refuses_a_bad_interface_name_and_removes_nothing(run_main, layout: Layout, name: str) -> None:
    r = run_main("detach", name)
    assert r.code == 2, r
    assert r.err.startswith("lbxdp: error: ") and "not a valid interface name" in r.err, r.err
    assert len(r.err.splitlines()) == 2 and "Traceback" not in r.err
    assert layout.intact() == []


@pytest.mark.parametrize("cmd", [["status"], ["attach", "eth0", "--config", "/nonexistent.toml"], ["vip", "ls"],
                                 ["run", "eth0", "--config", "/nonexistent.toml"], ["reload", "-i", "a/b"]])
def test_every_command_taking_ifname_refuses_a_bad_one(run_main, layout: Layout, cmd: list[str]) -> None:
    if cmd[0] in ("status",):
        cmd = [*cmd, "../keep0"]
    elif cmd[0] in ("attach", "run"):
        cmd = [cmd[0], "..", *cmd[2:]]
    elif cmd[0] == "vip":
        cmd = [*cmd, "-i", "."]
    r = run_main(*cmd)
    assert r.code == 2 and "not a valid interface name" in r.err, r
    assert layout.intact() == []


@pytest.mark.parametrize("netns", ["..", ".", "../..", "a/b", "", "../../x"])
@pytest.mark.parametrize("cmd", [["detach", "keep1"], ["status", "keep1"]])
def test_a_bad_netns_name_is_refused_before_it_becomes_a_path(run_main, layout: Layout, netns: str,
                                                              cmd: list[str]) -> None:
    r = run_main("--netns", netns, *cmd)
    assert r.code == 2, r
    assert "not a valid network namespace name" in r.err and "Traceback" not in r.err, r.err
    assert layout.intact() == []


def test_a_symlinked_instance_directory_is_not_followed(run_main, layout: Layout) -> None:
    (layout.pins / "evil0").symlink_to(layout.outside, target_is_directory=True)
    r = run_main("detach", "evil0")
    assert r.code == 2, r
    assert "symlink or leads outside" in r.err, r.err
    assert (layout.pins / "evil0").is_symlink() and layout.intact() == []


def test_a_symlinked_netns_directory_is_not_followed(run_main, layout: Layout) -> None:
    (layout.outside / "eth0").mkdir()
    (layout.outside / "eth0" / "prog").write_text("x")
    layout.sentinels.append(layout.outside / "eth0" / "prog")
    (layout.run / "netns" / "evil").symlink_to(layout.outside, target_is_directory=True)
    # The namespace does not exist: detach goes straight to removing the pins, as after `ip netns del`.
    r = run_main("--netns", "evil", "detach", "eth0")
    assert r.code == 2, r
    assert layout.intact() == []


def test_detach_of_a_good_name_removes_only_its_own_directories(run_main, layout: Layout) -> None:
    for root in (layout.pins, layout.run):
        (root / "gone0").mkdir()
        (root / "gone0" / "prog").write_text("x")
    r = run_main("detach", "gone0")     # no such interface: only the pins and run state go
    assert r.code == 0, r
    assert not (layout.pins / "gone0").exists() and not (layout.run / "gone0").exists()
    assert layout.intact() == []


def test_names_follow_the_kernels_rules() -> None:
    for good in ("eth0", "x" * 15, "veth-lb.100", "br_0", "é"):
        check_ifname(good)
    for bad in BAD_IFNAMES + ["a\x00b", "a\nb", "a\xa0b"]:
        with pytest.raises(LbxError) as e:
            check_ifname(bad)
        assert e.value.exit_code == 2
    for good in ("ns1", "lbx12345-lb", "x" * 255):
        check_netns(good)
    for bad in ("", ".", "..", "a/b", "x" * 256, "a\nb"):
        with pytest.raises(LbxError):
            check_netns(bad)


def test_instances_with_names_lbxdp_would_not_make_are_skipped(layout: Layout) -> None:
    (layout.pins / "netns" / "ns1" / "a b").mkdir()
    (layout.pins / "netns" / "ns1" / "a b" / "prog").write_text("x")
    assert Instance.all() == [Instance("keep0"), Instance("keep1", "ns1")]


def test_bpffs_is_mounted_private(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without mode=, bpffs is mounted world-writable (1777): anyone could pre-create lbxdp's
    pin directory. The loader mounts it 0700 as systemd does (the mount itself is faked here)."""
    from lbxdp import loader
    calls = []
    monkeypatch.setattr(loader, "_is_bpffs", lambda path: False)
    monkeypatch.setattr(loader.subprocess, "run", lambda argv, **kw: calls.append(argv))
    loader.ensure_bpffs()
    assert calls == [["mount", "-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"]]
    assert "mode=0700" in (Path(__file__).resolve().parents[2] / "scripts" / "install.sh").read_text()
