"""What every command module of the CLI shares: the root check, which instance a command is
about, and how warnings and diffs are printed."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from ..errors import LbxError
from ..paths import Instance

IFACE_HELP = "Interface of the balancer (default: the only one lbxdp is attached to here)."
NOT_ATTACHED = ("lbxdp is not attached to any interface here", "attach it: lbxdp attach IFNAME --config FILE")


def needs_root(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.geteuid() != 0:
            raise LbxError("this command needs root (it loads BPF programs and changes interfaces)",
                           "run it with sudo: sudo lbxdp " + " ".join(sys.argv[1:]))
        return fn(*args, **kwargs)
    return wrapper


def print_warnings(warnings: list[str]) -> None:
    """Valid but probably not meant (config.warnings): one `lbxdp: warning: ...` line each."""
    for w in warnings:
        click.echo(f"lbxdp: warning: {w}", err=True)


def instance(ctx: click.Context, ifname: str, kind: type[Instance] = Instance) -> Instance:
    """kind: the balancer's Instance, or lbxdp.decap.DecapInstance for `lbxdp decap`."""
    return kind(ifname, ctx.obj.get("netns"))


def instances_here(ctx: click.Context, kind: type[Instance] = Instance) -> list[Instance]:
    """Every instance of the namespace the command works in."""
    netns = ctx.obj.get("netns")
    return [i for i in kind.all() if i.netns == netns]


def instances(ctx: click.Context, ifname: str | None, kind: type[Instance] = Instance,
              not_attached: tuple[str, str] = NOT_ATTACHED) -> list[Instance]:
    """IFNAME's instance, or every one here; none is an error (not_attached: its message and hint)."""
    found = [instance(ctx, ifname, kind)] if ifname else instances_here(ctx, kind)
    if not found:
        raise LbxError(*not_attached)
    return found


def pick_instance(ctx: click.Context, ifname: str | None) -> Instance:
    """IFNAME's instance, or the only one here (several: say which)."""
    if ifname:
        return instance(ctx, ifname)
    found = instances(ctx, None)
    if len(found) > 1:
        raise LbxError(f"lbxdp is attached to {len(found)} interfaces here ({', '.join(i.ifname for i in found)})",
                       "say which one with -i IFNAME")
    return found[0]


def show_diff(diff: Any) -> None:
    for line in diff.lines:
        click.echo(f"  {line}")
    if diff.empty:
        click.echo("  (no change)")
