"""The lab's commands: `lbxdp demo` and `lbxdp rig` (lbxdp.lab; never imported by the product)."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from ..errors import LbxError
from ..model import Scheduler, XdpMode
from .common import needs_root
from .params import EnumChoice

DEMO_MODES = EnumChoice(XdpMode, only=(XdpMode.NATIVE, XdpMode.GENERIC))
RIG_SCHEDULERS = EnumChoice(Scheduler, only=(Scheduler.RR, Scheduler.HASH))
RIG_SHAPES = ("l2", "nat")   # the shapes `rig config` writes a config for (routed and multi need decap/BGP)


@click.command()
@click.option("--backends", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--connections", default=30, show_default=True, type=click.IntRange(1, 1000),
              help="TCP connections and UDP datagrams per VIP.")
@click.option("--mode", type=DEMO_MODES, default=XdpMode.NATIVE.value, show_default=True)
@click.option("--scheduler", type=RIG_SCHEDULERS, default=Scheduler.RR.value, show_default=True)
@needs_root
def demo(backends: int, connections: int, mode: XdpMode, scheduler: Scheduler) -> None:
    """Build a namespace rig, balance real TCP and UDP over v4 and v6 VIPs, show the counts, clean up."""
    from ..lab import demo as d
    d.run(backends=backends, connections=connections, mode=mode.value, scheduler=scheduler.value, echo=click.echo)


@click.group()
def rig() -> None:
    """Keep a namespace rig up for manual play (the demo's rig, without the demo)."""


@rig.command("up")
@click.option("--backends", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--prefix", help="Name the rig (2-12 characters, a-z then a-z/0-9; its namespaces are "
              "PREFIX-cli, PREFIX-lb, ...). Default: lbx + 5 random hex digits.")
@click.option("--shape", type=click.Choice(RIG_SHAPES), default="l2", show_default=True,
              help="l2: client, balancer and backends on one segment (DSR); nat: the same segment, the "
              "backends route the client through the balancer (`rig config` then writes NAT VIPs).")
@needs_root
def rig_up(backends: int, prefix: str | None, shape: str) -> None:
    """Build a rig that stays up; prints its prefix and what to try."""
    from ..lab.rig import Rig, RigSpec
    if prefix is not None:
        _check_new_prefix(prefix)
    spec = RigSpec(backends=backends, shape=shape) if prefix is None else \
        RigSpec(backends=backends, prefix=prefix, shape=shape)
    r = Rig(spec).up(persistent=True)
    p = r.spec.prefix
    click.echo(f"rig {p} is up: namespaces {', '.join(r.ns(x) for x in ['cli', 'lb', *r.backends])}")
    click.echo(f"  config for the balancer:  lbxdp rig config {p} > lb.toml")
    click.echo(f"  attach:                   lbxdp --netns {r.ns('lb')} attach eth0 --config lb.toml --mode generic")
    click.echo(f"  try it:                   lbxdp rig exec --prefix {p} cli -- {sys.executable} -m lbxdp.lab.echo client tcp {r.spec.vip4} {r.spec.port} --count 9")
    click.echo(f"  remove it:                lbxdp --netns {r.ns('lb')} detach eth0; lbxdp rig down {p}")


_PREFIX = r"[a-z][a-z0-9]{1,11}"


def _check_new_prefix(prefix: str) -> None:
    """A prefix for a new rig: the rig's own syntax, and no rig or namespace already using it."""
    from pyroute2 import netns as pr_netns

    from ..lab.rig import Rig
    if not re.fullmatch(_PREFIX, prefix):
        raise LbxError(f"rig prefix {prefix!r} is not 2-12 characters of a-z and 0-9 starting with a letter",
                       "e.g. --prefix lab1", exit_code=2)
    if Rig.state_path(prefix).exists() or any(n.startswith(prefix + "-") for n in pr_netns.listnetns()):
        raise LbxError(f"rig prefix {prefix} is in use (a rig or namespaces {prefix}-* exist)",
                       f"pick another, or remove that rig: lbxdp rig down {prefix}", exit_code=2)


def _rigs(prefix: str | None = None) -> list:
    """The rigs that are up (only PREFIX's if given; an error if none)."""
    from ..lab.rig import Rig
    found = [Rig.load_state(p) for p in Rig.state_files()]
    found = [r for r in found if prefix in (None, r.spec.prefix)]
    if not found:
        raise LbxError("no rig is up" + (f" with prefix {prefix}" if prefix else ""), "start one: lbxdp rig up",
                       exit_code=2 if prefix else 1)
    return found


def _one_rig(prefix: str | None) -> Any:
    """PREFIX's rig, or the only one up; several up and no PREFIX is an error (never a guess)."""
    found = _rigs(prefix)
    if len(found) > 1:
        raise LbxError(f"{len(found)} rigs are up ({', '.join(r.spec.prefix for r in found)}): say which",
                       "pass --prefix PREFIX", exit_code=2)
    return found[0]


@rig.command("config")
@click.argument("prefix", required=False)
@click.option("--scheduler", type=RIG_SCHEDULERS, default=Scheduler.RR.value, show_default=True)
@needs_root
def rig_config(prefix: str | None, scheduler: Scheduler) -> None:
    """Print an lbxdp config for the rig's VIPs and backends.

    PREFIX may be left out only while a single rig is up. A nat rig gets NAT VIPs (DNAT: the
    backends see the client's address and answer through the balancer)."""
    r = _one_rig(prefix)
    if r.spec.shape.value == "nat":
        click.echo(r.nat_config_toml(*(r.nat_vip(v, p, scheduler=scheduler.value)
                                       for v in (4, 6) for p in ("tcp", "udp"))))
    else:
        click.echo(r.lb_config_toml(scheduler=scheduler.value, with_mac=False))


@rig.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("role")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--prefix", help="Which rig; required when more than one is up.")
@needs_root
def rig_exec(role: str, argv: tuple[str, ...], prefix: str | None) -> None:
    """Run a command on host ROLE (cli, lb, be1, ...) of the rig.

    \b
    Without --prefix, only while a single rig is up (with several, it refuses rather than pick).
    Example: lbxdp rig exec --prefix lbx3f2a1 cli -- ip -br addr
    """
    r = _one_rig(prefix)
    proc = r.run(role, *argv, check=False, timeout=600)
    click.echo(proc.stdout, nl=False)
    click.echo(proc.stderr, nl=False, err=True)
    sys.exit(proc.returncode)


@rig.command("down")
@click.argument("prefix", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove every rig this machine has up.")
@needs_root
def rig_down(prefix: str | None, all_: bool) -> None:
    """Remove rig PREFIX (or every rig, with --all): servers, namespaces, state."""
    if (prefix is None) == (not all_):
        from ..lab.rig import Rig
        up = ", ".join(Rig.load_state(f).spec.prefix for f in Rig.state_files()) if prefix is None else ""
        raise LbxError("say which rig to remove: a PREFIX" + (f" (up: {up})" if up else "") + ", or --all"
                       if prefix is None else "give a PREFIX or --all, not both",
                       "lbxdp rig down PREFIX, or lbxdp rig down --all", exit_code=2)
    for r in _rigs(prefix):
        r.down()
        click.echo(f"rig {r.spec.prefix} removed")


COMMANDS = (demo, rig)
