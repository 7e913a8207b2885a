"""What the user asked for, as frozen values parsed once at the edge (config file, CLI).

Nothing here knows about maps or the kernel; lbxdp.maps converts these to map structs.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field

from . import abi
from .health import HealthCheck

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

    @property
    def abi(self) -> abi.Sched:
        return abi.Sched[self.name]


class Mode(str, enum.Enum):
    DSR = "dsr"

    @property
    def abi(self) -> abi.FwdMode:
        return abi.FwdMode[self.name]


def family(addr: IPAddress) -> int:
    return abi.FAMILY_V4 if addr.version == 4 else abi.FAMILY_V6


DEFAULT_TABLE_SIZE = 65537  # Maglev's M: prime, > 100 x backends keeps shares within 1%


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


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    port: int               # 0 on an any-port VIP: the packet keeps its port
    mac: str | None = None  # None: resolved from the kernel's neighbour table at apply time
    weight: int = 1         # share of new flows, relative to the VIP's other backends; 0 = none
    backup: bool = False    # gets new flows only while no primary is usable
    health: HealthCheck | None = None   # its own check (the VIP's merged with its overrides)

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
    on_backend_down: str = "keep"         # keep: established flows stay; migrate: they move on
    on_all_down: str = "drop"             # no usable backend at all: drop or pass (to the kernel)

    def check_of(self, b: Backend) -> HealthCheck | None:
        return b.health or self.health

    @property
    def key(self) -> VipKey:
        return VipKey(self.address, self.port, self.protocol)

    @property
    def name(self) -> str:
        return self.key.name


@dataclass(frozen=True)
class Config:
    vips: tuple[Vip, ...] = ()
    metrics_listen: str | None = None  # [metrics] listen: where `lbxdp run` serves /metrics
