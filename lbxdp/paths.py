"""Where an attached instance keeps its state.

An instance is one interface (in one network namespace) with the program attached. Its maps and
program are pinned in bpffs under the pin root; bpffs holds only BPF objects, so the type
description of its maps (schema.json) and what was applied (state.json) live under the run root.
Both roots can be moved with LBXDP_PIN_ROOT / LBXDP_RUN_ROOT (the tests use per-run roots).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")


def pin_root() -> Path:
    return Path(os.environ.get("LBXDP_PIN_ROOT", str(BPFFS / "lbxdp")))


def run_root() -> Path:
    return Path(os.environ.get("LBXDP_RUN_ROOT", "/run/lbxdp"))


@dataclass(frozen=True)
class Instance:
    ifname: str
    netns: str | None = None

    @property
    def key(self) -> str:
        """'eth0' on the host, 'netns/<name>/eth0' inside a named network namespace."""
        return self.ifname if self.netns is None else f"netns/{self.netns}/{self.ifname}"

    @property
    def label(self) -> str:
        return self.ifname if self.netns is None else f"{self.ifname} (netns {self.netns})"

    @property
    def pin_dir(self) -> Path:
        return pin_root() / self.key

    @property
    def run_dir(self) -> Path:
        return run_root() / self.key

    @property
    def prog_pin(self) -> Path:
        return self.pin_dir / "prog"

    @property
    def schema_file(self) -> Path:
        return self.run_dir / "schema.json"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def exists(self) -> bool:
        return self.prog_pin.exists()

    @classmethod
    def all(cls) -> list["Instance"]:
        """Every instance with a pinned program under the pin root."""
        root, found = pin_root(), []
        if not root.is_dir():
            return found
        for prog in sorted(root.rglob("prog")):
            parts = prog.parent.relative_to(root).parts
            if len(parts) == 1:
                found.append(cls(parts[0]))
            elif len(parts) == 3 and parts[0] == "netns":
                found.append(cls(parts[2], parts[1]))
        return found
