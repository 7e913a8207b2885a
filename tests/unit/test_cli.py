"""The `lbxdp` command without root and without a kernel.

Three ways in, each for what it shows best:
- CliRunner on lbxdp.cli.cli: help text and plain successful output. In standalone mode an
  LbxError is not a ClickException, so CliRunner reports it as result.exception, exit code 1:
  it does not show what the user sees.
- run_main (tests/unit/conftest.py): lbxdp.cli.main() (the console-script entry point, which
  turns LbxError into one line and its exit code) with sys.argv patched, output captured by pytest.
- the real console script in a subprocess, as a non-root user (setpriv to nobody when the tests
  run as root), for exit codes and the absence of tracebacks end to end.

Commands that need root must refuse before doing anything: the modules they would use
(control, demo, loader, rig) are replaced by tripwires that fail the test when touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

import lbxdp
from lbxdp import cli as cli_mod
from lbxdp.errors import LbxError

GOOD = """\
[[vip]]
address = "10.112.0.10"
port = 8080
protocol = "tcp"
  [[vip.backend]]
  address = "10.111.0.11"
  [[vip.backend]]
  address = "10.111.0.12"

[[vip]]
address = "fd00:112::10"
port = 53
protocol = "udp"
  [[vip.backend]]
  address = "fd00:111::11"
"""

BAD = """\
[[vip]]
address = "10.112.0.10"
port = 8080
protocol = "tcp"
  [[vip.backend]]
  address = "10.111.0.11"
  [[vip.backend]]
  address = "10.111.0.300"
"""


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Path]:
    """good.toml and bad.toml in this test's tmp_path (removed by pytest)."""
    (tmp_path / "good.toml").write_text(GOOD)
    (tmp_path / "bad.toml").write_text(BAD)
    return {"good": tmp_path / "good.toml", "bad": tmp_path / "bad.toml"}


class Tripwire(types.ModuleType):
    """Stands in for a module a refused command must not use; records every attribute asked for."""

    def __init__(self, name: str):
        super().__init__(name)
        self.touched: list[str] = []

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self.touched.append(attr)
        raise AssertionError(f"{self.__name__}.{attr} was used")


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> dict[str, Tripwire]:
    """Replace lbxdp.{control,demo,loader,rig} for one test (monkeypatch restores them)."""
    wires = {}
    for name in ("control", "demo", "loader", "rig"):
        wires[name] = Tripwire(f"lbxdp.{name}")
        monkeypatch.setitem(sys.modules, f"lbxdp.{name}", wires[name])
        monkeypatch.setattr(lbxdp, name, wires[name], raising=False)
    return wires


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.geteuid() says 1000: the process is not root (whoever runs the tests)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


# --- help ---------------------------------------------------------------------------------------

def test_help_shows_commands_and_examples() -> None:
    r = CliRunner().invoke(cli_mod.cli, ["--help"])
    assert r.exit_code == 0, r.output
    assert "Examples:" in r.output
    assert "sudo lbxdp attach eth0 --config" in r.output
    for cmd in ("attach", "detach", "status", "config", "doctor", "demo"):
        assert f"  {cmd}" in r.output, cmd


def test_short_help_option_and_version() -> None:
    assert CliRunner().invoke(cli_mod.cli, ["-h"]).exit_code == 0
    r = CliRunner().invoke(cli_mod.cli, ["--version"])
    assert r.exit_code == 0 and lbxdp.__version__ in r.output


@pytest.mark.parametrize("cmd,expect", [
    (["attach", "--help"], "Example: sudo lbxdp attach"),
    (["status", "--help"], "--json"),
    (["config", "check", "--help"], "without touching anything"),
])
def test_command_help(cmd: list[str], expect: str) -> None:
    r = CliRunner().invoke(cli_mod.cli, cmd)
    assert r.exit_code == 0, r.output
    assert expect in r.output


def test_help_does_not_import_bcc() -> None:
    """`lbxdp --help` must work where bcc is missing or unusable: only the loader imports it."""
    code = ("import sys; sys.argv = ['lbxdp', '--help']; from lbxdp import cli; cli.main(); "
            "assert 'bcc' not in sys.modules, 'bcc was imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Examples:" in p.stdout


# --- config check ------------------------------------------------------------------------------

def test_config_check_good(configs: dict[str, Path]) -> None:
    r = CliRunner().invoke(cli_mod.cli, ["config", "check", str(configs["good"])])
    assert r.exit_code == 0, r.output
    assert r.output == f"{configs['good']}: ok, 2 VIPs, 3 backends\n"


def test_config_check_bad_is_one_line_and_exit_2(run_main, configs: dict[str, Path]) -> None:
    r = run_main("config", "check", configs["bad"])
    assert r.code == 2
    assert r.out == ""
    error, hint = r.err.splitlines()
    assert error == (f"lbxdp: error: {configs['bad']}: vip[0].backend[1].address: "
                     "'10.111.0.300' is not an IPv4 or IPv6 address")
    assert hint.startswith("  hint: nothing was applied")


def test_config_check_bad_through_clirunner_is_an_exception(configs: dict[str, Path]) -> None:
    """What CliRunner sees without main(): the LbxError itself, exit code 1 (hence run_main)."""
    r = CliRunner().invoke(cli_mod.cli, ["config", "check", str(configs["bad"])])
    assert r.exit_code == 1
    assert isinstance(r.exception, LbxError) and r.exception.exit_code == 2


def test_config_check_missing_file(run_main, tmp_path: Path) -> None:
    r = run_main("config", "check", tmp_path / "nope.toml")
    assert r.code == 2
    assert f"cannot read config {tmp_path / 'nope.toml'}: No such file or directory" in r.err
    assert "Traceback" not in r.err


def test_config_check_directory_is_a_usage_error(run_main, tmp_path: Path) -> None:
    r = run_main("config", "check", tmp_path)
    assert r.code == 2
    assert "is a directory" in r.err
    assert "Traceback" not in r.err


# --- commands that need root --------------------------------------------------------------------

ROOT_COMMANDS = [
    pytest.param(["attach", "eth0", "--config", "{good}"], id="attach"),
    pytest.param(["attach", "eth0", "--config", "{good}", "--mode", "generic"], id="attach-generic"),
    pytest.param(["detach", "eth0"], id="detach"),
    pytest.param(["status"], id="status"),
    pytest.param(["status", "eth0", "--json"], id="status-json"),
    pytest.param(["exporter"], id="exporter"),
    pytest.param(["exporter", "eth0", "--listen", "127.0.0.1:9842"], id="exporter-listen"),
    pytest.param(["demo"], id="demo"),
    pytest.param(["demo", "--backends", "2"], id="demo-backends"),
    pytest.param(["top", "--once"], id="top"),
    pytest.param(["run", "eth0", "--config", "{good}"], id="run"),
    pytest.param(["reload"], id="reload"),
    pytest.param(["vip", "ls"], id="vip-ls"),
    pytest.param(["vip", "add", "10.0.0.1:80/tcp", "-b", "10.0.1.1:80"], id="vip-add"),
    pytest.param(["vip", "del", "10.0.0.1:80/tcp"], id="vip-del"),
    pytest.param(["backend", "ls"], id="backend-ls"),
    pytest.param(["backend", "add", "10.0.0.1:80/tcp", "10.0.1.2:80"], id="backend-add"),
    pytest.param(["backend", "del", "10.0.0.1:80/tcp", "10.0.1.2:80"], id="backend-del"),
    pytest.param(["backend", "set-weight", "10.0.0.1:80/tcp", "10.0.1.2:80", "3"], id="backend-set-weight"),
    pytest.param(["backend", "drain", "10.0.0.1:80/tcp", "10.0.1.2:80"], id="backend-drain"),
]


@pytest.mark.parametrize("args", ROOT_COMMANDS)
def test_root_commands_refuse_without_root_and_do_nothing(
        run_main, as_user, tripwires: dict[str, Tripwire], configs: dict[str, Path], args: list[str]) -> None:
    args = [a.format(good=configs["good"]) for a in args]
    r = run_main(*args)
    assert r.code == 1
    assert r.out == ""
    assert "Traceback" not in r.err
    assert r.err.startswith("lbxdp: error: this command needs root")
    assert f"hint: run it with sudo: sudo lbxdp {' '.join(args)}" in r.err
    assert {n: w.touched for n, w in tripwires.items() if w.touched} == {}


def test_attach_nonexistent_config_is_a_clear_error(run_main, monkeypatch: pytest.MonkeyPatch,
                                                    tripwires: dict[str, Tripwire], tmp_path: Path) -> None:
    """As root (pretended), attach reads the config first and stops there: nothing is attached."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    missing = tmp_path / "missing.toml"
    r = run_main("attach", "eth0", "--config", missing)
    assert r.code == 2
    assert r.err.splitlines() == [f"lbxdp: error: cannot read config {missing}: No such file or directory",
                                  "  hint: check the path"]
    assert tripwires["control"].touched == [] and tripwires["loader"].touched == []


def test_attach_bad_config_applies_nothing(run_main, monkeypatch: pytest.MonkeyPatch,
                                           tripwires: dict[str, Tripwire], configs: dict[str, Path]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    r = run_main("attach", "eth0", "--config", configs["bad"])
    assert r.code == 2
    assert "vip[0].backend[1].address" in r.err and "'10.111.0.300'" in r.err
    assert "nothing was applied" in r.err
    assert tripwires["control"].touched == []


# --- the real console script, as a user that is not root ----------------------------------------

def _unprivileged() -> list[str]:
    """A command prefix that runs its command as a user that is not root (or skip the test)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop to a normal user")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can read (pytest's tmp_path is 0700 to its owner); removed after."""
    d = Path(tempfile.mkdtemp(prefix="lbxdp-unit-"))
    d.chmod(0o755)
    for name, text in (("good.toml", GOOD), ("bad.toml", BAD)):
        (d / name).write_text(text)
        (d / name).chmod(0o644)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def lbxdp_script() -> Path:
    script = Path(sys.executable).parent / "lbxdp"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (is lbxdp installed in this venv?)")
    return script


def _script(script: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*_unprivileged(), str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_script_help(lbxdp_script: Path, shared_dir: Path) -> None:
    p = _script(lbxdp_script, shared_dir, "--help")
    assert p.returncode == 0, p.stderr
    assert "Examples:" in p.stdout


def test_script_config_check(lbxdp_script: Path, shared_dir: Path) -> None:
    p = _script(lbxdp_script, shared_dir, "config", "check", "good.toml")
    assert (p.returncode, p.stdout, p.stderr) == (0, "good.toml: ok, 2 VIPs, 3 backends\n", "")
    p = _script(lbxdp_script, shared_dir, "config", "check", "bad.toml")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 2, p.stderr
    assert lines[0].startswith("lbxdp: error: bad.toml: vip[0].backend[1].address: '10.111.0.300'")


def test_script_attach_as_user_says_sudo(lbxdp_script: Path, shared_dir: Path) -> None:
    p = _script(lbxdp_script, shared_dir, "attach", "eth0", "--config", "good.toml")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [
        "lbxdp: error: this command needs root (it loads BPF programs and changes interfaces)",
        "  hint: run it with sudo: sudo lbxdp attach eth0 --config good.toml",
    ]


def test_self_check_tripwire_fires(run_main, monkeypatch: pytest.MonkeyPatch, tripwires: dict[str, Tripwire]) -> None:
    """Proof that the tripwires would catch a command that went on without root."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(AssertionError, match="lbxdp.control.detach was used"):
        run_main("detach", "eth0")
    assert tripwires["control"].touched == ["detach"]


# --- issue 8: edits validated like a file, in the verb's words -----------------------------------

@pytest.fixture
def fake_edit(monkeypatch: pytest.MonkeyPatch):
    """lbxdp.control with only edit(): the change is made on GOOD's config and validated exactly
    as control.edit does (edits.validated), without an attached instance."""
    from lbxdp import config, edits
    fake = types.ModuleType("lbxdp.control")
    seen: list[object] = []

    def edit(inst, change, what="edit"):
        seen.append(edits.validated(change(config.parse(GOOD), 0.0).cfg, what))
        from lbxdp.balancer import Diff
        return Diff()
    fake.edit = edit  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lbxdp.control", fake)
    monkeypatch.setattr(lbxdp, "control", fake, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return seen


def test_set_weight_negative_says_out_of_range(run_main, fake_edit) -> None:
    r = run_main("backend", "set-weight", "-i", "eth0", "10.112.0.10:8080/tcp", "10.111.0.11:8080", "-1")
    assert r.code == 2, r.err
    assert r.err.splitlines()[0] == ("lbxdp: error: backend set-weight: VIP 10.112.0.10:8080/tcp backend "
                                     "10.111.0.11:8080 weight: -1 is out of range (0-1000)")
    assert "No such option" not in r.err and fake_edit == []


def test_set_weight_in_range_passes_validation(run_main, fake_edit) -> None:
    r = run_main("backend", "set-weight", "-i", "eth0", "10.112.0.10:8080/tcp", "10.111.0.11:8080", "7")
    assert r.code == 0, r.err
    [cfg] = fake_edit
    assert cfg.vips[0].backends[0].weight == 7


def test_backend_add_bad_mac_names_the_verb_not_a_document(run_main, fake_edit) -> None:
    r = run_main("backend", "add", "-i", "eth0", "10.112.0.10:8080/tcp", "10.111.0.19:8080", "--mac", "02:00:00:00:00:01\n")
    assert r.code == 2
    assert r.err.startswith("lbxdp: error: backend add: VIP 10.112.0.10:8080/tcp backend 10.111.0.19:8080 mac: ")
    assert "edited config" not in r.err and "applied.toml" not in r.err and "vip[0]" not in r.err


def test_vip_with_unknown_protocol_names_it(run_main, fake_edit) -> None:
    r = run_main("vip", "add", "-i", "eth0", "10.0.0.1:80/sctp", "-b", "10.0.1.1:80")
    assert r.code == 2
    assert r.err.splitlines()[0] == "lbxdp: error: VIP '10.0.0.1:80/sctp': 'sctp' is not a protocol; use tcp or udp"


def test_config_check_prints_warnings(run_main, tmp_path: Path) -> None:
    f = tmp_path / "lb.toml"
    f.write_text(GOOD.replace('address = "fd00:111::11"', 'address = "fd00:111::11"\n  backup = true'))
    r = run_main("config", "check", f)
    assert r.code == 0
    assert r.err.splitlines() == [
        "lbxdp: warning: vip[1].backend: every backend of [fd00:112::10]:53/udp is a backup: backups take new "
        "flows only while no primary is usable, so they all take them; set backup = false on some"]
    assert r.out.endswith("ok, 2 VIPs, 3 backends\n")


@pytest.mark.parametrize("content, expect", [
    (b"# \xff\n", "not UTF-8: byte 0xff at offset 2"),
    (b"a = " + b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_config_check_bad_bytes_are_one_line(run_main, tmp_path: Path, content: bytes, expect: str) -> None:
    f = tmp_path / "lb.toml"
    f.write_bytes(content)
    r = run_main("config", "check", f)
    assert r.code == 2 and expect in r.err and "Traceback" not in r.err
    assert len(r.err.splitlines()) == 2   # the error and its hint


def test_config_check_dev_zero(run_main) -> None:
    r = run_main("config", "check", "/dev/zero")
    assert r.code == 2 and "not a regular file" in r.err


def test_attach_and_run_take_allow_empty() -> None:
    for cmd in (["attach", "--help"], ["run", "--help"]):
        r = CliRunner().invoke(cli_mod.cli, cmd)
        assert "--allow-empty" in r.output
