"""Running code and commands inside a named network namespace.

setns(2) is per thread, so everything here is safe in one thread of a bigger process: the body of
in_netns() runs with the calling thread in the namespace and always switches back. Sockets
(netlink ones included) stay in the namespace they were created in, so a socket made inside can be
used after the block from anywhere.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from typing import Callable, Iterator, TypeVar

from pyroute2 import IPRoute, netns

from .shapes import RigError

T = TypeVar("T")


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a namespace exited non-zero; str() includes its output."""

    def __str__(self) -> str:
        out = (self.stderr or "").strip() or (self.stdout or "").strip()
        return f"{super().__str__()}\n{out[-2000:]}" if out else super().__str__()


def netns_path(name: str) -> str:
    return os.path.join(netns.NETNS_RUN_DIR, name)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace `name`, and always switch back.

    /proc/thread-self, not /proc/self: setns(2) moves only the calling thread and /proc/self
    names the main thread.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(name), os.O_RDONLY)  # no O_CREAT: never create by accident
        try:
            netns.setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            netns.setns(home)
    finally:
        os.close(home)


@contextlib.contextmanager
def iproute(name: str) -> Iterator[IPRoute]:
    """An rtnetlink socket bound to namespace `name`."""
    with in_netns(name):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def ns_socket(name: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket created in namespace `name` (it stays there; use it from anywhere)."""
    with in_netns(name):
        return socket.socket(family, type_, proto)


def sysctl(name: str, values: dict[str, int]) -> None:
    """Write net.* sysctls inside namespace `name` (/proc/sys/net follows the thread's netns)."""
    with in_netns(name):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))


def ns_cmd(name: str) -> list[str]:
    """argv prefix that runs a command in namespace `name`.

    nsenter --net, not `ip netns exec`: the latter also unshares the mount namespace and
    remounts /sys, which hides bpffs (/sys/fs/bpf) from the command, so an lbxdp started
    there would not see the maps pinned by another. nsenter execs the command (no fork), so
    a Popen's pid is the command's own pid.
    """
    return ["nsenter", f"--net={netns_path(name)}", "--"]


def run(name: str, *argv: str, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv in namespace `name`, capture text output; CommandFailed if check and rc != 0."""
    cmd = [*ns_cmd(name), *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def processes_in(name: str) -> list[int]:
    """PIDs of every live process whose network namespace is `name` (to find leftovers;
    zombies have left their namespaces). Threads of this process are not counted."""
    try:
        ino = os.stat(netns_path(name)).st_ino
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def poll(what: str, check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call check() until it returns something truthy; RigError naming `what` after `timeout`.
    Other exceptions from check() count as "not yet"; a RigError from it ends the wait at once."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except RigError:
            raise  # check() saw something that waiting will not mend
        except Exception as e:  # noqa: BLE001 - kept for the timeout message
            last_exc = e
        if time.monotonic() >= deadline:
            raise RigError(f"timed out after {timeout:.0f}s waiting for {what}"
                           + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)
