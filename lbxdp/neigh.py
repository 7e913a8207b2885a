"""Next-hop MACs of backends, from the kernel's neighbour table (not hand-entered).

In dsr mode a backend is on the balancer's segment, so its MAC is a neighbour entry on the
attached interface. When there is none yet, one datagram to the discard port makes the kernel
resolve it (ARP or neighbour discovery); we then poll the table until it is usable.
"""

from __future__ import annotations

import socket
import time

from pyroute2 import IPRoute

from . import model
from .errors import LbxError

# NUD states that carry a usable link-layer address.
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


def _lookup(ipr: IPRoute, ifindex: int, addr: model.IPAddress) -> str | None:
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    for n in ipr.get_neighbours(family=fam, ifindex=ifindex, dst=str(addr)):
        lladdr = n.get_attr("NDA_LLADDR")
        if lladdr and n["state"] & _NUD_USABLE:
            return lladdr
    return None


def _poke(ifname: str, addr: model.IPAddress) -> None:
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        try:
            s.sendto(b"lbxdp neighbour probe", (str(addr), 9))
        except OSError:
            pass  # no route: reported below as unresolved


def resolve(ifname: str, ifindex: int, addrs: list[model.IPAddress], timeout: float = 3.0) -> dict[model.IPAddress, str]:
    """MAC of every address, as a neighbour on ifname. Raises LbxError naming the ones that failed."""
    found: dict[model.IPAddress, str] = {}
    with IPRoute() as ipr:
        for a in addrs:
            mac = _lookup(ipr, ifindex, a)
            if mac:
                found[a] = mac
            else:
                _poke(ifname, a)
        deadline = time.monotonic() + timeout
        while len(found) < len(set(addrs)) and time.monotonic() < deadline:
            time.sleep(0.05)
            for a in addrs:
                if a not in found and (mac := _lookup(ipr, ifindex, a)):
                    found[a] = mac
    missing = [str(a) for a in dict.fromkeys(addrs) if a not in found]
    if missing:
        raise LbxError(f"cannot find the MAC of backend(s) {', '.join(missing)} on {ifname}: no neighbour "
                       f"entry after {timeout:.0f} s",
                       "dsr backends must be on the same segment as the balancer; check addressing, "
                       "or set `mac = ...` for the backend in the config")
    return found
