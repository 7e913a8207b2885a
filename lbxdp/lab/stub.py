"""The peer XDP stub: an XDP_PASS program (bpf/stub.c) on the switch side of a balancer's veth.

Why: a veth delivers frames that its peer sent with XDP_TX or XDP_REDIRECT (veth_xdp_xmit) only if
the receiving end has NAPI running, which for veth means an XDP program attached to it in native
mode. Without it those frames are silently dropped and counted as tx errors on the sender; GRO on
the peer is not enough (frames are queued and the peer never woken: lbxdp/veth.py measures it).
So a balancer that runs lbxdp in native mode needs the stub on the bridge port of every interface
it may transmit on; generic (skb) mode does not (XDP_TX goes through the normal transmit path).

The attachment lives on the device (it outlasts this process) and goes with the namespace.
"""

from __future__ import annotations

import socket

from . import namespaces as nsx
from .shapes import SW, Layout


def stub_ports(lay: Layout) -> list[str]:
    """The ports in sw that get the stub: the peers of every balancer's interfaces."""
    return [lay.peer(lb, seg.name) for lb in lay.balancers for seg in lay.segments_of(lb)]


def attach(lay: Layout) -> None:
    """Attach the stub, native mode, to every port of stub_ports()."""
    from .. import bpfsys, loader  # lazily: the rest of the lab works without bcc

    stub, fd = loader.compile_stub()
    try:
        with nsx.in_netns(lay.ns(SW)):  # the ifname resolves in the thread's netns
            for port in stub_ports(lay):
                bpfsys.xdp_attach(socket.if_nametoindex(port), fd, bpfsys.XDP_FLAGS_DRV_MODE)
    finally:
        stub.cleanup()  # closes our fds only; the devices keep their reference to the program


def detach(lay: Layout) -> None:
    """Remove whatever XDP program is on those ports (idempotent)."""
    with nsx.iproute(lay.ns(SW)) as ipr:
        for port in stub_ports(lay):
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], xdp_fd=-1)
