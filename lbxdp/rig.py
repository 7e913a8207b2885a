"""The namespace rig: a client, the balancer and N backends on one L2 segment, built with pyroute2.

This is the one place that wraps pyroute2 for topology; `lbxdp demo`, `lbxdp rig up|exec|down` and
tests/netns/conftest.py all build through it, and test bodies never call netlink verbs themselves.

    namespace <prefix>-sw   br0 (Linux bridge) + one port per host, named after the host role
    namespace <prefix>-cli  eth0 10.111.0.2   fd00:111::2    routes 10.112.0.0/24, fd00:112::/64 via lb
    namespace <prefix>-lb   eth0 10.111.0.3   fd00:111::3    (lbxdp attaches here; ip_forward=0)
    namespace <prefix>-beN  eth0 10.111.0.1N  fd00:111::1N   lo: VIPs 10.112.0.10/32, fd00:112::10/128
                            echo server (lbxdp.echo) on TCP+UDP port 8080, both families

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
import ctypes
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Iterator

from pyroute2 import IPRoute, netns

from . import paths

log = logging.getLogger(__name__)

SW, CLI, LB = "sw", "cli", "lb"
HOST_IF = "eth0"          # every host's interface; the kernel keeps names per namespace
BRIDGE = "br0"            # in the sw namespace
FAILED = "!failed"        # key under which tcp_names/udp_names count failed attempts
_HOST_NUM = {CLI: 2, LB: 3}   # backend i (1-based) is host 10 + i
_IFA_F_NODAD = 0x02
_IFA_F_TENTATIVE = 0x40
_NUD_PERMANENT = 0x80
_BR_STATE_FORWARDING = 3
_PR_SET_PDEATHSIG = 1
_PKG_PARENT = str(Path(__file__).resolve().parent.parent)


class RigError(RuntimeError):
    """The rig could not be built or removed; the message says which step and what was seen."""


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a namespace exited non-zero; str() includes its output."""

    def __str__(self) -> str:
        out = (self.stderr or "").strip() or (self.stdout or "").strip()
        return f"{super().__str__()}\n{out[-2000:]}" if out else super().__str__()


def new_prefix() -> str:
    """'lbx' + 5 hex digits, not used by any existing namespace."""
    for _ in range(100):
        prefix = "lbx" + secrets.token_hex(3)[:5]
        if not any(n.startswith(prefix + "-") for n in netns.listnetns()):
            return prefix
    raise RigError("could not find an unused namespace prefix")


@dataclass(frozen=True)
class RigSpec:
    """What to build. Strings are accepted for addresses and converted to ipaddress objects.

    Host numbers in both segments: cli 2, lb 3, backend i -> 10 + i (be1: 10.111.0.11,
    fd00:111::11, MAC 02:6c:62:00:00:11). The client routes the VIP's
    /24 and /64 via lb; those must lie outside the segment.
    lb_neighbors: add permanent neighbour entries for every backend on lb, because an XDP program
    cannot trigger neighbour resolution (bpf_fib_lookup answers NO_NEIGH until the kernel happened
    to resolve the address), and the first packets of a test must not depend on that.
    """

    prefix: str = field(default_factory=new_prefix)
    backends: int = 3
    v4_net: IPv4Network = IPv4Network("10.111.0.0/24")
    v6_net: IPv6Network = IPv6Network("fd00:111::/64")
    vip4: IPv4Address = IPv4Address("10.112.0.10")
    vip6: IPv6Address = IPv6Address("fd00:112::10")
    port: int = 8080
    lb_neighbors: bool = True

    def __post_init__(self) -> None:
        for name, conv in (("v4_net", IPv4Network), ("v6_net", IPv6Network),
                           ("vip4", IPv4Address), ("vip6", IPv6Address)):
            object.__setattr__(self, name, conv(getattr(self, name)))
        if not re.fullmatch(r"[a-z][a-z0-9]{1,11}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 2-12 chars, [a-z][a-z0-9]*")
        if not 1 <= self.backends <= 89:
            raise ValueError(f"backends={self.backends}: must be 1..89 (host numbers stay two digits)")
        if self.v4_net.num_addresses < 256 or self.v6_net.prefixlen > 120:
            raise ValueError("segments must be at least a /24 and a /120")
        if self.vip4_net.overlaps(self.v4_net) or self.vip6_net.overlaps(self.v6_net):
            raise ValueError("the VIP prefixes must lie outside the segment")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port}")

    @property
    def vip4_net(self) -> IPv4Network:
        """The prefix the client routes via lb (the VIP's /24)."""
        return IPv4Network(f"{self.vip4}/24", strict=False)

    @property
    def vip6_net(self) -> IPv6Network:
        return IPv6Network(f"{self.vip6}/64", strict=False)

    def to_json(self) -> dict:
        return {k: (str(v) if not isinstance(v, (int, bool)) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------------------------
# namespace plumbing: setns is per thread, so all of this is safe in one thread of a bigger process


def _netns_path(name: str) -> str:
    return os.path.join(netns.NETNS_RUN_DIR, name)


@contextlib.contextmanager
def _in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace `name`, and always switch back.

    Sockets (netlink ones included) stay in the namespace they were created in, so a socket made
    here can be used after the block. /proc/thread-self, not /proc/self: setns(2) moves only the
    calling thread and /proc/self names the main thread.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(_netns_path(name), os.O_RDONLY)  # no O_CREAT: never create by accident
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
def _iproute(name: str) -> Iterator[IPRoute]:
    """An rtnetlink socket bound to namespace `name`."""
    with _in_netns(name):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ns_socket(name: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket created in namespace `name` (it stays there; use it from anywhere)."""
    with _in_netns(name):
        return socket.socket(family, type_, proto)


def _sysctl(name: str, values: dict[str, int]) -> None:
    """Write net.* sysctls inside namespace `name` (/proc/sys/net follows the thread's netns)."""
    with _in_netns(name):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))


def _poll(what: str, check, timeout: float = 10.0, interval: float = 0.02):
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


def _start_time(pid: int) -> int | None:
    """Process start time (clock ticks since boot, field 22 of /proc/PID/stat), None if gone.

    Together with the PID it names one process: a recycled PID has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _set_pdeathsig() -> None:
    """In the child before exec: die with SIGTERM when the parent thread dies.

    A safety net for in-process rigs (tests, demo) if the parent is killed before down();
    it survives exec of nsenter and python (neither is set-uid nor has file capabilities).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Server:
    """An echo server the rig started: its PID and start time name exactly one process."""

    pid: int
    start_time: int
    popen: subprocess.Popen | None = None  # None when loaded from a state file

    def alive(self) -> bool:
        """Still running (a zombie or a recycled PID is not)."""
        return _start_time(self.pid) == self.start_time


# --------------------------------------------------------------------------------------------


class Rig:
    """The namespace rig for one spec. A context manager: up() on enter, down() on exit.

    Builds: namespaces, bridge, veth pairs, addresses, routes, sysctls, the client's checksum
    setting, lb's neighbour entries, and (by default) one echo server per backend.
    Depends on: root, the veth and bridge drivers, nsenter (util-linux), ethtool.
    Cleanup: down() (idempotent) stops the servers it started, by PID and start time, then deletes
    the namespaces, which removes every link, address, route and XDP program in them.
    """

    def __init__(self, spec: RigSpec | None = None) -> None:
        self.spec = spec or RigSpec()
        self._namespaces: list[str] = []     # created by us, in creation order
        self._servers: dict[str, Server] = {}
        self._macs: dict[str, str] = {}
        self._persistent = False
        self._owned = False                  # True once we created a namespace (or loaded state)

    # -- names and addresses ----------------------------------------------------------------

    @property
    def backends(self) -> list[str]:
        """Backend roles: be1 .. beN."""
        return [f"be{i}" for i in range(1, self.spec.backends + 1)]

    @property
    def hosts(self) -> list[str]:
        """Roles with an eth0 on the segment: cli, lb, be1..beN."""
        return [CLI, LB, *self.backends]

    def ns(self, role: str) -> str:
        """Full namespace name of a role ('sw', 'cli', 'lb', 'be1', ...)."""
        if role != SW and role not in self.hosts:
            raise KeyError(f"no role {role!r} in this rig (roles: sw, {', '.join(self.hosts)})")
        return f"{self.spec.prefix}-{role}"

    def _host_num(self, role: str) -> int:
        if role in _HOST_NUM:
            return _HOST_NUM[role]
        if role in self.backends:
            return 10 + int(role[2:])
        raise KeyError(f"{role!r} is not a host of this rig")

    def addr4(self, role: str) -> IPv4Address:
        """Segment IPv4 address of a host's eth0."""
        return self.spec.v4_net[self._host_num(role)]

    def addr6(self, role: str) -> IPv6Address:
        """Segment IPv6 address; the host number is written in hex digits that read like the
        decimal one (be1: 10.111.0.11 and fd00:111::11)."""
        return self.spec.v6_net[int(str(self._host_num(role)), 16)]

    def mac(self, role: str) -> str:
        """MAC address of a host's eth0 as the kernel reports it (read back after creation)."""
        if role in self._macs:
            return self._macs[role]
        return f"02:6c:62:00:00:{self._host_num(role):02d}"  # what up() assigns ("lb", host)

    @property
    def servers(self) -> dict[str, Server]:
        """Echo servers running now, by backend role (a copy)."""
        return dict(self._servers)

    @staticmethod
    def peer(role: str) -> str:
        """Name, in the sw namespace, of the bridge port that is `role`'s eth0's peer."""
        return role

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
            self._create_namespaces()
            if persistent:
                self.save_state()   # so that a crash from here on can still be cleaned up
            self._build_switch()
            for role in self.hosts:
                self._build_host(role)
            self._wait_ready()
            self._disable_client_tx_checksum()
            if self.spec.lb_neighbors:
                self._add_lb_neighbors()
            if servers:
                self.start_servers()
            if persistent:
                self.save_state()
        except BaseException as e:
            try:
                self.down()
            except Exception as cleanup_error:  # noqa: BLE001 - reported on the original
                e.add_note(f"and cleaning up after it failed too: {cleanup_error}")
            raise
        return self

    def _create_namespaces(self) -> None:
        existing = set(netns.listnetns())
        for role in (SW, *self.hosts):
            name = self.ns(role)
            if name in existing:
                raise RigError(f"namespace {name} already exists: prefix {self.spec.prefix} is in "
                               "use (remove it with `lbxdp rig down` or pick another prefix)")
            netns.create(name)
            self._namespaces.append(name)
            self._owned = True
        # Before any link exists, so that every interface created later inherits 'default'.
        _sysctl(self.ns(SW), {
            # A switch has no addresses; without IPv6 its ports send no RS/MLD/DAD noise.
            "net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        for role in self.hosts:
            values = {
                # DAD would keep new IPv6 addresses 'tentative' (unusable) for a second or more.
                "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                # No routers here; router solicitations would only be noise in lb's counters.
                "net.ipv6.conf.default.router_solicitations": 0,
                # New namespaces copy IPv4 'all'/'default' from the host's (devconf_inherit_init_net
                # = 0), so pin what the rig relies on instead of inheriting the host's choice.
                "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                "net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0,
            }
            if role in self.backends:
                # The backends hold the VIP on lo: never answer ARP for it (arp_ignore=1: only
                # for addresses on the receiving interface) nor use it as ARP source
                # (arp_announce=2). The kernel takes the max of 'all' and the interface's value.
                # (IPv6 needs nothing: neighbour solicitations are answered only for addresses
                # on the receiving interface.)
                values |= {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.default.arp_ignore": 1,
                           "net.ipv4.conf.all.arp_announce": 2,
                           "net.ipv4.conf.default.arp_announce": 2}
            _sysctl(self.ns(role), values)

    def _build_switch(self) -> None:
        with _iproute(self.ns(SW)) as ipr:
            # Multicast snooping off: br0 floods IPv6 neighbour solicitations (multicast) to every
            # port instead of depending on MLD reports it may not have seen yet. STP is off by
            # default, so ports forward as soon as they are up (polled in _wait_ready anyway).
            ipr.link("add", ifname=BRIDGE, kind="bridge", br_mcast_snooping=0)
            br = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.link("set", index=br, state="up")
            for role in self.hosts:
                # The pair is made in sw and its eth0 end is created directly in the host's
                # namespace (IFLA_NET_NS_FD on the peer): no interface ever appears in the root
                # namespace, and every host's eth0 can share the name.
                ipr.link("add", ifname=self.peer(role), kind="veth",
                         peer={"ifname": HOST_IF, "address": self.mac(role),
                               "net_ns_fd": self.ns(role)})
                port = ipr.link_lookup(ifname=self.peer(role))[0]
                ipr.link("set", index=port, master=br)
                ipr.link("set", index=port, state="up")

    def _build_host(self, role: str) -> None:
        s = self.spec
        with _iproute(self.ns(role)) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            eth = ipr.link_lookup(ifname=HOST_IF)[0]
            ipr.link("set", index=lo, state="up")
            ipr.link("set", index=eth, state="up")
            ipr.addr("add", index=eth, address=str(self.addr4(role)), prefixlen=s.v4_net.prefixlen)
            # NODAD as well as accept_dad=0: either alone suffices; both cost nothing.
            ipr.addr("add", index=eth, address=str(self.addr6(role)), prefixlen=s.v6_net.prefixlen,
                     flags=_IFA_F_NODAD)
            if role == CLI:
                ipr.route("add", dst=str(s.vip4_net), gateway=str(self.addr4(LB)))
                ipr.route("add", dst=str(s.vip6_net), gateway=str(self.addr6(LB)))
            elif role in self.backends:
                ipr.addr("add", index=lo, address=str(s.vip4), prefixlen=32)
                ipr.addr("add", index=lo, address=str(s.vip6), prefixlen=128, flags=_IFA_F_NODAD)
            link = ipr.get_links(eth)[0]
            self._macs[role] = link.get_attr("IFLA_ADDRESS")
        if role in self.backends:
            _sysctl(self.ns(role), {"net.ipv4.conf.eth0.arp_ignore": 1,
                                    "net.ipv4.conf.eth0.arp_announce": 2,
                                    "net.ipv4.conf.eth0.rp_filter": 0})

    def _wait_ready(self) -> None:
        """Poll until every bridge port forwards, every eth0 is up and no address is tentative."""
        with _iproute(self.ns(SW)) as ipr:
            def ports_forwarding() -> bool:
                for role in self.hosts:
                    link = ipr.get_links(ipr.link_lookup(ifname=self.peer(role))[0])[0]
                    slave = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
                    if link.get_attr("IFLA_OPERSTATE") != "UP" or slave is None or \
                            slave.get_attr("IFLA_BRPORT_STATE") != _BR_STATE_FORWARDING:
                        return False
                return True
            _poll(f"bridge ports of {self.ns(SW)} to forward", ports_forwarding)
        for role in self.hosts:
            with _iproute(self.ns(role)) as ipr:
                eth = ipr.link_lookup(ifname=HOST_IF)[0]

                def usable() -> bool:
                    if ipr.get_links(eth)[0].get_attr("IFLA_OPERSTATE") != "UP":
                        return False
                    v6 = ipr.get_addr(family=socket.AF_INET6, index=eth)
                    return any(a.get_attr("IFA_ADDRESS") == str(self.addr6(role)) for a in v6) \
                        and not any(a.get_attr("IFA_FLAGS", a["flags"]) & _IFA_F_TENTATIVE for a in v6)
                _poll(f"{self.ns(role)} eth0 up with non-tentative IPv6 addresses", usable)

    def _disable_client_tx_checksum(self) -> None:
        # Checksum gotcha: a veth passes the sender's skb on with CHECKSUM_PARTIAL (the TCP/UDP
        # checksum not yet filled in, to be completed "by the hardware"). If lb's XDP program
        # sends the frame on with XDP_TX in native mode, that skb state is gone and nobody
        # completes the checksum: the backend drops the packet (TcpInCsumErrors/UdpInCsumErrors).
        # Measured on this rig: with tx on, not even a SYN or a single datagram gets through in
        # native mode; generic mode is unaffected. A real NIC puts a full checksum on the wire,
        # so make the client's port behave like one. (`tx off` turns every tx-checksum-* feature
        # off, and TSO/GSO with them.)
        self.run(CLI, "ethtool", "-K", HOST_IF, "tx", "off")
        out = self.run(CLI, "ethtool", "-k", HOST_IF).stdout
        if not re.search(r"^tx-checksumming: off", out, re.M):
            raise RigError(f"tx checksum offload still on in {self.ns(CLI)}:\n{out}")

    def _add_lb_neighbors(self) -> None:
        with _iproute(self.ns(LB)) as ipr:
            eth = ipr.link_lookup(ifname=HOST_IF)[0]
            for role in self.backends:
                for addr in (self.addr4(role), self.addr6(role)):
                    ipr.neigh("add", ifindex=eth, dst=str(addr), lladdr=self.mac(role),
                              state=_NUD_PERMANENT)

    # -- commands in namespaces ----------------------------------------------------------------

    def ns_cmd(self, role: str) -> list[str]:
        """argv prefix that runs a command in `role`'s namespace.

        nsenter --net, not `ip netns exec`: the latter also unshares the mount namespace and
        remounts /sys, which hides bpffs (/sys/fs/bpf) from the command, so an lbxdp started
        there would not see the maps pinned by another. nsenter execs the command (no fork), so
        a Popen's pid is the command's own pid.
        """
        return ["nsenter", f"--net={_netns_path(self.ns(role))}", "--"]

    def run(self, role: str, *argv: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv in `role`'s namespace, capture text output; CommandFailed if check and rc != 0."""
        cmd = [*self.ns_cmd(role), *map(str, argv)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def ping(self, src: str, dst, timeout: float = 2.0) -> bool:
        """One ICMP echo from `src`'s namespace to address `dst`; True if answered in time.

        Raw sockets from this process (root), because Debian's minimal image has no ping.
        """
        dst = ipaddress.ip_address(dst)
        v6 = dst.version == 6
        ident, seq = os.getpid() & 0xFFFF, secrets.randbelow(0xFFFF)
        if v6:  # the kernel fills in ICMPv6 checksums on raw sockets itself
            family, proto, req, rep = socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129
        else:
            family, proto, req, rep = socket.AF_INET, socket.IPPROTO_ICMP, 8, 0
        payload = b"lbxdp-rig"
        msg = struct.pack("!BBHHH", req, 0, 0, ident, seq) + payload
        if not v6:
            msg = msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]
        deadline = time.monotonic() + timeout
        with _ns_socket(self.ns(src), family, socket.SOCK_RAW, proto) as s:
            s.sendto(msg, (str(dst), 0))
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, peer = s.recvfrom(2048)
                except socket.timeout:
                    break
                if not v6:
                    data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets include the IP header
                if len(data) < 8 or ipaddress.ip_address(peer[0].split("%")[0]) != dst:
                    continue
                rtype, _code, _csum, rid, rseq = struct.unpack("!BBHHH", data[:8])
                if (rtype, rid, rseq) == (rep, ident, seq):
                    return True
        return False

    def _inhabited(self, roles: list[str]) -> bool:
        return any(self.processes_in(r) for r in roles)

    def processes_in(self, role: str) -> list[int]:
        """PIDs of every live process whose network namespace is `role`'s (to find leftovers;
        zombies have left their namespaces). Threads of this process are not counted."""
        try:
            ino = os.stat(_netns_path(self.ns(role))).st_ino
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

    # -- echo servers --------------------------------------------------------------------------

    def _server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # So that `-m lbxdp.echo` imports this very package, installed or not, whatever the cwd.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH")) if p)
        return env

    def start_servers(self) -> None:
        """Start `python -m lbxdp.echo` in every backend and wait until each answers TCP and UDP
        on both of its own segment addresses (probed from inside its namespace)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for role in self.backends:
            if role in self._servers:
                continue
            logf = open(self.run_dir / f"{role}.log", "ab")
            try:
                popen = subprocess.Popen(
                    [*self.ns_cmd(role), sys.executable, "-m", "lbxdp.echo",
                     "--name", role, "--port", str(self.spec.port)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    env=self._server_env(), close_fds=True,
                    start_new_session=self._persistent,
                    preexec_fn=None if self._persistent else _set_pdeathsig)
            finally:
                logf.close()
            start = _start_time(popen.pid)
            if start is None:
                popen.wait()
                raise RigError(f"echo server for {role} died at once:\n{self._log_tail(role)}")
            self._servers[role] = Server(popen.pid, start, popen)
        for role in self.backends:
            self._wait_server(role)

    def _log_tail(self, role: str) -> str:
        try:
            return (self.run_dir / f"{role}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _wait_server(self, role: str) -> None:
        srv = self._servers[role]
        port = self.spec.port

        def answers() -> bool:
            if srv.popen is not None and srv.popen.poll() is not None:
                raise RigError(f"echo server for {role} exited with {srv.popen.returncode}:\n"
                               f"{self._log_tail(role)}")
            for family, addr in ((socket.AF_INET, self.addr4(role)), (socket.AF_INET6, self.addr6(role))):
                with _ns_socket(self.ns(role), family, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect((str(addr), port))
                    if s.recv(64) != f"{role}\n".encode():
                        return False
                with _ns_socket(self.ns(role), family, socket.SOCK_DGRAM) as s:
                    s.settimeout(1.0)
                    s.connect((str(addr), port))
                    s.send(b"ready?")
                    if s.recv(64) != f"{role} ready?".encode():
                        return False
            return True
        try:
            _poll(f"the echo server of {role} to answer on port {port}", answers)
        except RigError as e:
            raise RigError(f"{e}\nserver log:\n{self._log_tail(role)}") from None
        # The pid we hold must be the server itself (nsenter exec'd it), or down() kills the wrong one.
        cmdline = Path(f"/proc/{srv.pid}/cmdline").read_bytes().split(b"\0")
        if b"lbxdp.echo" not in cmdline:
            raise RigError(f"pid {srv.pid} is not the echo server of {role}: {cmdline!r}")

    def stop_servers(self, timeout: float = 5.0) -> None:
        """SIGTERM each server this rig started (if its PID still has the recorded start time),
        SIGKILL after `timeout` seconds."""
        errors = []
        for role, srv in list(self._servers.items()):
            try:
                _terminate(srv, timeout)
                del self._servers[role]
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                errors.append(f"{role} (pid {srv.pid}): {e}")
        if errors:
            raise RigError("could not stop echo servers: " + "; ".join(errors))

    def stop_server(self, role: str, timeout: float = 5.0) -> None:
        """Stop one backend's echo server (SIGTERM, SIGKILL after `timeout`; by PID and start
        time) and wait until it has exited: its sockets are closed when this returns, so the
        backend answers TCP with RST and UDP with ICMP port unreachable. A no-op if not running."""
        srv = self._servers.get(role)
        if srv is None:
            return
        _terminate(srv, timeout)
        del self._servers[role]

    def start_server(self, role: str) -> Server:
        """Start one backend's echo server (again, e.g. after stop_server) and wait until it
        answers TCP and UDP on both its addresses; returns it (also in `servers`)."""
        if role not in self.backends:
            raise KeyError(f"{role!r} is no backend of rig {self.spec.prefix}")
        if role in self._servers:
            raise RigError(f"the echo server of {role} already runs (pid {self._servers[role].pid})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / f"{role}.log", "ab") as logf:
            popen = subprocess.Popen(
                [*self.ns_cmd(role), sys.executable, "-m", "lbxdp.echo", "--name", role,
                 "--port", str(self.spec.port)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=self._server_env(),
                close_fds=True, start_new_session=self._persistent,
                preexec_fn=None if self._persistent else _set_pdeathsig)
        start = _start_time(popen.pid)
        if start is None:
            popen.wait()
            raise RigError(f"echo server for {role} died at once:\n{self._log_tail(role)}")
        self._servers[role] = Server(popen.pid, start, popen)
        self._wait_server(role)
        return self._servers[role]

    def tcp_hello(self, host, port: int | None = None, *, src: str = CLI, timeout: float = 1.0) -> str:
        """One TCP connection to host:port made by this process from `src`'s namespace: the name
        in the echo server's greeting. Raises OSError (refused, reset, timed out) or EOFError.

        Cheap enough (no process per attempt) for a test that times every connection, e.g. to see
        when new connections stop reaching a failed backend. Thread-safe."""
        host = ipaddress.ip_address(host)
        family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        deadline = time.monotonic() + timeout
        with _ns_socket(self.ns(src), family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((str(host), port or self.spec.port))
            buf = b""
            while b"\n" not in buf and len(buf) < 256:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = s.recv(256)
                if not chunk:
                    raise EOFError(f"EOF before the greeting (got {buf!r})")
                buf += chunk
        return buf.split(b"\n", 1)[0].decode(errors="replace")

    # -- XDP peer stub ----------------------------------------------------------------------

    def attach_peer_stub(self) -> None:
        """Attach an XDP_PASS program (bpf/stub.c), native mode, to lb's peer port in sw.

        Needed when lb's program runs in native mode: a veth delivers XDP_TX/XDP_REDIRECT frames
        only if its peer has an XDP program (see bpf/stub.c). Generic mode needs no stub.
        The attachment lives on the device (it outlasts this process) and goes with the namespace.
        """
        from . import bpfsys, loader  # lazily: the rest of the rig works without bcc

        stub, fd = loader.compile_stub()
        try:
            with _in_netns(self.ns(SW)):  # the ifname resolves in the thread's netns
                bpfsys.xdp_attach(socket.if_nametoindex(self.peer(LB)), fd, bpfsys.XDP_FLAGS_DRV_MODE)
        finally:
            stub.cleanup()  # closes our fds only; the device keeps its reference to the program

    def detach_peer_stub(self) -> None:
        """Remove whatever XDP program is on lb's peer port (idempotent)."""
        with _iproute(self.ns(SW)) as ipr:
            port = ipr.link_lookup(ifname=self.peer(LB))[0]
            ipr.link("set", index=port, xdp_fd=-1)

    # -- lbxdp configuration -------------------------------------------------------------------

    def lb_config_toml(self, scheduler: str = "rr", with_mac: bool = True) -> str:
        """lbxdp config: DSR VIPs v4 tcp, v4 udp, v6 tcp, v6 udp, each with every backend.

        with_mac: give each backend's real eth0 MAC; without it the control plane has to find
        the MAC itself (lb's neighbour table, see RigSpec.lb_neighbors)."""
        out = []
        for vip, addr in ((self.spec.vip4, self.addr4), (self.spec.vip6, self.addr6)):
            for proto in ("tcp", "udp"):
                out += ["[[vip]]", f'address = "{vip}"', f"port = {self.spec.port}",
                        f'protocol = "{proto}"', 'mode = "dsr"', f'scheduler = "{scheduler}"', ""]
                for role in self.backends:
                    out += ["  [[vip.backend]]", f'  address = "{addr(role)}"']
                    out += [f'  mac = "{self.mac(role)}"'] if with_mac else []
                    out += [""]
        return "\n".join(out)

    def endpoint(self, role: str, version: int = 4) -> str:
        """A backend as lbxdp names it: '10.111.0.11:8080' or '[fd00:111::11]:8080'."""
        return f"{self.addr4(role)}:{self.spec.port}" if version == 4 else f"[{self.addr6(role)}]:{self.spec.port}"

    def role_of(self, endpoint: str) -> str:
        """The backend role of an lbxdp backend name (the inverse of endpoint())."""
        for role in self.backends:
            if endpoint in (self.endpoint(role, 4), self.endpoint(role, 6)):
                return role
        raise KeyError(f"{endpoint!r} is no backend of rig {self.spec.prefix}")

    def vip_name(self, version: int = 4, proto: str = "tcp") -> str:
        """A VIP as lbxdp names it: '10.112.0.10:8080/tcp' or '[fd00:112::10]:8080/udp'."""
        vip = self.spec.vip4 if version == 4 else f"[{self.spec.vip6}]"
        return f"{vip}:{self.spec.port}/{proto}"

    def vip_toml(self, version: int = 4, proto: str = "tcp", backends: list[str] | None = None,
                 scheduler: str = "maglev", weights: dict[str, int] | None = None,
                 backup: tuple[str, ...] | list[str] = ()) -> str:
        """One [[vip]] of an lbxdp config: the rig's VIP of this family and protocol (DSR) with
        these backend roles (default: all), weights (default 1) and backups. MACs are left out
        (resolved from lb's neighbour table). Concatenate several for a config file."""
        vip, addr = (self.spec.vip4, self.addr4) if version == 4 else (self.spec.vip6, self.addr6)
        out = ["[[vip]]", f'address = "{vip}"', f"port = {self.spec.port}", f'protocol = "{proto}"',
               'mode = "dsr"', f'scheduler = "{scheduler}"', ""]
        for role in self.backends if backends is None else backends:
            out += ["  [[vip.backend]]", f'  address = "{addr(role)}"']
            if weights and role in weights:
                out.append(f"  weight = {weights[role]}")
            if role in backup:
                out.append("  backup = true")
            out.append("")
        return "\n".join(out) + "\n"

    # -- client helpers --------------------------------------------------------------------

    def client(self, proto: str, host, port: int | None = None, count: int = 10,
               timeout: float = 30.0, *, src: str = CLI, try_timeout: float = 1.0,
               same_flow: bool = False, payload: str | None = None,
               payload_size: int | None = None, sport_base: int | None = None) -> dict:
        """Run `python -m lbxdp.echo client` in `src`'s namespace; return its JSON summary
        ({"names": {...}, "failed": n, "attempts": n, "errors": [...], "elapsed": s}).
        At most `count` attempts within `timeout` seconds. TCP with payload/payload_size: each
        connection also sends that many bytes and checks they are echoed back whole. UDP with
        sport_base: attempt i sends from port sport_base + i, and the summary has "flows"."""
        argv = [sys.executable, "-m", "lbxdp.echo", "client", proto, str(host),
                str(port or self.spec.port), "--count", str(count), "--timeout", str(timeout),
                "--try-timeout", str(try_timeout)]
        if same_flow:
            argv.append("--same-flow")
        if payload is not None:
            argv += ["--payload", payload]
        if payload_size is not None:
            argv += ["--payload-size", str(payload_size)]
        if sport_base is not None:
            argv += ["--sport-base", str(sport_base)]
        cmd = [*self.ns_cmd(src), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15,
                              env=self._server_env())
        if proc.returncode != 0:
            raise CommandFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    def tcp_names(self, host, port: int | None = None, count: int = 10, timeout: float = 30.0,
                  **kw) -> Counter[str]:
        """Backend names that answered `count` sequential TCP connections to host:port from
        the client; failed attempts are counted under FAILED. Attempts not made because
        `timeout` ran out are not counted (the total is then below `count`)."""
        return self._names(self.client("tcp", host, port, count, timeout, **kw))

    def udp_names(self, host, port: int | None = None, count: int = 10, timeout: float = 30.0,
                  same_flow: bool = False, **kw) -> Counter[str]:
        """Like tcp_names, one datagram per attempt, each from a fresh socket (a new source port,
        so a new flow) unless same_flow."""
        return self._names(self.client("udp", host, port, count, timeout, same_flow=same_flow, **kw))

    def udp_flows(self, host, count: int, sport_base: int, port: int | None = None,
                  timeout: float = 60.0, **kw) -> dict[int, str | None]:
        """Which backend answered each of `count` UDP flows from source ports sport_base,
        sport_base + 1, ... (one datagram each; None if unanswered). The same arguments make the
        same 5-tuples, so a second call maps the same flows again."""
        res = self.client("udp", host, port, count, timeout, sport_base=sport_base, **kw)
        return {int(p): name for p, name in res["flows"].items()}

    def hold(self, host, port: int | None = None, conns: int = 10, *, interval: float = 0.05,
             duration: float = 60.0, try_timeout: float = 2.0, src: str = CLI) -> "HeldConns":
        """Start `python -m lbxdp.echo hold tcp` in `src`'s namespace: `conns` long-lived
        connections to host:port, each exchanging a numbered line every sweep until stopped.
        Use it as a context manager (it kills the client by PID on exit if it still runs), call
        wait_ready() before relying on the connections and stop() for the JSON summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        base = self.run_dir / f"hold-{secrets.token_hex(4)}"
        files = {k: base.with_suffix(f".{k}") for k in ("stop", "ready", "out", "err")}
        argv = [sys.executable, "-m", "lbxdp.echo", "hold", "tcp", str(host), str(port or self.spec.port),
                "--conns", str(conns), "--interval", str(interval), "--duration", str(duration),
                "--try-timeout", str(try_timeout), "--stop-file", str(files["stop"]),
                "--ready-file", str(files["ready"])]
        with open(files["out"], "wb") as out, open(files["err"], "wb") as err:
            popen = subprocess.Popen([*self.ns_cmd(src), *argv], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, env=self._server_env(), close_fds=True,
                                     preexec_fn=_set_pdeathsig)
        return HeldConns(popen, files)

    @staticmethod
    def _names(result: dict) -> Counter[str]:
        names = Counter(result["names"])
        if result["failed"]:
            names[FAILED] = result["failed"]
        return names

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
        roles = [n[len(self.spec.prefix) + 1:] for n in self._namespaces]
        with contextlib.suppress(RigError):  # servers of a dead builder may still be exiting
            _poll("processes in the rig to exit", lambda: not self._inhabited(roles), timeout=3)
        for name, role in reversed(list(zip(self._namespaces, roles))):
            if left := self.processes_in(role):
                # Not ours to kill (we only end processes we started); with them alive the
                # namespace outlives its name. Whoever started them must stop them.
                log.warning("processes still in %s at teardown: %s", name,
                            ", ".join(f"{p} ({_cmdline(p)})" for p in left))
            try:
                netns.remove(name)
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                errors.append(f"removing namespace {name}: {e}")
                continue
            self._namespaces.remove(name)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_path(self.spec.prefix).unlink()
        with contextlib.suppress(OSError):   # the run root too, if nothing else is in it
            paths.run_root().rmdir()
        if errors:
            raise RigError(f"rig {self.spec.prefix} teardown: " + "; ".join(errors))
        self._owned = False

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
        rig._macs = dict(state["macs"])
        rig._servers = {r: Server(s["pid"], s["start_time"]) for r, s in state["servers"].items()}
        rig._persistent = rig._owned = True
        return rig

    @classmethod
    def adopt(cls, prefix: str) -> "Rig":
        """A Rig for the namespaces <prefix>-<role> left by a process that died before down()
        (no state file). Its servers died with it (PR_SET_PDEATHSIG), so down() only has the
        namespaces to remove; it warns about any process still inside them."""
        roles = {n[len(prefix) + 1:] for n in netns.listnetns() if n.startswith(prefix + "-")}
        backends = sum(1 for r in roles if re.fullmatch(r"be\d+", r))
        rig = cls(RigSpec(prefix=prefix, backends=max(1, backends)))
        rig._namespaces = [rig.ns(r) for r in (SW, *rig.hosts) if r in roles]
        rig._owned = bool(rig._namespaces)
        return rig


class HeldConns:
    """A running `python -m lbxdp.echo hold` (see Rig.hold): its process and its files.

    The process is ours (a Popen not yet reaped, so its PID cannot name anyone else); on exit
    from the `with` block it is killed by that PID if it still runs, and its files are removed.
    """

    def __init__(self, popen: subprocess.Popen, files: dict[str, Path]) -> None:
        self.popen, self.files = popen, files
        self.stop_file, self.ready_file, self.out_file = files["stop"], files["ready"], files["out"]

    def __enter__(self) -> "HeldConns":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for f in self.files.values():
            f.unlink(missing_ok=True)

    def _failed(self, what: str) -> RigError:
        try:
            err = self.files["err"].read_text(errors="replace")
        except OSError:
            err = ""
        return RigError(f"hold client (pid {self.popen.pid}) {what}" + (f":\n{err[-2000:]}" if err else ""))

    def wait_ready(self, timeout: float = 30.0) -> dict:
        """Wait until every connection is open (or failed); returns {"open": n, "backends": {...}}."""
        def ready():
            if self.popen.poll() is not None:
                raise self._failed(f"exited with {self.popen.returncode} before it was ready")
            return json.loads(self.ready_file.read_text()) if self.ready_file.exists() else None
        return _poll("the hold client to open its connections", ready, timeout=timeout, interval=0.05)

    def stop(self, timeout: float = 30.0) -> dict:
        """Ask it to stop (the stop file), wait for it, return its JSON summary."""
        self.stop_file.touch()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RigError(f"hold client (pid {self.popen.pid}) did not stop within {timeout:.0f}s") from None
        if self.popen.returncode != 0:
            raise self._failed(f"exited with {self.popen.returncode}")
        return json.loads(self.out_file.read_text())

    def kill(self) -> None:
        """SIGKILL by PID, if it still runs, and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _terminate(srv: Server, timeout: float) -> None:
    """SIGTERM then SIGKILL one process, only while its PID still has the recorded start time."""
    def gone() -> bool:
        if srv.popen is not None:
            return srv.popen.poll() is not None  # reaps our own child
        return _start_time(srv.pid) != srv.start_time
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return
        if _start_time(srv.pid) == srv.start_time:
            os.kill(srv.pid, sig)
        with contextlib.suppress(RigError):
            _poll(f"pid {srv.pid} to exit", gone, timeout=timeout)
            return
    if not gone():
        raise RigError(f"pid {srv.pid} survived SIGKILL")


def inet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum (ICMPv4 here; IP/TCP/UDP headers in the benchmark)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
