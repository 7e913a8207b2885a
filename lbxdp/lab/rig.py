"""The namespace rig: a client, one or more balancers, N backends (and a router, in the shapes
that have one), each host a network namespace, built with pyroute2. lbxdp.lab.shapes draws the
four shapes; l2 (the default) is the one `lbxdp demo` and most of tests/netns use:

    namespace <prefix>-sw   br0 (Linux bridge) + one port per host, named after the host role
    namespace <prefix>-cli  eth0 10.111.0.2   fd00:111::2    routes 10.112.0.0/24, fd00:112::/64 via lb
    namespace <prefix>-lb   eth0 10.111.0.3   fd00:111::3    (lbxdp attaches here; ip_forward=0)
    namespace <prefix>-beN  eth0 10.111.0.1N  fd00:111::1N   lo: VIPs 10.112.0.10/32, fd00:112::10/128
                            echo server (lbxdp.lab.echo) on TCP+UDP port 8080, both families

Direct server return: the client sends to the VIP via lb, lb's XDP program rewrites the
destination MAC to a backend's and sends the frame back out of eth0 (XDP_TX), the backend accepts
it because it holds the VIP on lo, and answers the client directly, from the VIP.

Everything is inside namespaces created here (traffic never leaves them), every name carries a
per-run prefix, and Rig.down() removes every namespace and process the rig made, even after a
failed Rig.up(). Usage::

    with Rig(RigSpec()) as rig:                     # up() on enter, down() on exit
        assert rig.ping("cli", rig.addr4("be1"))
        rig.run("cli", "ip", "route")                # any command, in the client namespace
        print(rig.tcp_names(rig.spec.vip4, count=30))   # Counter({'be1': 10, ...}) once lb runs

A rig that must outlive its process (`lbxdp rig up`) is built with up(persistent=True), which
writes a state file; Rig.load_state(path).down() in another process removes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

from pyroute2 import netns

from .. import paths
from . import namespaces as nsx
from . import stub, topology
from .configs import Configs
from .namespaces import CommandFailed
from .processes import Server, cmdline
from .servers import EchoServers
from .shapes import CLI, HOST_IF, LB, RT, SW, Layout, RigError, RigSpec, Shape
from .traffic import FAILED, HeldConns, Traffic

# What tests and commands import from here: the rig and the names its API speaks in.
__all__ = ["CLI", "FAILED", "HOST_IF", "LB", "RT", "SW", "CommandFailed", "HeldConns", "Rig", "RigError",
           "RigSpec", "Server", "Shape"]

log = logging.getLogger(__name__)


class Rig(EchoServers, Traffic, Configs):
    """The namespace rig for one spec. A context manager: up() on enter, down() on exit.

    Builds: namespaces, bridges, veth pairs, addresses, routes, sysctls, the client's checksum
    setting, the balancers' neighbour entries, and (by default) one echo server per backend.
    Depends on: root, the veth and bridge drivers, nsenter (util-linux), ethtool.
    Cleanup: down() (idempotent) stops the servers it started, by PID and start time, then deletes
    the namespaces, which removes every link, address, route and XDP program in them.
    """

    def __init__(self, spec: RigSpec | None = None) -> None:
        self.spec = spec or RigSpec()
        self.layout = Layout(self.spec)
        self._namespaces: list[str] = []     # created by us, in creation order
        self._servers: dict[str, Server] = {}
        self._macs: dict[str, dict[str, str]] = {}   # role -> segment -> MAC read back
        self._persistent = False
        self._owned = False                  # True once we created a namespace (or loaded state)

    # -- names and addresses (lbxdp.lab.shapes.Layout says how they are made) -----------------

    @property
    def backends(self) -> list[str]:
        """Backend roles: be1 .. beN."""
        return self.layout.backends

    @property
    def balancers(self) -> list[str]:
        """Balancer roles: ['lb'], or lb1 .. lbK in the multi shape."""
        return self.layout.balancers

    @property
    def hosts(self) -> list[str]:
        """Every host role: cli, the router (if any), the balancers, the backends."""
        return self.layout.hosts

    def ns(self, role: str) -> str:
        """Full namespace name of a role ('sw', 'cli', 'lb', 'be1', ...)."""
        return self.layout.ns(role)

    def addr4(self, role: str, segment: str | None = None):
        """IPv4 address of a host's interface on a segment (default: its first)."""
        return self.layout.addr4(role, segment)

    def addr6(self, role: str, segment: str | None = None):
        """IPv6 address of a host's interface on a segment (default: its first)."""
        return self.layout.addr6(role, segment)

    def mac(self, role: str, segment: str | None = None) -> str:
        """MAC address of a host's interface as the kernel reports it (read back after creation)."""
        seg = self.layout.segments_of(role)[0].name if segment is None else segment
        return self._macs.get(role, {}).get(seg) or self.layout.mac(role, seg)

    def peer(self, role: str, segment: str | None = None) -> str:
        """Name, in the sw namespace, of the bridge port that is the peer of `role`'s interface."""
        return self.layout.peer(role, segment)

    @property
    def run_dir(self) -> Path:
        """Server logs; removed by down()."""
        return paths.run_root() / f"rig-{self.spec.prefix}"

    @staticmethod
    def state_path(prefix: str) -> Path:
        return paths.run_root() / f"rig-{prefix}.json"

    @staticmethod
    def state_files() -> list[Path]:
        """State files of persistent rigs on this machine (for `lbxdp rig down` without a prefix)."""
        return sorted(paths.run_root().glob("rig-*.json"))

    # -- build --------------------------------------------------------------------------------

    def __enter__(self) -> "Rig":
        # Both `with Rig(spec) as rig:` and `with Rig(spec).up(...) as rig:` work.
        return self if self._namespaces else self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, servers: bool = True, persistent: bool = False) -> "Rig":
        """Build everything; on any failure remove what was built, then raise.

        servers: start the echo servers. persistent: the rig outlives this process (servers are
        not tied to it) and its state is saved to state_path(prefix) for a later down().
        """
        if self._namespaces:
            raise RigError(f"rig {self.spec.prefix} is already up")
        self._persistent = persistent
        try:
            self._build(servers)
        except BaseException as e:
            try:
                self.down()
            except Exception as cleanup_error:  # noqa: BLE001 - reported on the original
                e.add_note(f"and cleaning up after it failed too: {cleanup_error}")
            raise
        return self

    def _created(self, name: str) -> None:
        self._namespaces.append(name)
        self._owned = True

    def _build(self, servers: bool) -> None:
        lay = self.layout
        topology.create_namespaces(lay, self._created)
        if self._persistent:
            self.save_state()   # so that a crash from here on can still be cleaned up
        topology.build_switch(lay)
        for role in self.hosts:
            self._macs[role] = topology.build_host(lay, role)
        topology.wait_ready(lay)
        for role in lay.tx_checksum_off():
            topology.disable_tx_checksum(lay, role)
        if self.spec.lb_neighbors:
            topology.add_neighbors(lay, self.mac)
        if servers:
            self.start_servers()
        if self._persistent:
            self.save_state()

    # -- commands in namespaces ----------------------------------------------------------------

    def ns_cmd(self, role: str) -> list[str]:
        """argv prefix that runs a command in `role`'s namespace (nsenter; see namespaces.ns_cmd)."""
        return nsx.ns_cmd(self.ns(role))

    def run(self, role: str, *argv: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv in `role`'s namespace, capture text output; CommandFailed if check and rc != 0."""
        return nsx.run(self.ns(role), *argv, check=check, timeout=timeout, input=input)

    def processes_in(self, role: str) -> list[int]:
        """PIDs of every live process in `role`'s namespace (threads of this process excepted)."""
        return nsx.processes_in(self.ns(role))

    def attach_peer_stub(self) -> None:
        """The XDP_PASS stub on the peers of every balancer's interfaces (lbxdp.lab.stub: a veth
        delivers native XDP_TX frames only if its peer runs an XDP program). Generic mode needs none."""
        stub.attach(self.layout)

    def detach_peer_stub(self) -> None:
        """Remove whatever XDP program is on those ports (idempotent)."""
        stub.detach(self.layout)

    # -- teardown and state ------------------------------------------------------------------

    def down(self) -> None:
        """Stop the servers, delete the namespaces, remove logs and state file. Idempotent;
        attempts every step and raises RigError at the end if any failed."""
        if not self._owned:
            return  # e.g. up() failed on a prefix already in use: nothing here is ours
        errors: list[str] = []
        try:
            self.stop_servers()
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
        with contextlib.suppress(RigError):  # servers of a dead builder may still be exiting
            nsx.poll("processes in the rig to exit",
                     lambda: not any(nsx.processes_in(n) for n in self._namespaces), timeout=3)
        for name in reversed(list(self._namespaces)):
            if err := self._remove_namespace(name):
                errors.append(err)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_path(self.spec.prefix).unlink()
        with contextlib.suppress(OSError):   # the run root too, if nothing else is in it
            paths.run_root().rmdir()
        if errors:
            raise RigError(f"rig {self.spec.prefix} teardown: " + "; ".join(errors))
        self._owned = False

    def _remove_namespace(self, name: str) -> str | None:
        """Delete one namespace of ours; an error message if that failed."""
        if left := nsx.processes_in(name):
            # Not ours to kill (we only end processes we started); with them alive the
            # namespace outlives its name. Whoever started them must stop them.
            log.warning("processes still in %s at teardown: %s", name,
                        ", ".join(f"{p} ({cmdline(p)})" for p in left))
        try:
            netns.remove(name)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            return f"removing namespace {name}: {e}"
        self._namespaces.remove(name)
        return None

    def leftovers(self) -> list[str]:
        """What of this rig is still on the machine: namespaces named <prefix>-*, and servers it
        started that are still alive. Empty after a successful down()."""
        left = [f"namespace {n}" for n in netns.listnetns() if n.startswith(self.spec.prefix + "-")]
        left += [f"{role} server pid {s.pid}" for role, s in self._servers.items() if s.alive()]
        return left

    def save_state(self, path: Path | None = None) -> Path:
        """Write what down() needs (names, server PIDs and start times, MACs) as JSON."""
        path = Path(path or self.state_path(self.spec.prefix))
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"spec": self.spec.to_json(), "namespaces": self._namespaces, "macs": self._macs,
                 "servers": {r: {"pid": s.pid, "start_time": s.start_time}
                             for r, s in self._servers.items()}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load_state(cls, path: Path | str) -> "Rig":
        """A Rig for a persistent rig built by another process; down() removes it."""
        state = json.loads(Path(path).read_text())
        rig = cls(RigSpec(**state["spec"]))
        rig._namespaces = list(state["namespaces"])
        # A state file written before shapes existed has one MAC per role (its only segment).
        rig._macs = {r: m if isinstance(m, dict) else {"front": m} for r, m in state["macs"].items()}
        rig._servers = {r: Server(s["pid"], s["start_time"]) for r, s in state["servers"].items()}
        rig._persistent = rig._owned = True
        return rig

    @classmethod
    def adopt(cls, prefix: str) -> "Rig":
        """A Rig for the namespaces <prefix>-<role> left by a process that died before down()
        (no state file). Its servers died with it (PR_SET_PDEATHSIG), so down() only has the
        namespaces to remove; it warns about any process still inside them. The shape is guessed
        from the roles found; down() removes every <prefix>-* namespace whatever the guess."""
        names = sorted(n for n in netns.listnetns() if n.startswith(prefix + "-"))
        roles = {n[len(prefix) + 1:] for n in names}
        balancers = sum(1 for r in roles if re.fullmatch(r"lb\d+", r))
        shape = Shape.MULTI if balancers >= 2 else Shape.ROUTED if "rt" in roles else Shape.L2
        rig = cls(RigSpec(prefix=prefix, backends=max(1, sum(1 for r in roles if re.fullmatch(r"be\d+", r))),
                          shape=shape, balancers=balancers if shape is Shape.MULTI else 1))
        sw = f"{prefix}-{SW}"
        rig._namespaces = ([sw] if sw in names else []) + [n for n in names if n != sw]
        rig._owned = bool(rig._namespaces)
        return rig
