"""What the user asked for, as frozen values parsed once at the edge (config file, CLI).

Nothing here knows about maps or the kernel; lbxdp.maps converts these to map structs.
A model validates itself (Config.problems()): every rule that involves more than one value's
syntax lives here, so a config file (lbxdp.config), an edit (lbxdp.edits) and a model built in
code get the same error text, with the same key path (`vip[0].backend[1].address`).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from . import abi, ring
from .health import CheckType, HealthCheck

__all__ = ["CheckType", "HealthCheck"]   # re-exported: the health check is part of the model

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(str, enum.Enum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        return {"tcp": 6, "udp": 17}[self.value]

    @classmethod
    def parse(cls, text: object) -> "Protocol":
        """'tcp' or 'udp'; anything else: ValueError naming it (config files and VIP arguments)."""
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a protocol; use tcp or udp") from None


class Scheduler(str, enum.Enum):
    MAGLEV = "maglev"  # consistent hashing (the default)
    RR = "rr"          # weighted round robin
    HASH = "hash"      # 5-tuple hash over the weighted sequence (not consistent)
    SOURCE = "source"  # hash of the client address (source_prefix bits) over a Maglev table (issue 13)
    LEASTCONN = "leastconn"  # weighted least connections: the flow's Maglev slot or a peer of it, the lower open/weight (issue 13)

    @property
    def abi(self) -> abi.Sched:
        return abi.Sched[self.name]

    @property
    def maglev(self) -> bool:
        """Whether its table is a Maglev table (table_size applies)."""
        return self in (Scheduler.MAGLEV, Scheduler.SOURCE, Scheduler.LEASTCONN)


class Mode(str, enum.Enum):
    DSR = "dsr"    # L2 direct server return: backends on the balancer's segment
    IPIP = "ipip"  # L3 DSR: IPIP / IP6IP6 / 4-in-6 by the backend's family
    GUE = "gue"    # L3 DSR: GUE variant 1 over UDP
    NAT = "nat"    # NAT: destination (and with snat = true source) translated, replies back through us

    @property
    def encap(self) -> bool:
        return self in (Mode.IPIP, Mode.GUE)

    @property
    def routed(self) -> bool:
        """Its backends may be anywhere routable: next hop = the route's gateway (lbxdp.nexthop)."""
        return self.encap or self is Mode.NAT

    @property
    def abi(self) -> abi.FwdMode:
        return abi.FwdMode[self.name]


class EncapSource(enum.StrEnum):
    """ipip_source: the outer source address of an IPIP VIP."""
    BALANCER = "balancer"  # the balancer's own address ([balancer] ipv4_source / ipv6_source)
    FLOW = "flow"          # an address of [balancer] flow_source_v4/v6 derived from the flow hash


class OnBackendDown(enum.StrEnum):
    KEEP = "keep"        # established flows stay on a failed backend
    MIGRATE = "migrate"  # they lose their connection-table entries and move on


class OnAllDown(enum.StrEnum):
    DROP = "drop"        # no usable backend: drop in XDP
    PASS = "pass"        # ... or pass to the kernel


class HealthOverride(enum.StrEnum):
    """`lbxdp backend set-health`: force a backend up or down, or hand it back to its check."""
    UP = "up"
    DOWN = "down"
    AUTO = "auto"


class XdpMode(enum.StrEnum):
    """How the program is attached (a StrEnum: lbxdp.loader compares and formats it as its string)."""
    AUTO = "auto"        # native, falling back to generic with a warning
    NATIVE = "native"
    GENERIC = "generic"


def family(addr: IPAddress) -> int:
    return abi.FAMILY_V4 if addr.version == 4 else abi.FAMILY_V6


DEFAULT_GUE_PORT = 6080   # Katran's
MIN_ENCAP_MTU = 1280      # every oversize packet is then longer than an ICMP error quotes (bpf/abi.h)
MAX_MTU = 65535
DEFAULT_TABLE_SIZE = 65537  # Maglev's M: prime, > 100 x backends keeps shares within 1%
MAX_WEIGHT = 1000
MAX_SLOW_START = 3600.0
# Every (VIP, backend) pair takes one backend entry; entry 0 is never used (balancer.apply).
MAX_BACKEND_ENTRIES = abi.MAX_BACKENDS - 1


def endpoint(addr: IPAddress, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'; port 0 (any port) shows as '*'."""
    p = port or "*"
    return f"{addr}:{p}" if addr.version == 4 else f"[{addr}]:{p}"


_LISTEN = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[0-9A-Fa-f:.]*)):(?P<port>[0-9]{1,5})")


def parse_listen(text: object) -> tuple[str, int]:
    """Where to serve /metrics: '127.0.0.1:9842', '[::1]:9842' or ':9842' (all addresses) ->
    (address, port). The one parser of [metrics] listen, --metrics and the exporter's --listen,
    so what a config check accepts the daemon can bind. ValueError says what is wrong."""
    m = _LISTEN.fullmatch(text) if isinstance(text, str) else None
    bad = ValueError("is not ADDRESS:PORT, e.g. \"127.0.0.1:9842\", \"[::1]:9842\" or \":9842\" (all addresses)")
    if not m:
        raise bad
    host = m["v6"] if m["v6"] is not None else m["host"]
    if not 1 <= int(m["port"]) <= 65535:
        raise ValueError("has a port out of range (1-65535)")
    if host == "":
        return "0.0.0.0", int(m["port"])
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise bad from None
    if m["v6"] is not None and addr.version != 6:
        raise bad
    return str(addr), int(m["port"])


_ENDPOINT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:/\[\]]+)):(?P<port>\d+|\*)")


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """'10.0.0.1:80', '[fd00::1]:80' or '10.0.0.1:*' (any port) -> (address, port): the inverse
    of endpoint(); ValueError if it is not one."""
    m = _ENDPOINT.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not ADDRESS:PORT")
    addr = ipaddress.ip_address(m["v6"] or m["v4"])
    port = 0 if m["port"] == "*" else int(m["port"])
    if (m["v6"] is not None) != (addr.version == 6) or not 0 <= port <= 65535:
        raise ValueError(f"{text!r} is not ADDRESS:PORT")
    return addr, port


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    port: int               # 0 on an any-port VIP: the packet keeps its port
    mac: str | None = None  # None: resolved from the kernel's neighbour table at apply time
    weight: int = 1         # share of new flows, relative to the VIP's other backends; 0 = none
    backup: bool = False    # gets new flows only while no primary is usable
    health: HealthCheck | None = None   # its own check (the VIP's merged with its overrides)
    max_conns: int = 0      # open connections past which it gets no new flow (issue 13); 0 = no cap
    server_id: int = 0      # quic VIPs: the id its connection IDs carry (1-65535, bpf/quic.h); 0 = none

    @property
    def name(self) -> str:
        return endpoint(self.address, self.port)


@dataclass(frozen=True)
class VipKey:
    address: IPAddress
    port: int
    protocol: Protocol

    @property
    def name(self) -> str:
        """The label used everywhere (status, metrics): '10.0.0.1:80/tcp'."""
        return f"{endpoint(self.address, self.port)}/{self.protocol.value}"

    @classmethod
    def parse(cls, text: str) -> "VipKey":
        """'10.0.0.1:80/tcp' -> VipKey (the inverse of .name); ValueError says what is wrong."""
        ep, slash, proto = text.rpartition("/")
        if not slash:
            raise ValueError("has no protocol")
        protocol = Protocol.parse(proto)
        return cls(*parse_endpoint(ep), protocol)


class BackendId(NamedTuple):
    """One backend of one VIP: the identity of everything kept per backend entry (drains, slow
    starts, health, overrides, checker targets, metric labels). `.key` is its string form in
    runtime.json, checks.json and logs: '10.0.0.1:80/tcp|10.0.1.1:80'. A NamedTuple, so it
    is immutable, hashable, and equal to the (vip, address, port) tuple it replaces."""
    vip: VipKey
    address: IPAddress
    port: int

    @property
    def name(self) -> str:
        """The backend as status and the metrics show it: '10.0.1.1:80'."""
        return endpoint(self.address, self.port)

    @property
    def key(self) -> str:
        return f"{self.vip.name}|{self.name}"

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, key: str) -> "BackendId":
        """The inverse of .key; ValueError if key is not one."""
        vip, bar, be = key.partition("|")
        if not bar:
            raise ValueError(f"{key!r} is not VIP|BACKEND")
        return cls(VipKey.parse(vip), *parse_endpoint(be))


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_NEW_FLOW_RATE = 10_000_000   # flows per second per source: above this the limit limits nothing
MAX_NEW_FLOW_BURST = 10_000_000


class AclList(enum.StrEnum):
    """Which list of an Admission a rule is on."""
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class NewFlowLimit:
    """new_flow_limit = { rate = 100, burst = 200 }: per source (an IPv6 source's /64) and per CPU
    (bpf/limit.h), new flows per second and how many a fresh source may start at once."""
    rate: int
    burst: int

    @property
    def interval_ns(self) -> int:
        return max(1, 1_000_000_000 // self.rate)


@dataclass(frozen=True)
class Admission:
    """Who may start flows, for a VIP or (in [balancer]) every VIP: bpf/acl.h and bpf/limit.h.
    allow: when not empty, only these sources (either family) start flows; deny: these never do.
    The longest matching prefix decides; the same prefix in both is a problem."""
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    new_flow_limit: NewFlowLimit | None = None

    @property
    def rules(self) -> int:
        return len(self.allow) + len(self.deny)

    def verdict(self, src: IPAddress) -> abi.AclAction:
        """What bpf/acl.h answers for a new flow from src: the longest matching rule's action, or
        NOT_ALLOWED when nothing matches and there is an allow list, else ALLOW."""
        best: tuple[int, abi.AclAction] | None = None
        for nets, action in ((self.allow, abi.AclAction.ALLOW), (self.deny, abi.AclAction.DENY)):
            for n in nets:
                if n.version == src.version and src in n and (best is None or n.prefixlen > best[0]):
                    best = (n.prefixlen, action)
        if best is not None:
            return best[1]
        return abi.AclAction.NOT_ALLOWED if self.allow else abi.AclAction.ALLOW


@dataclass(frozen=True)
class PassiveHealth:
    """[vip.passive_health] of a NAT VIP (issue 12): what the data path sees of handshakes
    (bpf/nat.h counts them per backend in lbx_nat_be) marks a backend suspected after `failures`
    consecutive failed handshakes (an RST answering a SYN, a SYN retransmitted or unanswered for
    `timeout` seconds); at most `max_ejected` of the VIP's backends are down for it at once.
    On a dsr/ipip/gue TCP VIP (issue 13) only the client's side is seen (bpf/select.h): a SYN
    retransmitted while half-open is a failure, the handshake's ACK a success, and once the first
    handshake since the last ACK is `timeout` old (default there DSR_PASSIVE_TIMEOUT) every one
    since counts as failed (lbxdp.passive.unfinished). Either way the confirming check's connect
    timeout is at most `timeout`."""
    failures: int = 10
    timeout: float = 2.0
    max_ejected: float = 0.5


DSR_PASSIVE_TIMEOUT = 0.5   # [vip.passive_health] timeout's default on dsr/ipip/gue VIPs (config.py): a
                            # handshake's final ACK comes one client RTT after its SYN


@dataclass(frozen=True)
class NatTimeouts:
    """[balancer] nat_timeouts, seconds per connection state (bpf/abi.h enum lbx_nat_state).
    For comparison: nftables/nf_conntrack syn_sent 120, established 432000, close/time_wait 120,
    udp 30 (120 once replied); IPVS tcp 900, tcpfin 120, udp 300."""
    tcp_syn: int = 10
    tcp_established: int = 600
    tcp_close: int = 10
    udp: int = 30


DEFAULT_SNAT_PORTS = (20000, 32767)   # below Linux's ip_local_port_range (32768-60999): the
                                      # balancer's own connections (health checks) never share a port
MAX_NAT_TIMEOUT = 30 * 86400          # seconds; u32 of ~1 ms units (bpf/abi.h LBX_NAT_TIME_SHIFT)


@dataclass(frozen=True)
class Vip:
    address: IPAddress
    port: int
    protocol: Protocol
    mode: Mode = Mode.DSR
    scheduler: Scheduler = Scheduler.MAGLEV
    backends: tuple[Backend, ...] = field(default_factory=tuple)
    table_size: int = DEFAULT_TABLE_SIZE  # Maglev only: slots of the lookup table (prime)
    slow_start: float = 0.0               # seconds over which a new backend's weight ramps up
    health: HealthCheck | None = None     # how its backends are checked (None: not checked)
    on_backend_down: OnBackendDown = OnBackendDown.KEEP   # keep: established flows stay; migrate: they move on
    on_all_down: OnAllDown = OnAllDown.DROP               # no usable backend: drop or pass (to the kernel)
    gue_port: int = DEFAULT_GUE_PORT                      # gue: the UDP destination port at the backends
    ipip_source: EncapSource = EncapSource.BALANCER       # ipip: outer source, ours or flow-derived
    mtu: int | None = None                                # ipip, gue: path MTU to the backends (None: [balancer] mtu, else the interface's)
    mss_clamp: bool = False                               # ipip, gue: clamp SYNs' MSS to what the tunnel carries
    admission: Admission = Admission()                    # allow, deny, new_flow_limit of this VIP
    snat: bool = False                                    # nat: also translate the source to [balancer] snat_v4/v6
    passive_health: PassiveHealth | None = None           # nat: [vip.passive_health] (None: off)
    source_prefix: int | None = None                      # source: client address bits hashed (None: all)
    quic: bool = False                                    # udp: route QUIC packets by the server id in their DCID
    announce: bool | None = None                          # [bgp]: announce its address (None: [bgp] announce)

    @property
    def src_prefix(self) -> int:
        """vip_meta.src_prefix: source_prefix, else the whole address."""
        if self.source_prefix is not None:
            return self.source_prefix
        return 32 if getattr(self.address, "version", 4) == 4 else 128

    @property
    def counted(self) -> bool:
        """Whether its backends' open connections are counted (leastconn or some max_conns)."""
        return self.scheduler is Scheduler.LEASTCONN or any(b.max_conns for b in self.backends)

    def __post_init__(self) -> None:
        # A model built in code may spell a closed set as its string ("pass"): hold the enum. A
        # string that is none of them stays as it is, for problems() to name.
        for name, enum_t in _ENUM_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, enum_t):
                try:
                    object.__setattr__(self, name, enum_t(v))
                except ValueError:
                    pass

    def check_of(self, b: Backend) -> HealthCheck | None:
        return b.health or self.health

    def id_of(self, b: Backend) -> BackendId:
        return BackendId(self.key, b.address, b.port)

    @property
    def key(self) -> VipKey:
        return VipKey(self.address, self.port, self.protocol)

    @property
    def name(self) -> str:
        return self.key.name


_ENUM_FIELDS = (("protocol", Protocol), ("mode", Mode), ("scheduler", Scheduler),
                ("on_backend_down", OnBackendDown), ("on_all_down", OnAllDown), ("ipip_source", EncapSource))


def encap_overhead(mode: Mode, backend: IPAddress) -> int:
    """Bytes the outer headers add (bpf/encap.h): an IP header of the backend's family, plus UDP for gue."""
    return (20 if backend.version == 4 else 40) + (8 if mode is Mode.GUE else 0)


@dataclass(frozen=True)
class BalancerOptions:
    """[balancer]: per-instance settings of the encap modes."""
    ipv4_source: ipaddress.IPv4Address | None = None   # outer source (None: the interface's primary address)
    ipv6_source: ipaddress.IPv6Address | None = None
    flow_source_v4: ipaddress.IPv4Network | None = None  # ipip_source = "flow": the prefix sources come from
    flow_source_v6: ipaddress.IPv6Network | None = None
    mtu: int | None = None                              # path MTU to the backends (None: the interface's)
    flood_threshold: int | None = None                  # connection-table records (and pure SYNs) per second per
                                                        # CPU past which bare ACKs are not recorded and SYNs skip
                                                        # the table (None: abi.FLOOD_THRESHOLD)
    admission: Admission = Admission()                  # allow, deny, new_flow_limit of every VIP
    snat_v4: ipaddress.IPv4Address | None = None        # SNAT source (None: the interface's first IPv4)
    snat_v6: ipaddress.IPv6Address | None = None
    snat_ports: tuple[int, int] | None = None           # SNAT port pool, inclusive (None: DEFAULT_SNAT_PORTS)
    nat_timeouts: NatTimeouts = NatTimeouts()

    @property
    def snat_pool(self) -> tuple[int, int]:
        return self.snat_ports or DEFAULT_SNAT_PORTS


MAX_ASN = 2**32 - 1


@dataclass(frozen=True)
class BgpNeighbor:
    """[[bgp.neighbor]]: one directly connected BGP peer (the upstream router). Its family
    decides which VIPs its session carries (an IPv4 neighbour the IPv4 /32s, an IPv6 one the
    /128s); bfd: a BFD session towards it, so that a dead link or node is noticed in well under
    a second instead of after the hold time."""
    address: IPAddress
    asn: int                 # `as` in the file
    bfd: bool = True


@dataclass(frozen=True)
class BgpOptions:
    """[bgp] (issue 14): `lbxdp run` announces each usable VIP's address (/32, /128) to the
    neighbours through BIRD 2 (lbxdp.bgp). The same file fits every node: router_id and the
    sources default to what BIRD picks on the node (its lowest IPv4 address; the address of the
    route to each neighbour), and the announced next hop is the session's own source."""
    local_as: int
    neighbors: tuple[BgpNeighbor, ...] = ()
    router_id: ipaddress.IPv4Address | None = None
    source_v4: ipaddress.IPv4Address | None = None   # local address of IPv4 sessions = their next hop
    source_v6: ipaddress.IPv6Address | None = None
    announce: bool = True            # the default of every VIP's `announce`
    hold_time: int = 9               # seconds (keepalive: a third); 3-65535
    withdraw_grace: float = 2.0      # seconds between the withdrawal and the detach when the daemon stops
    bfd_interval: int = 100          # milliseconds between BFD packets (tx and rx); detection: x bfd_multiplier
    bfd_multiplier: int = 3


def _bgp_problems(b: BgpOptions, vips: tuple[Vip, ...]) -> list[Problem]:
    out = _fields("bgp", [
        ("local_as", _int(b.local_as, 1, MAX_ASN)),
        ("hold_time", _int(b.hold_time, 3, 65535, " seconds")),
        ("withdraw_grace", None if not isinstance(b.withdraw_grace, bool) and isinstance(b.withdraw_grace, (int, float))
         and 0 <= b.withdraw_grace <= 60 else f"{show(b.withdraw_grace)} is not a number of seconds (0-60)"),
        ("bfd_interval", _int(b.bfd_interval, 10, 10000, " milliseconds")),
        ("bfd_multiplier", _int(b.bfd_multiplier, 2, 255)),
        ("announce", None if isinstance(b.announce, bool) else f"{show(b.announce)} is not true or false"),
    ])
    for key, want in (("router_id", 4), ("source_v4", 4), ("source_v6", 6)):
        v = getattr(b, key)
        if v is None:
            continue
        if getattr(v, "version", None) != want:
            out.append(Problem(f"bgp.{key}", f"{show(str(v))} is not an IPv{want} address"))
        elif key != "router_id" and (bad := _address(v, "BGP source")) is not None:
            out.append(Problem(f"bgp.{key}", bad))
    if not b.neighbors:
        out.append(Problem("bgp.neighbor", "[bgp] needs at least one neighbour ([[bgp.neighbor]] address, as)"))
    seen: dict[object, int] = {}
    for j, n in enumerate(b.neighbors):
        path = f"bgp.neighbor[{j}]"
        out += _fields(path, [("address", _address(n.address, "neighbour")), ("as", _int(n.asn, 1, MAX_ASN)),
                              ("bfd", None if isinstance(n.bfd, bool) else f"{show(n.bfd)} is not true or false")])
        if n.address in seen:
            out.append(Problem(f"{path}.address", f"{n.address} is also neighbor[{seen[n.address]}]"))
        seen.setdefault(n.address, j)
    fams = {getattr(n.address, "version", 0) for n in b.neighbors}
    for i, v in enumerate(vips):
        if v.announce is not False and getattr(v.address, "version", 0) not in fams and b.neighbors \
                and (v.announce or b.announce):
            out.append(Problem(f"vip[{i}].announce", f"{v.address} is IPv{v.address.version} but no [[bgp.neighbor]] "
                               f"is: add one, or set announce = false on this VIP"))
            break
    return out


@dataclass(frozen=True)
class Problem:
    """What is wrong (or, as a warning, probably not meant) and where: 'vip[0].backend[1].port'."""
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Config:
    vips: tuple[Vip, ...] = ()
    metrics_listen: str | None = None  # [metrics] listen: where `lbxdp run` serves /metrics
    balancer: BalancerOptions = BalancerOptions()   # [balancer]
    bgp: BgpOptions | None = None                   # [bgp] (None: no announcements)

    def backends(self) -> dict[BackendId, tuple[Vip, Backend]]:
        """Every backend of every VIP by its identity, in config order."""
        return {v.id_of(b): (v, b) for v in self.vips for b in v.backends}

    def problems(self) -> list[Problem]:
        """Everything that makes this config unusable, in config order ([] if it is valid)."""
        out: list[Problem] = []
        if self.metrics_listen is not None:
            try:
                parse_listen(self.metrics_listen)
            except ValueError as e:
                out.append(Problem("metrics.listen", f"{show(self.metrics_listen)} {e}"))
        out += _balancer_problems(self.balancer)
        out += _admission_problems(self.balancer.admission, "balancer", None)
        udp_ports = {v.port: i for i, v in enumerate(self.vips) if v.protocol is Protocol.UDP}
        seen: dict[VipKey, str] = {}
        for i, v in enumerate(self.vips):
            out += _vip_problems(v, f"vip[{i}]")
            out += _encap_problems(v, f"vip[{i}]", self.balancer, udp_ports)
            out += _admission_problems(v.admission, f"vip[{i}]", v.address.version)
            out += _nat_problems(v, f"vip[{i}]")
            if v.key in seen:
                out.append(Problem(f"vip[{i}]", f"duplicate VIP {v.name} (also {seen[v.key]})"))
            seen.setdefault(v.key, f"vip[{i}]")
        rules = self.balancer.admission.rules + sum(v.admission.rules for v in self.vips)
        if rules > ACL_RULES_MAX:
            out.append(Problem("vip", f"{rules} allow/deny rules in all; at most {ACL_RULES_MAX}"))
        if self.bgp is not None:
            out += _bgp_problems(self.bgp, self.vips)
        for i, v in enumerate(self.vips):
            if v.announce is not None and not isinstance(v.announce, bool):
                out.append(Problem(f"vip[{i}].announce", f"{show(v.announce)} is not true or false"))
            elif v.announce is not None and self.bgp is None:
                out.append(Problem(f"vip[{i}].announce", "applies only with a [bgp] section (nothing announces)"))
        if len(self.vips) > abi.MAX_VIPS:
            out.append(Problem("vip", f"{len(self.vips)} VIPs; at most {abi.MAX_VIPS}"))
        total = sum(len(v.backends) for v in self.vips)
        if total > MAX_BACKEND_ENTRIES:
            out.append(Problem("vip", f"{total} backends in all (counting each VIP's); the maps hold at most "
                               f"{MAX_BACKEND_ENTRIES}"))
        return out

    def warnings(self) -> list[Problem]:
        """What is valid but probably not meant (nothing is refused for it)."""
        out = []
        for i, v in enumerate(self.vips):
            if v.backends and all(b.backup for b in v.backends):
                out.append(Problem(f"vip[{i}].backend", f"every backend of {v.name} is a backup: backups take "
                                   "new flows only while no primary is usable, so they all take them; set "
                                   "backup = false on some"))
        return out

    def describe(self, path: str) -> str:
        """A key path in the user's terms, for errors of edits (which have no file):
        'vip[0].backend[1].weight' -> 'VIP 10.0.0.1:80/tcp backend 10.0.1.1:80 weight'."""
        m = re.fullmatch(r"vip\[(\d+)\](?:\.backend\[(\d+)\])?(?:\.(.+))?", path)
        if not m or int(m[1]) >= len(self.vips):
            return path
        v = self.vips[int(m[1])]
        out = f"VIP {v.name}"
        if m[2] is not None and int(m[2]) < len(v.backends):
            out += f" backend {v.backends[int(m[2])].name}"
        elif m[2] is not None:
            out += f" backend[{m[2]}]"
        return f"{out} {m[3]}" if m[3] else out


# --- the rules -------------------------------------------------------------------------------------
# Each returns the message of what is wrong with one value (None: nothing), the value shown first
# as config files show it: "vip[0].port: 70000 is out of range (0-65535; 0 = any port)".

def show(v: object) -> str:
    """A bad value as an error shows it: its repr, cut short if long."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _int(v: object, lo: int, hi: int, what: str = "") -> str | None:
    if not isinstance(v, int) or isinstance(v, bool):
        return f"{show(v)} is not an integer"
    return None if lo <= v <= hi else f"{show(v)} is out of range ({lo}-{hi}{what})"


def _one_of(v: object, enum_t: type[enum.Enum]) -> str | None:
    return None if isinstance(v, enum_t) else f"{show(v)} is not one of: {', '.join(e.value for e in enum_t)}"


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def is_unicast(a: IPAddress) -> bool:
    """An address a packet on the wire can be for: not multicast, broadcast, 0.0.0.0/8 ("this
    network", never a destination), :: or loopback (the kernel drops loopback sources and
    destinations arriving on a NIC as martians)."""
    broadcast = a == ipaddress.IPv4Address("255.255.255.255")
    this_net = a.version == 4 and a in _THIS_NETWORK
    return not (a.is_multicast or a.is_unspecified or a.is_loopback or broadcast or this_net)


def _address(a: object, what: str) -> str | None:
    if not isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return f"{show(a)} is not an IPv4 or IPv6 address"
    if a.version == 6 and a.ipv4_mapped is not None:
        return f"{str(a)!r} is an IPv4-mapped IPv6 address; write the IPv4 address {a.ipv4_mapped}"
    if not is_unicast(a):
        return f"{str(a)!r} cannot be a {what} (multicast, broadcast, unspecified, 0.0.0.0/8 or loopback)"
    return None


MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")   # fullmatch: no trailing newline slips through


def _mac(v: object) -> str | None:
    if not isinstance(v, str) or not MAC.fullmatch(v.lower()):
        return f"{show(v)} is not a MAC address like 02:00:00:00:00:01"
    if v.lower() == "00:00:00:00:00:00" or int(v.split(":")[0], 16) & 1:
        return f"{show(v)} is not a unicast MAC address"
    return None


def _table_size(v: object) -> str | None:
    bad = _int(v, 2, abi.TABLE_MAX)
    if bad is None and not ring.is_prime(v):  # type: ignore[arg-type]
        bad = f"{v} is not prime (Maglev needs a prime table size, e.g. 65537, 16381, 4099, 1021)"
    return bad


def _slow_start(v: object) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{show(v)} is not a number of seconds"
    return None if 0 <= v <= MAX_SLOW_START else f"{show(v)} is out of range (0-{MAX_SLOW_START:.0f} seconds)"


def _check(h: HealthCheck | None, path: str) -> list[Problem]:
    if h is not None and h.timeout > h.interval:
        return [Problem(f"{path}.timeout", f"{h.timeout:g} is longer than the interval {h.interval:g}: "
                        "checks of one backend would overlap")]
    return []


def _fields(path: str, checks: list[tuple[str, str | None]]) -> list[Problem]:
    return [Problem(f"{path}.{key}", bad) for key, bad in checks if bad is not None]


def _vip_problems(v: Vip, path: str) -> list[Problem]:
    out = _fields(path, [
        ("address", _address(v.address, "VIP")),
        ("port", _int(v.port, 0, 65535, "; 0 = any port")),
        ("protocol", _one_of(v.protocol, Protocol)),
        ("mode", _one_of(v.mode, Mode)),
        ("scheduler", _one_of(v.scheduler, Scheduler)),
        ("table_size", _table_size(v.table_size) if isinstance(v.scheduler, Scheduler) and v.scheduler.maglev else None),
        ("slow_start", _slow_start(v.slow_start)),
        ("on_backend_down", _one_of(v.on_backend_down, OnBackendDown)),
        ("on_all_down", _one_of(v.on_all_down, OnAllDown)),
    ])
    out += _check(v.health, f"{path}.health")
    if not v.backends:
        out.append(Problem(f"{path}.backend", "a VIP needs at least one backend ([[vip.backend]])"))
    if len(v.backends) > abi.VIP_BACKENDS_MAX:
        out.append(Problem(f"{path}.backend", f"{len(v.backends)} backends; at most {abi.VIP_BACKENDS_MAX} per VIP"))
    seen: dict[tuple[object, object], int] = {}
    for j, b in enumerate(v.backends):
        bpath = f"{path}.backend[{j}]"
        out += _backend_problems(v, b, bpath)
        if (b.address, b.port) in seen:
            out.append(Problem(bpath, f"duplicate backend {b.name} (also backend[{seen[(b.address, b.port)]}])"))
        seen.setdefault((b.address, b.port), j)
    out += _sched_problems(v, path)
    out += _quic_problems(v, path)
    if isinstance(v.scheduler, Scheduler) and v.scheduler.maglev and isinstance(v.table_size, int) \
            and v.table_size < 100 * len(v.backends):
        out.append(Problem(f"{path}.table_size", f"{v.table_size} is less than 100 x {len(v.backends)} backends: "
                           "shares would be uneven; use a larger prime (65537 is the default)"))
    if v.backends and not any(b.weight for b in v.backends):
        out.append(Problem(f"{path}.backend", "every backend has weight 0: the VIP could take no flow"))
    return out


def _quic_problems(v: Vip, path: str) -> list[Problem]:
    """quic and server_id (issue 13, bpf/quic.h): ids unique per VIP, only on a QUIC VIP."""
    out = []
    if v.quic is not False and v.quic is not True:
        out.append(Problem(f"{path}.quic", f"{show(v.quic)}: must be true or false"))
    elif v.quic and v.protocol is not Protocol.UDP:
        out.append(Problem(f"{path}.quic", "QUIC runs over UDP: quic = true needs protocol \"udp\""))
    elif v.quic and v.mode is Mode.NAT:
        out.append(Problem(f"{path}.quic", "connection-ID routing is not available in nat mode yet (its "
                           "connections are tracked by lbx_nat); use dsr, ipip or gue"))
    seen: dict[int, int] = {}
    for j, b in enumerate(v.backends):
        if (bad := _int(b.server_id, 0, 0xFFFF, "; 0 = none")) is not None:
            out.append(Problem(f"{path}.backend[{j}].server_id", bad))
        elif b.server_id and not v.quic:
            out.append(Problem(f"{path}.backend[{j}].server_id", f"{b.server_id}: server_id only applies to "
                               "a VIP with quic = true"))
        elif b.server_id and b.server_id in seen:
            out.append(Problem(f"{path}.backend[{j}].server_id", f"{b.server_id}: already backend[{seen[b.server_id]}]'s "
                               "(server ids are unique per VIP)"))
        elif b.server_id:
            seen[b.server_id] = j
    return out


def _sched_problems(v: Vip, path: str) -> list[Problem]:
    """source_prefix, leastconn and max_conns (issue 13)."""
    out = []
    if v.source_prefix is not None:
        top = 32 if getattr(v.address, "version", 4) == 4 else 128
        if v.scheduler is not Scheduler.SOURCE:
            sched = v.scheduler.value if isinstance(v.scheduler, Scheduler) else v.scheduler
            out.append(Problem(f"{path}.source_prefix", f"{show(v.source_prefix)}: source_prefix only applies to "
                               f"scheduler \"source\" (this VIP's is {sched!r})"))
        elif (bad := _int(v.source_prefix, 1, top, f" (leading bits of an IPv{4 if top == 32 else 6} client address)")):
            out.append(Problem(f"{path}.source_prefix", bad))
    if v.mode is Mode.NAT and v.scheduler is Scheduler.LEASTCONN:
        out.append(Problem(f"{path}.scheduler", "\"leastconn\" is not available in nat mode yet (its "
                           "connections are not counted); use maglev, hash, source or rr"))
    for j, b in enumerate(v.backends):
        if (bad := _int(b.max_conns, 0, 2**32 - 1, "; 0 = no cap")) is not None:
            out.append(Problem(f"{path}.backend[{j}].max_conns", bad))
        elif b.max_conns and v.mode is Mode.NAT:
            out.append(Problem(f"{path}.backend[{j}].max_conns", f"{b.max_conns}: connection caps are not "
                               "available in nat mode yet (its connections are not counted)"))
    return out


def _backend_problems(v: Vip, b: Backend, path: str) -> list[Problem]:
    vip_port = v.port if isinstance(v.port, int) else 1
    out = _fields(path, [
        ("address", _address(b.address, "backend")),
        ("port", _int(b.port, 0, 65535, "; 0 = any port") if vip_port == 0 else _int(b.port, 1, 65535)),
    ])
    out += _check(b.health, f"{path}.health")
    check = v.check_of(b)
    if check is not None and b.port == 0 and check.port is None:
        out.append(Problem(f"{path}.health.port", "is required: an any-port backend has no port to check"))
    out += _fields(path, [
        ("mac", _mac(b.mac) if b.mac is not None else None),
        ("weight", _int(b.weight, 0, MAX_WEIGHT)),
        ("backup", None if isinstance(b.backup, bool) else f"{show(b.backup)} is not true or false"),
    ])
    if out or _address(v.address, "VIP") is not None:
        return out      # the rules below compare values that are each valid
    if b.address == v.address:
        out.append(Problem(f"{path}.address", f"{str(b.address)!r} is the VIP's own address: a VIP cannot "
                           "be its own backend (its packets would come back to the balancer)"))
    elif b.address.version != v.address.version and not (
            isinstance(v.mode, Mode) and v.mode.encap and v.address.version == 4):
        mode = v.mode.value if isinstance(v.mode, Mode) else v.mode
        why = ("an IPv6 VIP cannot be carried to an IPv4 backend" if isinstance(v.mode, Mode) and v.mode.encap
               else f"{mode} mode cannot cross address families (ipip and gue carry an IPv4 VIP to an IPv6 backend)")
        out.append(Problem(f"{path}.address", f"{str(b.address)!r} is IPv{b.address.version} but the VIP "
                           f"is IPv{v.address.version}; {why}"))
    elif isinstance(v.mode, Mode) and v.mode is not Mode.NAT and b.port != v.port:
        out.append(Problem(f"{path}.port", f"{b.port} differs from the VIP port {v.port}; {v.mode.value} mode "
                           "cannot rewrite ports (the backend answers the client directly)"))
    return out


def _balancer_problems(o: BalancerOptions) -> list[Problem]:
    out = []
    for key, want, v in (("ipv4_source", ipaddress.IPv4Address, o.ipv4_source),
                         ("ipv6_source", ipaddress.IPv6Address, o.ipv6_source)):
        if v is None:
            continue
        if not isinstance(v, want):
            out.append(Problem(f"balancer.{key}", f"{show(str(v))} is not an IPv{4 if key == 'ipv4_source' else 6} address"))
        elif (bad := _address(v, "tunnel source")) is not None:
            out.append(Problem(f"balancer.{key}", bad))
    if o.flow_source_v4 is not None and not (isinstance(o.flow_source_v4, ipaddress.IPv4Network)
                                             and 8 <= o.flow_source_v4.prefixlen <= 24):
        out.append(Problem("balancer.flow_source_v4", f"{show(str(o.flow_source_v4))} is not an IPv4 prefix "
                           "from /8 to /24 (its host bits carry the flow hash)"))
    if o.flow_source_v6 is not None and not (isinstance(o.flow_source_v6, ipaddress.IPv6Network)
                                             and o.flow_source_v6.prefixlen <= 64):
        out.append(Problem("balancer.flow_source_v6", f"{show(str(o.flow_source_v6))} is not an IPv6 prefix "
                           "of /64 or shorter (the low 64 bits carry the flow hash)"))
    if o.mtu is not None and (bad := _int(o.mtu, MIN_ENCAP_MTU, MAX_MTU)) is not None:
        out.append(Problem("balancer.mtu", bad))
    if o.flood_threshold is not None and (bad := _int(o.flood_threshold, 1, 2**32 - 1)) is not None:
        out.append(Problem("balancer.flood_threshold", bad))
    for key, want, v in (("snat_v4", ipaddress.IPv4Address, o.snat_v4), ("snat_v6", ipaddress.IPv6Address, o.snat_v6)):
        if v is None:
            continue
        if not isinstance(v, want):
            out.append(Problem(f"balancer.{key}", f"{show(str(v))} is not an IPv{4 if key == 'snat_v4' else 6} address"))
        elif (bad := _address(v, "SNAT source")) is not None:
            out.append(Problem(f"balancer.{key}", bad))
    if o.snat_ports is not None:
        lo, hi = o.snat_ports
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= 65535 and 1 <= hi <= 65535):
            out.append(Problem("balancer.snat_ports", f"{show(f'{lo}-{hi}')} is out of range (ports 1-65535)"))
        elif hi < lo:
            out.append(Problem("balancer.snat_ports", f"\"{lo}-{hi}\" holds no port (a pool needs at least 1 port: LO <= HI)"))
    t = o.nat_timeouts
    for key in ("tcp_syn", "tcp_established", "tcp_close", "udp"):
        if (bad := _int(getattr(t, key), 1, MAX_NAT_TIMEOUT, " seconds")) is not None:
            out.append(Problem(f"balancer.nat_timeouts.{key}", bad))
    return out


def _nat_problems(v: Vip, path: str) -> list[Problem]:
    """snat and passive_health: booleans and ranges, nat VIPs only. (Whether the SNAT address is
    the balancer's own needs the interface: lbxdp.nexthop.nat_sources.)"""
    out = []
    if not isinstance(v.snat, bool):
        out.append(Problem(f"{path}.snat", f"{show(v.snat)} is not true or false"))
    elif v.snat and v.mode is not Mode.NAT:
        out.append(Problem(f"{path}.snat", f"applies to mode nat only (this VIP's is {getattr(v.mode, 'value', v.mode)!r})"))
    ph = v.passive_health
    if ph is None:
        return out
    # dsr, ipip, gue (issue 13): the client's side of the handshake only (bpf/select.h)
    if v.mode is not Mode.NAT and v.protocol is not Protocol.TCP:
        out.append(Problem(f"{path}.passive_health", "applies to TCP VIPs only: it watches handshakes"))
    out += _fields(f"{path}.passive_health", [
        ("failures", _int(ph.failures, 1, 1000, " failed handshakes")),
        ("timeout", None if not isinstance(ph.timeout, bool) and isinstance(ph.timeout, (int, float))
         and 0.1 <= ph.timeout <= 3600 else f"{show(ph.timeout)} is not a number of seconds (0.1-3600)"),
        ("max_ejected", None if not isinstance(ph.max_ejected, bool) and isinstance(ph.max_ejected, (int, float))
         and 0 <= ph.max_ejected <= 1 else f"{show(ph.max_ejected)} is not a share of the VIP's backends (0-1)"),
    ])
    return out


# Every scope with an allow list adds two implicit entries (0.0.0.0/0 and ::/0) to the trie.
ACL_RULES_MAX = abi.ACL_MAX - 2 * (abi.MAX_VIPS + 1)


def _admission_problems(a: Admission, path: str, version: int | None) -> list[Problem]:
    """allow/deny: networks, of the VIP's family (version; None: [balancer], either), no prefix
    twice; new_flow_limit: rate and burst > 0."""
    out = []
    seen: dict[object, str] = {}
    for key, nets in (("allow", a.allow), ("deny", a.deny)):
        for j, n in enumerate(nets):
            where = f"{path}.{key}[{j}]"
            if not isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                out.append(Problem(where, f"{show(n)} is not a network prefix like \"192.0.2.0/24\""))
                continue
            if version is not None and n.version != version:
                out.append(Problem(where, f"{n} is an IPv{n.version} prefix; this VIP is IPv{version}: "
                                   "its sources are never IPv" + str(n.version)))
            if n in seen:
                out.append(Problem(where, f"{n} is also {seen[n]}: a prefix is allowed or denied, not both"
                                   if not seen[n].startswith(key) else f"{n} is listed twice (also {seen[n]})"))
            seen.setdefault(n, f"{key}[{j}]")
    lim = a.new_flow_limit
    if lim is not None:
        out += _fields(f"{path}.new_flow_limit", [
            ("rate", _int(lim.rate, 1, MAX_NEW_FLOW_RATE, " new flows per second per source")),
            ("burst", _int(lim.burst, 1, MAX_NEW_FLOW_BURST, " flows")),
        ])
    return out


def _encap_problems(v: Vip, path: str, o: BalancerOptions, udp_ports: dict[int, int]) -> list[Problem]:
    """The encap keys of a VIP: ranges, and what they need from [balancer] and the other VIPs."""
    out = _fields(path, [
        ("gue_port", _int(v.gue_port, 1, 65535)),
        ("ipip_source", _one_of(v.ipip_source, EncapSource)),
        ("mtu", _int(v.mtu, MIN_ENCAP_MTU, MAX_MTU) if v.mtu is not None else None),
        ("mss_clamp", None if isinstance(v.mss_clamp, bool) else f"{show(v.mss_clamp)} is not true or false"),
    ])
    if out or not isinstance(v.mode, Mode):
        return out
    if not v.mode.encap:
        for key, default in (("gue_port", DEFAULT_GUE_PORT), ("ipip_source", EncapSource.BALANCER),
                             ("mtu", None), ("mss_clamp", False)):
            if getattr(v, key) != default:
                out.append(Problem(f"{path}.{key}", f"applies to modes ipip and gue only (this VIP's is {v.mode.value!r})"))
        return out
    if v.mode is Mode.GUE:
        if v.ipip_source is EncapSource.FLOW:
            out.append(Problem(f"{path}.ipip_source", "applies to mode ipip only: gue spreads flows by its UDP "
                               "source port"))
        if v.gue_port in udp_ports or 0 in udp_ports:
            j = udp_ports.get(v.gue_port, udp_ports.get(0))
            out.append(Problem(f"{path}.gue_port", f"{v.gue_port} is also the port of the UDP VIP vip[{j}]: tunnel "
                               "and VIP datagrams would share a port; pick another gue_port"))
    if v.ipip_source is EncapSource.FLOW:
        for fam, key in ((4, "flow_source_v4"), (6, "flow_source_v6")):
            if any(isinstance(b.address, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and b.address.version == fam
                   for b in v.backends) and getattr(o, key) is None:
                out.append(Problem(f"{path}.ipip_source", f"\"flow\" needs [balancer] {key} (the prefix the "
                                   f"outer sources of IPv{fam} backends come from)"))
    mtu = v.mtu or o.mtu
    if mtu is not None and v.address.version == 6:
        worst = max((encap_overhead(v.mode, b.address) for b in v.backends
                     if isinstance(b.address, (ipaddress.IPv4Address, ipaddress.IPv6Address))), default=0)
        if mtu - worst < 1280:
            out.append(Problem(f"{path}.mtu", f"{mtu} leaves {mtu - worst} bytes for the inner packet; an IPv6 "
                               f"VIP needs 1280 (mtu >= {1280 + worst})"))
    return out
