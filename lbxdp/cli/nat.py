"""`lbxdp nat ls`: the NAT connections (lbxdp.conntrack over the pinned lbx_nat), and `lbxdp nat
status`: the conntrack and SNAT pool summary that `lbxdp status` also shows."""

from __future__ import annotations

import json

import click

from .common import pick_instance
from .edit import listing


@click.group()
def nat() -> None:
    """NAT connections and the SNAT pool (mode = "nat" VIPs).

    \b
    Examples:
      lbxdp nat ls
      lbxdp nat ls --limit 20 --json
      lbxdp nat status --json
    """


@nat.command("ls")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N", help="At most N connections (oldest first).")
@click.option("--expired", is_flag=True, help="Also connections past their timeout not yet collected.")
@listing
def nat_ls(ctx: click.Context, ifname: str | None, as_json: bool, limit: int | None, expired: bool) -> None:
    """List connections: protocol, client, VIP, backend, SNAT address:port, state, age, idle."""
    from .. import conntrack, control
    with control.open_maps(pick_instance(ctx, ifname)) as m:
        conns = conntrack.connections(m, limit, expired)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in conns], indent=2))
        return
    fmt = "{:<5} {:<44} {:<44} {:<44} {:<44} {:<12} {:>8} {:>8}"
    click.echo(fmt.format("PROTO", "CLIENT", "VIP", "BACKEND", "SNAT", "STATE", "AGE", "IDLE"))
    for c in conns:
        state = c.state + ("" if c.assured else " (handshake)") + (" (expired)" if c.expired else "")
        click.echo(fmt.format(c.protocol, c.client, c.vip, c.backend, c.snat or "-", state,
                              f"{c.age:.1f}s", f"{c.idle:.1f}s"))


@nat.command("status")
@listing
def nat_status(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """Conntrack entries by direction and state, SNAT pool size and ports in use."""
    from .. import conntrack, control
    with control.open_maps(pick_instance(ctx, ifname)) as m:
        st = conntrack.summarize(m)
    if as_json:
        click.echo(json.dumps(st.to_json() if st else None, indent=2))
        return
    click.echo("\n".join(st.text()) if st else "this program has no NAT maps (re-attach to upgrade it)")


COMMANDS = (nat,)
