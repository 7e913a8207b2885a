"""What a rig is made of, as plain values: the spec a user gives (RigSpec) and the Layout of its
shape (hosts, segments, addresses, routes, sysctls). No netlink here: lbxdp.lab.topology builds a
Layout, and the same Layout answers "which address does be2 have" for tests and configs.

Shapes (segments are Linux bridges in the namespace <prefix>-sw; every host is a namespace):

    l2      front: cli, lb, be1..N                 DSR by MAC rewrite (today's lbxdp)
    nat     front: cli, lb, be1..N                 one-armed NAT: backends route the client's
                                                   addresses via lb (DNAT replies cross lb)
    routed  front: cli, rt   core: rt, lb          backends in another subnet behind the router
            back: rt, be1..N                       (IPIP/GUE: lb sends to them through rt; SNAT:
                                                   replies come back to lb's own address via rt)
    multi   front: cli, rt   core: rt, lb1..K,     the client reaches K balancers through rt,
            be1..N                                 whose VIP route is ECMP over them (scale-out);
                                                   with bgp=True rt has no VIP route of its own:
                                                   it learns one per balancer by BGP from the
                                                   balancers' `lbxdp run` (lbxdp.lab.bgp, BIRD 2)

NAT (issue 12) is one-armed: lbxdp runs on ONE interface, lb's eth0, and sends both directions
back out of it with XDP_TX (client -> backend: DNAT; backend -> client: the reply translated
back). So the nat shape puts cli, lb and the backends on one segment, and each backend has host
routes (/32 and /128) to the client's addresses via lb: a backend's reply to the client (DNAT,
`snat = false`: the backend sees the client's address) goes to lb's MAC instead of straight to
the on-link client. lb also forwards in the kernel (a one-armed router for what XDP passes, so
the shape routes without lbxdp and nftables' DNAT works as a baseline: scripts/bench_e2e_nat.py),
with IPv4 redirects off; the backends accept no redirects (v4 or v6), because a redirect ("the
client is on-link, go direct") would take their replies past lb for good. Full NAT (`snat = true`)
needs none of those routes: the replies go to lb's own address, from anywhere routable. The
routed shape proves that: backends behind rt, whose replies come back to lb's address (on core)
via rt, and which lb reaches through rt's MAC (lbxdp.nexthop), as its tunnels do.

The veth rule (lbxdp.lab.stub): a frame sent with XDP_TX in native mode reaches the veth's peer
only if the peer runs an XDP program, so every interface lbxdp may transmit on needs the stub on
its bridge port. One-armed NAT transmits only on eth0: one stub port per balancer, as DSR. (Two-
armed NAT, XDP_REDIRECT between a front and a back interface, would need both peers stubbed; it
is out of scope for issue 12.) And the checksum rule (topology.disable_tx_checksum): every host
whose frames lbxdp rewrites sends full checksums; in nat and routed that includes the backends,
whose replies lbxdp translates back.

Numbering, the same on every segment a host is on: rt 1, cli 2, lb 3 (lbK: 2 + K), beI 10 + I.
Segment s (0-based, in the order above) is the s-th block after RigSpec.v4_net / v6_net:
10.111.s.0/24 and fd00:111:0:s::/64 by default. A host's interfaces are eth0, eth1, ... in
segment order; its port in sw is named after the role (role-1, role-2 for its second, third).
The VIPs (10.112.0.10, fd00:112::10) lie outside every segment; backends hold them on lo except
in nat, where lbxdp rewrites the destination to the backend's own address.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyroute2 import netns

SW, CLI, LB, RT = "sw", "cli", "lb", "rt"
HOST_IF = "eth0"        # the balancer's XDP interface (its first); every host has an eth0
_HOST_NUM = {RT: 1, CLI: 2, LB: 3}
MAX_BALANCERS = 7       # lb1..lb7 are hosts 3..9, below the backends' 11..


class RigError(RuntimeError):
    """The rig could not be built or removed; the message says which step and what was seen."""


class Shape(str, enum.Enum):
    L2 = "l2"
    NAT = "nat"
    ROUTED = "routed"
    MULTI = "multi"


def new_prefix() -> str:
    """'lbx' + 5 hex digits, not used by any existing namespace."""
    for _ in range(100):
        prefix = "lbx" + secrets.token_hex(3)[:5]
        if not any(n.startswith(prefix + "-") for n in netns.listnetns()):
            return prefix
    raise RigError("could not find an unused namespace prefix")


@dataclass(frozen=True)
class RigSpec:
    """What to build. Strings are accepted for addresses and the shape, and converted.

    balancers: 0 means the shape's own (1; 2 for multi). Only multi takes more than one.
    lb_neighbors: add permanent neighbour entries on every balancer for the backends and the
    router it shares a segment with, because an XDP program cannot trigger neighbour resolution
    (bpf_fib_lookup answers NO_NEIGH until the kernel happened to resolve the address), and the
    first packets of a test must not depend on that.
    """

    prefix: str = field(default_factory=new_prefix)
    backends: int = 3
    v4_net: IPv4Network = IPv4Network("10.111.0.0/24")
    v6_net: IPv6Network = IPv6Network("fd00:111::/64")
    vip4: IPv4Address = IPv4Address("10.112.0.10")
    vip6: IPv6Address = IPv6Address("fd00:112::10")
    port: int = 8080
    lb_neighbors: bool = True
    shape: Shape = Shape.L2
    balancers: int = 0
    bgp: bool = False       # multi only: rt learns the VIPs from the balancers by BGP (lbxdp.lab.bgp), no static route

    def __post_init__(self) -> None:
        for name, conv in (("v4_net", IPv4Network), ("v6_net", IPv6Network),
                           ("vip4", IPv4Address), ("vip6", IPv6Address), ("shape", Shape)):
            object.__setattr__(self, name, conv(getattr(self, name)))
        if not self.balancers:
            object.__setattr__(self, "balancers", 2 if self.shape is Shape.MULTI else 1)
        if not re.fullmatch(r"[a-z][a-z0-9]{1,11}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 2-12 chars, [a-z][a-z0-9]*")
        if not 1 <= self.backends <= 89:
            raise ValueError(f"backends={self.backends}: must be 1..89 (host numbers stay two digits)")
        if self.shape is Shape.MULTI and not 2 <= self.balancers <= MAX_BALANCERS:
            raise ValueError(f"balancers={self.balancers}: multi takes 2..{MAX_BALANCERS}")
        if self.bgp and self.shape is not Shape.MULTI:
            raise ValueError("bgp: only the multi shape has a router peering with several balancers")
        if self.shape is not Shape.MULTI and self.balancers != 1:
            raise ValueError(f"balancers={self.balancers}: only the multi shape has more than one")
        if self.v4_net.num_addresses < 256 or self.v6_net.prefixlen > 120:
            raise ValueError("segments must be at least a /24 and a /120")
        nets = [segment_nets(self, s) for s in range(3)]
        if any(self.vip4_net.overlaps(n4) or self.vip6_net.overlaps(n6) for n4, n6 in nets):
            raise ValueError("the VIP prefixes must lie outside the segments")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port}")

    @property
    def vip4_net(self) -> IPv4Network:
        """The prefix routed towards the balancer (the VIP's /24)."""
        return IPv4Network(f"{self.vip4}/24", strict=False)

    @property
    def vip6_net(self) -> IPv6Network:
        return IPv6Network(f"{self.vip6}/64", strict=False)

    def to_json(self) -> dict:
        return {k: (v if isinstance(v, (int, bool)) else str(v.value if isinstance(v, Shape) else v))
                for k, v in asdict(self).items()}


def segment_nets(spec: RigSpec, index: int) -> tuple[IPv4Network, IPv6Network]:
    """Segment `index`'s networks: the index-th blocks of v4_net's and v6_net's size after them."""
    n4, n6 = spec.v4_net, spec.v6_net
    return (IPv4Network((int(n4.network_address) + index * n4.num_addresses, n4.prefixlen)),
            IPv6Network((int(n6.network_address) + index * n6.num_addresses, n6.prefixlen)))


@dataclass(frozen=True)
class Segment:
    """One L2 segment: a bridge br<index> in sw, and the hosts with a port on it."""

    name: str
    index: int
    hosts: tuple[str, ...]
    v4: IPv4Network
    v6: IPv6Network

    @property
    def bridge(self) -> str:
        return f"br{self.index}"


@dataclass(frozen=True)
class Route:
    """On some host: dst (a network, or None for the default route) via these roles' addresses
    on the segment shared with them (several gateways: one ECMP route)."""

    dst4: IPv4Network | None
    dst6: IPv6Network | None
    via: tuple[str, ...]


# Base sysctls of every host. New namespaces copy IPv4 'all'/'default' from the host's
# (devconf_inherit_init_net = 0), so pin what the rig relies on instead of inheriting them.
_HOST_SYSCTLS = {
    # DAD would keep new IPv6 addresses 'tentative' (unusable) for a second or more.
    "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
    # No routers advertise here; router solicitations would only be noise in lb's counters.
    "net.ipv6.conf.default.router_solicitations": 0,
    "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0,
}
# The backends hold the VIP on lo: never answer ARP for it (arp_ignore=1: only for addresses on
# the receiving interface) nor use it as ARP source (arp_announce=2). The kernel takes the max
# of 'all' and the interface's value. (IPv6 needs nothing: neighbour solicitations are answered
# only for addresses on the receiving interface.)
_BACKEND_SYSCTLS = {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.default.arp_ignore": 1,
                    "net.ipv4.conf.all.arp_announce": 2, "net.ipv4.conf.default.arp_announce": 2}
_FORWARDING = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
# One-armed (the nat shape): lb forwards out of the interface a packet came in on, which makes
# the kernel send ICMP redirects ("the client is on-link"); a backend that took one would send its
# replies past lb. IPv4 sends none with these off (the kernel ORs 'all' and the interface's value);
# IPv6 has no switch for sending, so the backends refuse them (v4 and v6).
_ONE_ARMED_ROUTER = {**_FORWARDING, "net.ipv4.conf.all.send_redirects": 0,
                     "net.ipv4.conf.default.send_redirects": 0}
_NO_REDIRECTS = {"net.ipv4.conf.all.accept_redirects": 0, "net.ipv4.conf.default.accept_redirects": 0,
                 "net.ipv6.conf.all.accept_redirects": 0, "net.ipv6.conf.default.accept_redirects": 0}
# A router in front of several next hops: a route whose link is down is not used (a dead
# balancer's link drops out of the ECMP set at once), and ECMP hashes on the L4 5-tuple (policy 1)
# so the flows of one client spread over the balancers instead of all taking one path.
_ROUTER_SYSCTLS = {**_FORWARDING,
                   "net.ipv4.conf.all.ignore_routes_with_linkdown": 1,
                   "net.ipv4.conf.default.ignore_routes_with_linkdown": 1,
                   "net.ipv6.conf.all.ignore_routes_with_linkdown": 1,
                   "net.ipv6.conf.default.ignore_routes_with_linkdown": 1}
_ECMP_SYSCTLS = {"net.ipv4.fib_multipath_hash_policy": 1, "net.ipv6.fib_multipath_hash_policy": 1}


class Layout:
    """The hosts, segments, addresses, routes and sysctls of one RigSpec's shape."""

    def __init__(self, spec: RigSpec) -> None:
        self.spec = spec
        self.backends = [f"be{i}" for i in range(1, spec.backends + 1)]
        self.balancers = [LB] if spec.shape is not Shape.MULTI else [f"lb{i}" for i in range(1, spec.balancers + 1)]
        self.routers = [RT] if spec.shape in (Shape.ROUTED, Shape.MULTI) else []
        self.segments = [Segment(name, i, tuple(hosts), *segment_nets(spec, i))
                         for i, (name, hosts) in enumerate(self._segment_hosts())]
        self.hosts = [CLI, *self.routers, *self.balancers, *self.backends]

    def _segment_hosts(self) -> list[tuple[str, list[str]]]:
        s, lbs, bes = self.spec.shape, self.balancers, self.backends
        if s is Shape.L2:
            return [("front", [CLI, *lbs, *bes])]
        if s is Shape.NAT:
            return [("front", [CLI, *lbs, *bes])]
        if s is Shape.ROUTED:
            return [("front", [CLI, RT]), ("core", [RT, *lbs]), ("back", [RT, *bes])]
        return [("front", [CLI, RT]), ("core", [RT, *lbs, *bes])]

    # -- names and numbers -------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """Full namespace name of a role ('sw', 'cli', 'lb', 'be1', ...)."""
        if role != SW and role not in self.hosts:
            raise KeyError(f"no role {role!r} in this rig (roles: sw, {', '.join(self.hosts)})")
        return f"{self.spec.prefix}-{role}"

    def host_num(self, role: str) -> int:
        if role in _HOST_NUM and (role in self.hosts):
            return _HOST_NUM[role]
        if role in self.backends:
            return 10 + int(role[2:])
        if role in self.balancers:
            return 2 + int(role[2:])
        raise KeyError(f"{role!r} is not a host of this rig")

    def segments_of(self, role: str) -> list[Segment]:
        return [s for s in self.segments if role in s.hosts]

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    def _seg(self, role: str, segment: str | None) -> Segment:
        segs = self.segments_of(role)
        if not segs:
            raise KeyError(f"{role!r} is not a host of this rig")
        if segment is None:
            return segs[0]
        for s in segs:
            if s.name == segment:
                return s
        raise KeyError(f"{role} has no interface on segment {segment!r}")

    def ifname(self, role: str, segment: str | None = None) -> str:
        """The host's interface on a segment (default: its first): eth0, eth1, ..."""
        return f"eth{self.segments_of(role).index(self._seg(role, segment))}"

    def peer(self, role: str, segment: str | None = None) -> str:
        """Name, in sw, of the bridge port that is the peer of role's interface on `segment`."""
        k = self.segments_of(role).index(self._seg(role, segment))
        return role if k == 0 else f"{role}-{k}"

    def addr4(self, role: str, segment: str | None = None) -> IPv4Address:
        """IPv4 address of a host's interface on a segment (default: its first)."""
        return self._seg(role, segment).v4[self.host_num(role)]

    def addr6(self, role: str, segment: str | None = None) -> IPv6Address:
        """IPv6 address; the host number is written in hex digits that read like the decimal one
        (be1: 10.111.0.11 and fd00:111::11)."""
        return self._seg(role, segment).v6[int(str(self.host_num(role)), 16)]

    def mac(self, role: str, segment: str | None = None) -> str:
        """The MAC the rig assigns: 02:6c:62 ("lb"), 00, the segment index, the host number."""
        return f"02:6c:62:00:{self._seg(role, segment).index:02d}:{self.host_num(role):02d}"

    def shared_segment(self, a: str, b: str) -> Segment:
        """The first segment both hosts are on (the one a route from a to b goes through)."""
        for s in self.segments_of(a):
            if b in s.hosts:
                return s
        raise KeyError(f"{a} and {b} share no segment")

    # -- what each host gets -----------------------------------------------------------------

    def holds_vips(self, role: str) -> bool:
        """The backends hold the VIPs on lo (DSR and tunnels deliver to the VIP), except in nat."""
        return role in self.backends and self.spec.shape is not Shape.NAT

    def routes(self, role: str) -> list[Route]:
        s = self.spec
        vips = Route(s.vip4_net, s.vip6_net, tuple(self.balancers))
        if s.shape is Shape.L2:
            return [vips] if role == CLI else []
        if s.shape is Shape.NAT:
            # The client's own addresses, more specific than the on-link segment: replies via lb.
            cli = Route(IPv4Network(self.addr4(CLI)), IPv6Network(self.addr6(CLI)), (LB,))
            return {CLI: [vips], **{b: [cli] for b in self.backends}}.get(role, [])
        if role in self.routers:
            return [] if s.bgp else [vips]   # bgp: the balancers announce the VIPs (lbxdp.lab.bgp)
        return [Route(None, None, (RT,))]

    def sysctls(self, role: str) -> dict[str, int]:
        values = dict(_HOST_SYSCTLS)
        if role in self.backends:
            values |= _BACKEND_SYSCTLS
            if self.spec.shape is Shape.NAT:
                values |= _NO_REDIRECTS
        if role in self.routers:
            values |= _ROUTER_SYSCTLS
            if self.spec.shape is Shape.MULTI:
                values |= _ECMP_SYSCTLS
        if role in self.balancers and self.spec.shape is Shape.NAT:
            values |= _ONE_ARMED_ROUTER
        return values

    def interface_sysctls(self, role: str) -> dict[str, int]:
        """Per-interface values, written once the interfaces exist (they inherit 'default' too;
        writing them names them in what a test reads back)."""
        nat = self.spec.shape is Shape.NAT
        out = {}
        for seg in self.segments_of(role):
            i = self.ifname(role, seg.name)
            if role in self.backends:
                out |= {f"net.ipv4.conf.{i}.arp_ignore": 1, f"net.ipv4.conf.{i}.arp_announce": 2,
                        f"net.ipv4.conf.{i}.rp_filter": 0}
                if nat:
                    out |= {f"net.ipv4.conf.{i}.accept_redirects": 0, f"net.ipv6.conf.{i}.accept_redirects": 0}
            elif role in self.balancers and nat:
                out |= {f"net.ipv4.conf.{i}.send_redirects": 0}
        return out

    def tx_checksum_off(self) -> list[str]:
        """Hosts whose frames lbxdp's XDP program forwards (see topology.disable_tx_checksum):
        the client, and in nat and routed the backends too (their NAT replies come back through
        lb: DNAT via the nat shape's host routes, SNAT to lb's address via rt)."""
        return [CLI, *(self.backends if self.spec.shape in (Shape.NAT, Shape.ROUTED) else [])]

    def neighbors(self, balancer: str) -> list[tuple[str, str]]:
        """(host, segment) pairs a balancer gets permanent neighbour entries for: the backends
        and the router it shares a segment with."""
        return [(h, seg.name) for seg in self.segments_of(balancer) for h in seg.hosts
                if h in self.backends or h in self.routers]
