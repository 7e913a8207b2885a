"""Processes the lab starts inside namespaces: echo servers, clients. Each is named by its PID and
start time (a recycled PID has another start time), so the lab only ever signals what it started.

In-process rigs (tests, demo) tie their children to the parent with PR_SET_PDEATHSIG; persistent
rigs (`lbxdp rig up`) start them in their own session instead, so they outlive the command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import namespaces as nsx
from .shapes import RigError

_PR_SET_PDEATHSIG = 1
_PKG_PARENT = str(Path(__file__).resolve().parents[2])
ECHO_MODULE = "lbxdp.lab.echo"


def start_time(pid: int) -> int | None:
    """Process start time (clock ticks since boot, field 22 of /proc/PID/stat), None if gone.

    Together with the PID it names one process: a recycled PID has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def set_pdeathsig() -> None:
    """In the child before exec: die with SIGTERM when the parent thread dies.

    A safety net for in-process rigs (tests, demo) if the parent is killed before down();
    it survives exec of nsenter and python (neither is set-uid nor has file capabilities).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def python_env() -> dict[str, str]:
    """The environment for `python -m lbxdp.lab...` children: they import this very package,
    installed or not, whatever the cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH")) if p)
    return env


def echo_argv(*args: str) -> list[str]:
    """argv of an echo program: `python -m lbxdp.lab.echo ARGS...`."""
    return [sys.executable, "-m", ECHO_MODULE, *args]


@dataclass
class Server:
    """A server the lab started: its PID and start time name exactly one process."""

    pid: int
    start_time: int
    popen: subprocess.Popen | None = None  # None when loaded from a state file

    def alive(self) -> bool:
        """Still running (a zombie or a recycled PID is not)."""
        return start_time(self.pid) == self.start_time


def start(ns: str, argv: list[str], log: Path, persistent: bool, what: str) -> Server:
    """Start argv in namespace `ns`, output appended to `log`; tied to us unless persistent.
    RigError naming `what` (with the log) if it dies at once."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        popen = subprocess.Popen([*nsx.ns_cmd(ns), *argv], stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, env=python_env(), close_fds=True,
                                 start_new_session=persistent,
                                 preexec_fn=None if persistent else set_pdeathsig)
    started = start_time(popen.pid)
    if started is None:
        popen.wait()
        raise RigError(f"{what} died at once:\n{log_tail(log)}")
    return Server(popen.pid, started, popen)


def log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def check_is(srv: Server, word: str, what: str) -> None:
    """The PID we hold must be the program itself (nsenter exec'd it), or stopping it would
    signal another process."""
    argv = Path(f"/proc/{srv.pid}/cmdline").read_bytes().split(b"\0")
    if word.encode() not in argv:
        raise RigError(f"pid {srv.pid} is not {what}: {argv!r}")


def terminate(srv: Server, timeout: float) -> None:
    """SIGTERM then SIGKILL one process, only while its PID still has the recorded start time."""
    def gone() -> bool:
        if srv.popen is not None:
            return srv.popen.poll() is not None  # reaps our own child
        return start_time(srv.pid) != srv.start_time
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return
        if start_time(srv.pid) == srv.start_time:
            os.kill(srv.pid, sig)
        with contextlib.suppress(RigError):
            nsx.poll(f"pid {srv.pid} to exit", gone, timeout=timeout)
            return
    if not gone():
        raise RigError(f"pid {srv.pid} survived SIGKILL")
