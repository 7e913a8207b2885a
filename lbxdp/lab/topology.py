"""Builds and removes a Layout (lbxdp.lab.shapes) with pyroute2: namespaces, bridges, veth pairs,
addresses, routes, sysctls, neighbour entries. The one place of the lab that wraps pyroute2; test
bodies never call netlink verbs themselves.

Every function takes the Layout and works inside the namespaces its names give; the caller
(lbxdp.lab.rig.Rig) keeps the list of namespaces created, so that it can remove them after a
failure half-way.
"""

from __future__ import annotations

import re
import socket
from typing import Callable

from pyroute2 import netns

from . import namespaces as nsx
from .shapes import SW, Layout, RigError, Route

_IFA_F_NODAD = 0x02
_IFA_F_TENTATIVE = 0x40
_NUD_PERMANENT = 0x80
_BR_STATE_FORWARDING = 3


def create_namespaces(lay: Layout, created: Callable[[str], None]) -> None:
    """Create sw and every host's namespace (created(name) after each), then the sysctls that
    links made later must inherit. RigError if a name is taken (the prefix is in use)."""
    existing = set(netns.listnetns())
    for role in (SW, *lay.hosts):
        name = lay.ns(role)
        if name in existing:
            raise RigError(f"namespace {name} already exists: prefix {lay.spec.prefix} is in "
                           "use (remove it with `lbxdp rig down` or pick another prefix)")
        netns.create(name)
        created(name)
    # Before any link exists, so that every interface created later inherits 'default'.
    # A switch has no addresses; without IPv6 its ports send no RS/MLD/DAD noise.
    nsx.sysctl(lay.ns(SW), {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
    for role in lay.hosts:
        nsx.sysctl(lay.ns(role), lay.sysctls(role))


def build_switch(lay: Layout) -> None:
    """One bridge per segment in sw, and one veth pair per host interface."""
    with nsx.iproute(lay.ns(SW)) as ipr:
        for seg in lay.segments:
            # Multicast snooping off: the bridge floods IPv6 neighbour solicitations (multicast)
            # to every port instead of depending on MLD reports it may not have seen yet. STP is
            # off by default, so ports forward as soon as they are up (polled in wait_ready anyway).
            ipr.link("add", ifname=seg.bridge, kind="bridge", br_mcast_snooping=0)
            br = ipr.link_lookup(ifname=seg.bridge)[0]
            ipr.link("set", index=br, state="up")
            for role in seg.hosts:
                # The pair is made in sw and its host end is created directly in the host's
                # namespace (IFLA_NET_NS_FD on the peer): no interface ever appears in the root
                # namespace, and every host's eth0 can share the name.
                ipr.link("add", ifname=lay.peer(role, seg.name), kind="veth",
                         peer={"ifname": lay.ifname(role, seg.name), "address": lay.mac(role, seg.name),
                               "net_ns_fd": lay.ns(role)})
                port = ipr.link_lookup(ifname=lay.peer(role, seg.name))[0]
                ipr.link("set", index=port, master=br)
                ipr.link("set", index=port, state="up")


def build_host(lay: Layout, role: str) -> dict[str, str]:
    """Up lo and the host's interfaces, their addresses, VIPs on lo, routes; per-interface
    sysctls. Returns {segment name: MAC as the kernel reports it}."""
    macs = {}
    with nsx.iproute(lay.ns(role)) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        for seg in lay.segments_of(role):
            eth = ipr.link_lookup(ifname=lay.ifname(role, seg.name))[0]
            ipr.link("set", index=eth, state="up")
            ipr.addr("add", index=eth, address=str(lay.addr4(role, seg.name)), prefixlen=seg.v4.prefixlen)
            # NODAD as well as accept_dad=0: either alone suffices; both cost nothing.
            ipr.addr("add", index=eth, address=str(lay.addr6(role, seg.name)), prefixlen=seg.v6.prefixlen,
                     flags=_IFA_F_NODAD)
            macs[seg.name] = ipr.get_links(eth)[0].get_attr("IFLA_ADDRESS")
        if lay.holds_vips(role):
            ipr.addr("add", index=lo, address=str(lay.spec.vip4), prefixlen=32)
            ipr.addr("add", index=lo, address=str(lay.spec.vip6), prefixlen=128, flags=_IFA_F_NODAD)
        for route in lay.routes(role):
            _add_route(ipr, lay, role, route)
    if values := lay.interface_sysctls(role):
        nsx.sysctl(lay.ns(role), values)
    return macs


def _add_route(ipr, lay: Layout, role: str, route: Route) -> None:
    """Both families; one gateway is a plain route, several an ECMP (multipath) one."""
    for version, dst in ((4, route.dst4), (6, route.dst6)):
        addr = lay.addr4 if version == 4 else lay.addr6
        gws = [str(addr(gw, lay.shared_segment(role, gw).name)) for gw in route.via]
        dst_text = str(dst) if dst is not None else ("0.0.0.0/0" if version == 4 else "::/0")
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        if len(gws) == 1:
            ipr.route("add", family=family, dst=dst_text, gateway=gws[0])
        else:
            ipr.route("add", family=family, dst=dst_text, multipath=[{"gateway": g} for g in gws])


def wait_ready(lay: Layout) -> None:
    """Poll until every bridge port forwards, every host interface is up and no address is
    tentative."""
    with nsx.iproute(lay.ns(SW)) as ipr:
        def ports_forwarding() -> bool:
            for seg in lay.segments:
                for role in seg.hosts:
                    link = ipr.get_links(ipr.link_lookup(ifname=lay.peer(role, seg.name))[0])[0]
                    slave = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
                    if link.get_attr("IFLA_OPERSTATE") != "UP" or slave is None or \
                            slave.get_attr("IFLA_BRPORT_STATE") != _BR_STATE_FORWARDING:
                        return False
            return True
        nsx.poll(f"bridge ports of {lay.ns(SW)} to forward", ports_forwarding)
    for role in lay.hosts:
        for seg in lay.segments_of(role):
            _wait_interface(lay, role, seg.name)


def _wait_interface(lay: Layout, role: str, segment: str) -> None:
    ifname, want = lay.ifname(role, segment), str(lay.addr6(role, segment))
    with nsx.iproute(lay.ns(role)) as ipr:
        eth = ipr.link_lookup(ifname=ifname)[0]

        def usable() -> bool:
            if ipr.get_links(eth)[0].get_attr("IFLA_OPERSTATE") != "UP":
                return False
            v6 = ipr.get_addr(family=socket.AF_INET6, index=eth)
            return any(a.get_attr("IFA_ADDRESS") == want for a in v6) \
                and not any(a.get_attr("IFA_FLAGS", a["flags"]) & _IFA_F_TENTATIVE for a in v6)
        nsx.poll(f"{lay.ns(role)} {ifname} up with non-tentative IPv6 addresses", usable)


def disable_tx_checksum(lay: Layout, role: str) -> None:
    """Checksum gotcha: a veth passes the sender's skb on with CHECKSUM_PARTIAL (the TCP/UDP
    checksum not yet filled in, to be completed "by the hardware"). If lb's XDP program sends
    the frame on with XDP_TX in native mode, that skb state is gone and nobody completes the
    checksum: the receiver drops the packet (TcpInCsumErrors/UdpInCsumErrors). Measured on the
    l2 rig: with tx on, not even a SYN or a single datagram gets through in native mode; generic
    mode is unaffected. A real NIC puts a full checksum on the wire, so make the sender's ports
    behave like one. (`tx off` turns every tx-checksum-* feature off, and TSO/GSO with them.)"""
    for seg in lay.segments_of(role):
        ifname = lay.ifname(role, seg.name)
        nsx.run(lay.ns(role), "ethtool", "-K", ifname, "tx", "off")
        out = nsx.run(lay.ns(role), "ethtool", "-k", ifname).stdout
        if not re.search(r"^tx-checksumming: off", out, re.M):
            raise RigError(f"tx checksum offload still on in {lay.ns(role)} {ifname}:\n{out}")


def add_neighbors(lay: Layout, mac: Callable[[str, str], str]) -> None:
    """Permanent neighbour entries on every balancer for its backends and router (RigSpec says
    why), with mac(role, segment) as the kernel reported it."""
    for lb in lay.balancers:
        with nsx.iproute(lay.ns(lb)) as ipr:
            for host, seg in lay.neighbors(lb):
                eth = ipr.link_lookup(ifname=lay.ifname(lb, seg))[0]
                for addr in (lay.addr4(host, seg), lay.addr6(host, seg)):
                    ipr.neigh("add", ifindex=eth, dst=str(addr), lladdr=mac(host, seg), state=_NUD_PERMANENT)
