"""Where an attached instance keeps its state.

An instance is one interface (in one network namespace) with the program attached. Its maps and
program are pinned in bpffs under the pin root; bpffs holds only BPF objects, so everything else
lives in its run directory under the run root, each file named once here (an Instance property)
and written whole by atomic_write(): the maps' type description (schema.json), the attach record
(state.json), what it was last told (applied.toml, runtime.json), the daemon's last checks
(checks.json) and pid (daemon.pid), and the lock every change takes (lock).
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


def _run_file(name: str, doc: str) -> property:
    return property(lambda inst: inst.run_dir / name, doc=doc)


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

    @staticmethod
    def pin_base() -> Path:
        """Where instances of this kind pin (lbxdp.decap.DecapInstance has its own)."""
        return pin_root()

    @staticmethod
    def run_base() -> Path:
        return run_root()

    @property
    def pin_dir(self) -> Path:
        return self.pin_base() / self.key

    @property
    def run_dir(self) -> Path:
        return self.run_base() / self.key

    @property
    def prog_pin(self) -> Path:
        return self.pin_dir / "prog"

    # The run directory's files, each named here only (see the module docstring).
    schema_file = _run_file("schema.json", "The maps' BTF-derived types (written by attach; read by every "
                            "command that opens the pins).")
    state_file = _run_file("state.json", "The attach record: mode, program id, config path, version.")
    applied_file = _run_file("applied.toml", "The last config applied, in the config file's format (lbxdp.applied).")
    runtime_file = _run_file("runtime.json", "Drains, joins, health verdicts and overrides by backend key "
                             "(lbxdp.applied).")
    checks_file = _run_file("checks.json", "The daemon's last result of every health check, for `lbxdp status`.")
    pid_file = _run_file("daemon.pid", "'<pid> <start time>' of the running `lbxdp run` daemon.")
    lock_file = _run_file("lock", "flock()ed by every change of the maps or the applied state (applied.locked).")

    def exists(self) -> bool:
        return self.prog_pin.exists()

    @classmethod
    def all(cls) -> list["Instance"]:
        """Every instance with a pinned program under the pin root."""
        root, found = cls.pin_base(), []
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
        return [(self.pin_base(), self.pin_dir), (self.run_base(), self.run_dir)]


def atomic_write(path: Path, text: str) -> None:
    """Replace path with text so that a reader sees the old file or the new one, whole, even
    across a crash or power loss: written to a temporary file beside it (mode 0600), fsync'd,
    renamed over it, and the directory fsync'd."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)    # a leftover temporary file keeps its mode through O_CREAT
            data = memoryview(text.encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
