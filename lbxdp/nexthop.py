"""Next hops and own addresses of the encap modes, from the kernel's FIB and neighbour state.

An ipip/gue frame leaves with XDP_TX on the attached interface towards the backend's next hop:
the gateway of the kernel's route to the backend, or the backend itself when the route is
on-link. `route get` answers which, and lbxdp.neigh the MAC of that hop. The route must leave
through the attached interface (XDP_TX cannot send elsewhere). A per-packet bpf_fib_lookup()
was measured as the alternative (docs/benchmarks.md) and not taken: it costs every packet and
cannot resolve a missing neighbour from XDP.

The outer source is the [balancer] ipv4_source / ipv6_source, else the interface's primary
(first global) address of that family.
"""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import model, neigh
from .errors import LbxError
from .maps import OwnAddresses


def hop_of(ipr: IPRoute, ifname: str, ifindex: int, addr: model.IPAddress) -> model.IPAddress:
    """The address whose MAC a frame to addr is sent to: the route's gateway, or addr when on-link."""
    try:
        routes = ipr.route("get", dst=str(addr))
    except NetlinkError as e:
        raise LbxError(f"backend {addr} is unreachable: no route ({e.args[1] if len(e.args) > 1 else e})",
                       f"add a route to it through {ifname} (ip route add {addr} via GATEWAY dev {ifname})",
                       exit_code=2) from None
    r = routes[0]
    if r.get_attr("RTA_OIF") != ifindex:
        raise LbxError(f"backend {addr}: the route to it leaves through another interface, not {ifname}",
                       f"the balancer sends encapsulated frames back out of {ifname}: route {addr} through it",
                       exit_code=2)
    gw = r.get_attr("RTA_GATEWAY")
    if gw is None and (via := r.get_attr("RTA_VIA")) is not None:   # an IPv4 route via an IPv6 gateway
        gw = via.get("addr") if isinstance(via, dict) else via.get_attr("RTA_ADDR")
    return ipaddress.ip_address(gw) if gw else addr


def resolve(ifname: str, ifindex: int, addrs: list[model.IPAddress]) -> dict[model.IPAddress, str]:
    """Next-hop MAC of every (encap) backend address. LbxError (exit 2) names an unreachable one."""
    with IPRoute() as ipr:
        hops = {a: hop_of(ipr, ifname, ifindex, a) for a in dict.fromkeys(addrs)}
    macs = neigh.resolve(ifname, ifindex, list(dict.fromkeys(hops.values()))) if hops else {}
    return {a: macs[h] for a, h in hops.items()}


def primary_addresses(ifindex: int) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    """The interface's first global IPv4 and IPv6 addresses (None where it has none)."""
    v4 = v6 = None
    with IPRoute() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            for a in ipr.get_addr(family=fam, index=ifindex):
                if a["scope"] != 0:   # RT_SCOPE_UNIVERSE only: not link-local, not host
                    continue
                ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
                if fam == socket.AF_INET and v4 is None:
                    v4 = ip
                elif fam == socket.AF_INET6 and v6 is None:
                    v6 = ip
    return v4, v6  # type: ignore[return-value]


def own_addresses(ifindex: int, cfg: model.Config) -> OwnAddresses:
    """What lbx_ctl should hold: [balancer] sources, else the interface's, and the flow prefixes."""
    o = cfg.balancer
    v4, v6 = (o.ipv4_source, o.ipv6_source)
    if v4 is None or v6 is None:
        i4, i6 = primary_addresses(ifindex)
        v4, v6 = v4 or i4, v6 or i6
    return OwnAddresses(v4, v6, o.flow_source_v4, o.flow_source_v6)


def interface_addresses(ifindex: int) -> list[model.IPAddress]:
    """Every global (RT_SCOPE_UNIVERSE) address of the interface, in the kernel's order."""
    out: list[model.IPAddress] = []
    with IPRoute() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            out += [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=fam, index=ifindex)
                    if a["scope"] == 0]
    return out


def nat_sources(ifname: str, ifindex: int, cfg: model.Config) -> tuple[ipaddress.IPv4Address | None,
                                                                        ipaddress.IPv6Address | None]:
    """The SNAT source of each family (lbx_nat_cfg): [balancer] snat_v4 / snat_v6, which must be
    one of the interface's own addresses (replies come back to it: XDP sees them only there), else
    the interface's first. LbxError (exit 2) naming the key when a configured one is not the
    balancer's, or when a snat = true VIP has backends of a family with no source."""
    have = interface_addresses(ifindex)
    out: list[model.IPAddress | None] = []
    for fam, key in ((4, "snat_v4"), (6, "snat_v6")):
        want = getattr(cfg.balancer, key)
        if want is not None and want not in have:
            mine = ", ".join(str(a) for a in have if a.version == fam) or "none"
            raise LbxError(f"balancer.{key}: {want} is not an address of {ifname} (its IPv{fam} addresses: {mine})",
                           "the SNAT source must be the balancer's own address on the attached interface, where the "
                           "replies come back; nothing was applied", exit_code=2)
        src = want or next((a for a in have if a.version == fam), None)
        users = [v for v in cfg.vips if v.mode is model.Mode.NAT and v.snat
                 and any(b.address.version == fam for b in v.backends)]
        if users and src is None:
            raise LbxError(f"balancer.{key}: VIP {users[0].name} has snat = true and IPv{fam} backends, but {ifname} "
                           f"has no IPv{fam} address to be their source",
                           f"give {ifname} an IPv{fam} address or set [balancer] {key}; nothing was applied", exit_code=2)
        out.append(src)
    return out[0], out[1]  # type: ignore[return-value]


def missing_sources(cfg: model.Config, own: OwnAddresses) -> list[str]:
    """Encap backends whose outer source family the balancer has no address of."""
    out = []
    for v in cfg.vips:
        if not v.mode.encap:
            continue
        for b in v.backends:
            flow = v.mode is model.Mode.IPIP and v.ipip_source is model.EncapSource.FLOW
            if not flow and (own.v4 if b.address.version == 4 else own.v6) is None:
                out.append(f"{v.name} backend {b.name}")
    return out
