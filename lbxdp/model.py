"""What the user asked for, as frozen values parsed once at the edge (config file, CLI).

Nothing here knows about maps or the kernel; lbxdp.maps converts these to map structs.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from . import abi

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(str, enum.Enum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        return {"tcp": 6, "udp": 17}[self.value]


class Scheduler(str, enum.Enum):
    RR = "rr"
    HASH = "hash"

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


def endpoint(addr: IPAddress, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    return f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    port: int
    mac: str | None = None  # None: resolved from the kernel's neighbour table at apply time

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
    scheduler: Scheduler = Scheduler.RR
    backends: tuple[Backend, ...] = field(default_factory=tuple)

    @property
    def key(self) -> VipKey:
        return VipKey(self.address, self.port, self.protocol)

    @property
    def name(self) -> str:
        return self.key.name


@dataclass(frozen=True)
class Config:
    vips: tuple[Vip, ...] = ()
