"""Shared by every test directory.

A run ended by SIGTERM (`timeout`, a CI job's cancel) must still remove what its fixtures made
(pinned maps under /sys/fs/bpf, namespaces, servers): Python's default SIGTERM ends the process
without running a `finally`, so it becomes a KeyboardInterrupt, which pytest answers by tearing
the session's fixtures down before it exits.
"""

from __future__ import annotations

import signal
from typing import Any


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: Any) -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
