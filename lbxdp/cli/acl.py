"""`lbxdp acl ls|add|del`: the CIDR allow/deny rules of new flows, global or per VIP (--vip).

Each edit is a pure function of lbxdp.edits (acl_add, acl_del) applied through control.edit(),
like the vip and backend verbs: validated with the model's rules, applied as a new multibit trie
and a new kernel LPM trie, each swapped in whole (bpf/acl.h, lbxdp/acl_mbt.py), which also purges
the established flows the new rules refuse.
"""

from __future__ import annotations

import ipaddress
import json

import click

from .. import edits, model
from .common import needs_root, pick_instance
from .edit import iface_option, listing, run_edit
from ..errors import LbxError
from .params import VIP, EnumChoice, _Parsed


class NetworkType(_Parsed):
    """CIDR -> an ip_network (host bits must be zero)."""

    name = "CIDR"

    def parse(self, text: str) -> model.IPNetwork:
        try:
            return ipaddress.ip_network(text)
        except ValueError:
            raise LbxError(f"{text!r} is not a network prefix like 192.0.2.0/24 or 2001:db8::/32",
                           "host bits must be zero (192.0.2.0/24, not 192.0.2.1/24)", exit_code=2) from None


CIDR = NetworkType()


@click.group()
def acl() -> None:
    """CIDR allow/deny rules of new flows: global (every VIP) or one VIP's.

    \b
    A VIP (or the global scope) with an allow list admits new flows only from those prefixes;
    a deny rule refuses its prefix; the longest matching prefix decides; global rules first.
    Established flows of a newly refused source are cut (their entries purged).
    \b
    Examples:
      lbxdp acl add deny 198.51.100.0/24
      lbxdp acl add allow 192.0.2.0/24 --vip 10.0.0.1:80/tcp
      lbxdp acl ls --json
    """


@acl.command("ls")
@listing
def acl_ls(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """List the rules: scope, list, prefix."""
    from .. import applied
    cfg = applied.load(pick_instance(ctx, ifname)).cfg
    rows = [{"scope": "global", "list": which.value, "prefix": str(n)}
            for which in model.AclList for n in getattr(cfg.balancer.admission, which.value)]
    rows += [{"scope": v.name, "list": which.value, "prefix": str(n)}
             for v in cfg.vips for which in model.AclList for n in getattr(v.admission, which.value)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<34} {:<6} {}"
    click.echo(fmt.format("SCOPE", "LIST", "PREFIX"))
    for r in rows:
        click.echo(fmt.format(r["scope"], r["list"], r["prefix"]))


def _edit_command(name: str, fn, doc: str):  # type: ignore[no-untyped-def]
    @acl.command(name, help=doc)
    @click.argument("which", type=EnumChoice(model.AclList), metavar="allow|deny")
    @click.argument("network", type=CIDR)
    @click.option("--vip", "key", type=VIP, default=None, help="The VIP's rules (default: the global ones).")
    @iface_option
    @click.pass_context
    @needs_root
    def cmd(ctx: click.Context, which: model.AclList, network: model.IPNetwork, key: model.VipKey | None,
            ifname: str | None) -> None:
        run_edit(ctx, ifname, f"acl {name}", lambda cfg, now: fn(cfg, model.AclList(which), network, key))
    return cmd


acl_add = _edit_command("add", edits.acl_add, "Add a prefix to the allow or deny list (global or --vip).")
acl_del = _edit_command("del", edits.acl_del, "Remove a prefix from the allow or deny list (global or --vip).")

COMMANDS = (acl,)
