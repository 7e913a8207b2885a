"""The veth XDP_TX trap: is native XDP on this interface able to send what it returns XDP_TX?

A veth hands an XDP_TX (or redirected) frame to its peer's receive queue only if that queue
runs NAPI, which it does when the peer has an XDP program of its own (or GRO enabled, since
5.13; this check ignores GRO, so it errs on the side of generic mode). Otherwise
veth_xdp_xmit() drops every such frame and counts it nowhere that lbxdp sees: native mode
"works" and forwards nothing. Generic mode transmits through the stack and needs nothing from
the peer. lbxdp/rig.py attaches a stub to its own peers (attach_peer_stub).

The peer is found through rtnetlink: IFLA_LINK names its ifindex and IFLA_LINK_NETNSID its
namespace (as an id of this one), and a RTM_GETLINK with IFLA_IF_NETNSID (the kernel's
IFLA_TARGET_NETNSID) reads it there without entering that namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import LbxError


@dataclass(frozen=True)
class VethPeer:
    ifname: str          # the peer's name, in its namespace
    ifindex: int
    netnsid: int | None  # None: the peer is in this namespace
    xdp_prog_id: int     # 0: no XDP program on the peer

    @property
    def where(self) -> str:
        return self.ifname if self.netnsid is None else f"{self.ifname} (netns id {self.netnsid})"

    @property
    def delivers_xdp_tx(self) -> bool:
        return self.xdp_prog_id != 0


def _xdp_prog_id(link: Any) -> int:
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return 0
    return xdp.get_attr("IFLA_XDP_PROG_ID") or xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or 0


def peer_of(ifname: str) -> VethPeer | None:
    """ifname's veth peer, or None if ifname is not a veth (or its peer cannot be read)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            [link] = ipr.get_links(ifname=ifname)
        except Exception as e:
            raise LbxError(f"no interface named {ifname!r} here", "list interfaces with `ip -br link`") from e
        info = link.get_attr("IFLA_LINKINFO")
        if not info or info.get_attr("IFLA_INFO_KIND") != "veth" or not link.get_attr("IFLA_LINK"):
            return None
        idx, nsid = link.get_attr("IFLA_LINK"), link.get_attr("IFLA_LINK_NETNSID")
        try:
            [peer] = ipr.link("get", index=idx, **({} if nsid is None else {"IFLA_IF_NETNSID": nsid}))
        except Exception:
            return None   # the peer's namespace is gone or not reachable from here
        return VethPeer(peer.get_attr("IFLA_IFNAME"), idx, nsid, _xdp_prog_id(peer))


def native_warning(ifname: str) -> str | None:
    """Why native XDP on ifname would lose every XDP_TX frame, or None if it would not."""
    peer = peer_of(ifname)
    if peer is None or peer.delivers_xdp_tx:
        return None
    return (f"{ifname} is a veth whose peer {peer.where} has no XDP program: in native mode every "
            f"forwarded (XDP_TX) frame would be dropped by the veth")


FIX = ("use --mode generic, or attach an XDP program to the peer (any XDP_PASS program, "
       "e.g. bpf/stub.c: ip link set dev PEER xdp obj ...) and then --mode native")
