/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * xdp_stub: pass every frame up the stack unchanged.
 *
 * Why it exists: a veth delivers frames that its peer sent with XDP_TX or XDP_REDIRECT
 * (veth_xdp_xmit) only if the receiving end has NAPI running, which for veth means an XDP
 * program is attached to it in native mode. Without it those frames are silently dropped and
 * counted as tx errors on the sender. GRO on the peer (NAPI since 5.13) is not enough for XDP_TX:
 * the frames are queued and the peer is never woken to take them (measured: lbxdp/veth.py).
 * The namespace rig (lbxdp/lab/stub.py, Rig.attach_peer_stub) attaches this program to the
 * balancer's peer port in the switch namespace whenever the balancer runs in native mode.
 * Generic (skb) mode does not need it: XDP_TX there goes through the normal transmit path.
 *
 * Compiled by bcc (which includes the uapi headers that define struct xdp_md and XDP_PASS).
 */
int xdp_stub(struct xdp_md *ctx)
{
	return XDP_PASS;
}
