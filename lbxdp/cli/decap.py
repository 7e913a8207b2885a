"""`lbxdp decap attach|status|detach`: the backend's decapsulation program (lbxdp.decap)."""

from __future__ import annotations

import json

import click

from .common import instance, instances, needs_root

NOT_ATTACHED = ("lbxdp decap is not attached to any interface here", "attach it: lbxdp decap attach IFNAME --vip ADDR")


def _instance(ctx: click.Context, ifname: str):   # noqa: ANN202 - DecapInstance, imported lazily
    from ..decap import DecapInstance
    return instance(ctx, ifname, DecapInstance)


@click.group()
def decap() -> None:
    """Open lbxdp's tunnels on a backend (IPIP, IP6IP6, 4-in-6, GUE) without tunnel modules.

    An XDP program strips the outer header of tunnel packets sent to one of this host's
    addresses whose inner destination is a VIP (--vip; --loose: any), and passes the inner
    packet to the stack, which must own the VIP (put it on lo). Everything else passes untouched.
    XDP, not tc: generic XDP (--mode generic) runs on any interface, so no tc fallback is built;
    tc (bpf_skb_adjust_room) would only be needed where no XDP program may be attached at all.

    \b
    Example: sudo lbxdp decap attach eth0 --vip 10.0.0.10 --vip fd00::10
             sudo lbxdp decap status eth0
             sudo lbxdp decap detach eth0
    """


@decap.command("attach")
@click.argument("ifname")
@click.option("--vip", "vips", multiple=True, metavar="ADDR",
              help="A VIP this backend serves (repeatable): only inner packets to it are opened.")
@click.option("--gue-port", type=int, default=6080, show_default=True,
              help="UDP port of GUE (0: GUE off). Must match the balancer's gue_port.")
@click.option("--mode", type=click.Choice(["auto", "native", "generic"]), default="auto", show_default=True,
              help="XDP mode; auto tries native and falls back to generic.")
@click.option("--loose", is_flag=True, help="Open tunnels whatever the inner destination (not only --vip).")
@click.option("--force", is_flag=True, help="Replace an XDP program lbxdp decap did not attach.")
@click.pass_context
@needs_root
def attach(ctx: click.Context, ifname: str, vips: tuple[str, ...], gue_port: int, mode: str, loose: bool,
           force: bool) -> None:
    """Attach the decapsulation program to IFNAME (again: refresh addresses and VIPs).

    The host's addresses (the outer destinations accepted) are read now; run it again after
    they change. Pins: /sys/fs/bpf/lbxdp-decap/IFNAME/.
    """
    from .. import decap as dc
    inst = _instance(ctx, ifname)
    res = dc.attach(inst, vips, gue_port, mode, loose, force)
    verb = "re-attached" + (" (program changed: counters reset)" if res.counters_reset else "") \
        if res.upgraded else "attached"
    click.echo(f"decap {verb} to {inst.label} ({res.mode}, program id {res.prog_id}); "
               f"host addresses: {', '.join(map(str, res.addresses))}; "
               f"VIPs: {', '.join(map(str, res.vips)) or '(any: loose)'}; GUE port {gue_port or 'off'}")


@decap.command("detach")
@click.argument("ifname")
@click.pass_context
@needs_root
def detach(ctx: click.Context, ifname: str) -> None:
    """Remove the decapsulation program from IFNAME and delete its pins."""
    from .. import decap as dc
    inst = _instance(ctx, ifname)
    if dc.detach(inst):
        click.echo(f"decap detached from {inst.label}")
    else:
        click.echo(f"lbxdp decap was not attached to {inst.label}; nothing to do")


@decap.command("status")
@click.argument("ifname", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def status(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """VIPs, host addresses, counters by reason and packets per VIP (of IFNAME, or every one)."""
    from .. import decap as dc
    sts = [dc.status(i) for i in instances(ctx, ifname, dc.DecapInstance, NOT_ATTACHED)]
    if as_json:
        doc = [s.to_json() for s in sts]
        click.echo(json.dumps(doc[0] if ifname else doc, indent=2))
    else:
        click.echo("\n".join(dc.format_status(s) for s in sts))


COMMANDS = (decap,)
