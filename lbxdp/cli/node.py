"""`lbxdp node drain|undrain|bgp`: this node's part in a BGP scale-out (lbxdp.bgp, issue 14)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import click

from ..errors import LbxError
from ..paths import Instance, atomic_write
from .common import IFACE_HELP, needs_root, pick_instance


@click.group()
def node() -> None:
    """This node in a BGP scale-out: drain it (withdraw its announcements, keep forwarding), undrain
    it, show its announcements and sessions.

    \b
    Examples:
      lbxdp node drain           # withdraw every VIP; flows already here keep being forwarded
      systemctl stop lbxdp@eth0  # ... once they are done (the router sends new ones elsewhere)
      lbxdp node undrain         # announce again
      lbxdp node bgp --json
    """


def _status(inst: Instance) -> dict[str, Any]:
    from .. import bgp, daemon
    if daemon.running_pid(inst) is None:
        raise LbxError(f"no `lbxdp run` daemon is running for {inst.label}: nothing announces its VIPs",
                       f"start one: lbxdp run --config FILE {inst.ifname}")
    st = bgp.read_status(inst)
    if st is None:
        raise LbxError(f"the daemon of {inst.label} announces nothing: its config has no [bgp]",
                       "add a [bgp] section (local_as, [[bgp.neighbor]]) and `lbxdp reload`")
    return st


def _wait(inst: Instance, since: float, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    from .. import bgp
    deadline = time.monotonic() + timeout
    while True:
        st = bgp.read_status(inst) or {}
        if st.get("at", 0) > since and done(st):
            return st
        if time.monotonic() > deadline:
            raise LbxError(f"the daemon of {inst.label} did not confirm within {timeout:g}s (state: "
                           f"{st.get('node', '?')}, announced: {', '.join(st.get('announced', [])) or 'none'}, "
                           f"error: {st.get('error')})", "see its log (journalctl -u lbxdp@IFNAME)")
        time.sleep(0.1)


@node.command()
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the withdrawal.")
@click.pass_context
@needs_root
def drain(ctx: click.Context, ifname: str | None, timeout: float) -> None:
    """Withdraw every announcement of this node; the program keeps forwarding what still arrives."""
    from .. import bgp
    inst = pick_instance(ctx, ifname)
    before = _status(inst)
    t = time.time()
    atomic_write(bgp.drain_file(inst), f"drained at {t:.3f}\n")
    st = _wait(inst, t, lambda s: s.get("node") == "draining" and not s.get("announced"), timeout)
    gone = ", ".join(before.get("announced", [])) or "nothing (none was announced)"
    click.echo(f"{inst.label}: draining; withdrawn: {gone}. The program keeps forwarding the flows that still "
               "arrive; stop the daemon once they are done, or `lbxdp node undrain`.")
    del st


@node.command()
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the daemon.")
@click.pass_context
@needs_root
def undrain(ctx: click.Context, ifname: str | None, timeout: float) -> None:
    """Announce this node's usable VIPs again (the end of `lbxdp node drain`)."""
    from .. import bgp
    inst = pick_instance(ctx, ifname)
    _status(inst)
    t = time.time()
    bgp.drain_file(inst).unlink(missing_ok=True)
    st = _wait(inst, t, lambda s: s.get("node") == "serving", timeout)
    why = {v["prefix"]: v["why"] for v in st.get("vips", {}).values() if not v["announced"]}
    click.echo(f"{inst.label}: serving; announced: {', '.join(st.get('announced', [])) or 'none'}"
               + (f"; not announced: {', '.join(f'{p} ({w})' for p, w in why.items())}" if why else ""))


@node.command("bgp")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the daemon's bgp.json).")
@click.pass_context
@needs_root
def bgp_status(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """This node's announcements (per VIP) and BGP sessions (per neighbour)."""
    inst = pick_instance(ctx, ifname)
    st = _status(inst)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    for line in text(st):
        click.echo(line)


def text(st: dict[str, Any]) -> list[str]:
    """The lines `lbxdp node bgp` and `lbxdp status` print for a bgp.json document."""
    bird = st.get("bird", {})
    out = [f"bgp: node {st.get('node')}, bird pid {bird.get('pid') or '-'} (restarts {bird.get('restarts', 0)})"
           + (f", error: {st['error']}" if st.get("error") else "")]
    for name, v in st.get("vips", {}).items():
        out.append(f"  {name:<28} {v['prefix']:<22} {'announced' if v['announced'] else 'withdrawn'}"
                   + ("" if v["why"] == "usable" else f" ({v['why']})"))
    for n in st.get("neighbors", []):
        out.append(f"  neighbor {n['address']} as {n['as']}{' bfd' if n['bfd'] else ''}: {n['state']} {n['info']}".rstrip())
    return out


COMMANDS = (node,)
