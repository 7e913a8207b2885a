"""Where an attached instance keeps its state.

An instance is one interface (in one network namespace) with the program attached. Its maps and
program are pinned in bpffs under the pin root; bpffs holds only BPF objects, so the type
description of its maps (schema.json) and what was applied (state.json) live under the run root.
Both roots can be moved with LBXDP_PIN_ROOT / LBXDP_RUN_ROOT (the tests use per-run roots).

Interface and namespace names become path components, so an Instance refuses any name the
kernel (or `ip netns add`) would refuse, and anything that could leave its directory. The
roots and every instance directory must be root's and not writable by anyone else
(private_dirs): a directory another user created could have its pins unlinked under us.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import LbxError

BPFFS = Path("/sys/fs/bpf")
IFNAMSIZ = 16        # include/uapi/linux/if.h: 15 bytes and the NUL
NAME_MAX = 255


def check_ifname(name: str) -> None:
    """The kernel's dev_valid_name() (net/core/dev.c): 1-15 bytes, not '.' or '..', no '/', ':' or
    whitespace. lbxdp also refuses quotes, backslashes and control characters: the name ends up
    in a C string (the pin path compiled into the program)."""
    raw = os.fsencode(name)
    why = None
    if not raw:
        why = "it is empty"
    elif len(raw) >= IFNAMSIZ:
        why = f"it is {len(raw)} bytes long (the kernel allows 15)"
    elif name in (".", ".."):
        why = "it is a path, not a name"
    elif any(c in raw for c in b"/:\\\"") or any(c <= 0x20 or c in (0x7F, 0xA0) for c in raw):
        why = "it contains '/', ':', a quote, a backslash, whitespace or a control character"
    if why:
        raise LbxError(f"{name!r} is not a valid interface name: {why}",
                       "list interfaces with `ip -br link` (add --netns NAME for another namespace)", exit_code=2)


def check_netns(name: str) -> None:
    """What `ip netns add` accepts (a file name under /var/run/netns: 1-255 bytes, no '/', not '.'
    or '..'), without quotes, backslashes and control characters (see check_ifname)."""
    raw = os.fsencode(name)
    if (not raw or len(raw) > NAME_MAX or name in (".", "..") or any(c in raw for c in b"/\\\"")
            or any(c < 0x20 or c == 0x7F for c in raw) or name != name.strip()):
        raise LbxError(f"{name!r} is not a valid network namespace name",
                       "list them with `ip netns list`", exit_code=2)


def pin_root() -> Path:
    return Path(os.environ.get("LBXDP_PIN_ROOT", str(BPFFS / "lbxdp")))


def run_root() -> Path:
    return Path(os.environ.get("LBXDP_RUN_ROOT", "/run/lbxdp"))


@dataclass(frozen=True)
class Instance:
    ifname: str
    netns: str | None = None

    def __post_init__(self) -> None:
        check_ifname(self.ifname)
        if self.netns is not None:
            check_netns(self.netns)

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
            try:
                if len(parts) == 1:
                    found.append(cls(parts[0]))
                elif len(parts) == 3 and parts[0] == "netns":
                    found.append(cls(parts[2], parts[1]))
            except LbxError:
                continue    # not a name lbxdp would have made: not one of its instances
        return found

    def dirs(self) -> list[tuple[Path, Path]]:
        """(root, instance directory) for the pins and for the run state."""
        return [(pin_root(), self.pin_dir), (run_root(), self.run_dir)]


def _check_private(d: Path) -> None:
    """d (if it exists) is a real directory of root's that nobody else may write to."""
    try:
        st = d.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LbxError(f"{d} is not a directory (a symlink or a file): lbxdp refuses to use it",
                       f"remove it (rm {d}) if nothing of yours is in it", exit_code=2)
    if st.st_uid != 0 or st.st_mode & 0o022:
        who = f"owned by uid {st.st_uid}" if st.st_uid != 0 else f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        raise LbxError(f"{d} is {who}: another user could replace or unlink what lbxdp keeps there",
                       f"make it root's: chown root: {d}; chmod 700 {d} (or remove it)", exit_code=2)


def private_dirs(inst: Instance, create: bool = False) -> None:
    """Check the roots and every directory from them down to the instance's (see _check_private);
    with create, make the missing ones (mode 0700) first. Raises LbxError before anything is read."""
    for root, d in inst.dirs():
        chain = [root, *(root / Path(*d.relative_to(root).parts[:i + 1]) for i in range(len(d.relative_to(root).parts)))]
        for p in chain:
            _check_private(p)
            if create and not p.exists():
                p.mkdir(mode=0o700, parents=p == root)
                os.chmod(p, 0o700)   # mkdir's mode is masked by the umask
