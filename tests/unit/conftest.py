"""Fixtures shared by the unit tests.

run_main: lbxdp.cli.main() (the console-script entry point, which turns an LbxError into one line
and its exit code) called as `lbxdp ARGS...` with sys.argv patched (monkeypatch restores it) and
stdout/stderr captured by pytest; function scope, nothing to clean up.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import pytest

from lbxdp import cli as cli_mod


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Call lbxdp.cli.main() as `lbxdp ARGS...`; return its exit code and captured output."""
    def run(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["lbxdp", *map(str, args)])
        try:
            cli_mod.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return Run(code, out, err)
    return run
