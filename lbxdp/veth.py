"""The veth XDP_TX trap: is native XDP on this interface able to send what it returns XDP_TX?

A veth hands an XDP_TX (or redirected) frame to its peer's receive ring only if that ring runs
NAPI; without it veth_xdp_xmit() drops every such frame and counts it nowhere that lbxdp sees:
native mode "works" and forwards nothing. Generic mode transmits through the stack and needs
nothing from the peer. lbxdp/lab/stub.py attaches a stub to its own peers (attach_peer_stub).

Only an XDP program on the peer counts, not GRO. Since 5.13 GRO on the peer also gives its ring
NAPI, and veth_xdp_xmit() then accepts the frames, but for XDP_TX veth_xdp_flush() wakes the
peer's NAPI only if the peer has an XDP program (`if (!rcv_rq->xdp_prog) goto out`). (A
redirect is flushed by ndo_xdp_xmit itself, so GRO may suffice there: read, not measured; lbxdp
only uses XDP_TX.)
Measured on 6.18 (rig, lbxdp native on lb's eth0, 5 TCP + 5 UDP tries per case; counters from
`ethtool -S`, lb's eth0 / its peer / be1's eth0):
  peer GRO off, no program: 0 of 10 answered; xdp_tx 0, xdp_tx_errors 11 (dropped)
  peer GRO on, no program:  0 of 10 answered; xdp_tx 10, xdp_tx_errors 0 (queued in the peer's
                            ring), the peer's rx_queue_0_xdp_packets 0, be1 got nothing; still
                            not delivered after a ping and a TCP connection from lb's own stack
  peer XDP_PASS stub:       10 of 10 answered; xdp_tx 35, the peer's xdp_packets 35, be1 rx 36
With GRO the loss is even quieter (no error counter moves), so the check ignores GRO and
tests/netns/test_veth_mode.py::test_native_with_gro_on_the_peer_still_loses_xdp_tx pins that
down: when a kernel delivers these frames, that test fails and this check can accept GRO.

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
