"""Commands on a whole instance: attach, detach, status, top, exporter, doctor, config check."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import click

from ..errors import LbxError
from ..model import XdpMode
from .common import instance, instances, needs_root, print_warnings
from .params import EnumChoice

if TYPE_CHECKING:
    from ..view import BackendStatus, InstanceStatus


@click.command()
@click.argument("ifname")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML file with the VIPs and backends.")
@click.option("--mode", type=EnumChoice(XdpMode), default=XdpMode.AUTO.value, show_default=True,
              help="XDP mode; auto tries native and falls back to generic with a warning.")
@click.option("--force", is_flag=True, help="Replace an XDP program that lbxdp did not attach.")
@click.option("--allow-empty", is_flag=True, help="Let a config without [[vip]] remove all VIPs of an attached "
              "instance (without it, such a config is refused: a truncated file must not clear the balancer).")
@click.pass_context
@needs_root
def attach(ctx: click.Context, ifname: str, config_path: str, mode: XdpMode, force: bool, allow_empty: bool) -> None:
    """Compile the XDP program, attach it to IFNAME, and load the VIPs of --config.

    Maps are pinned under /sys/fs/bpf/lbxdp/IFNAME/; attaching again upgrades the program in
    place and applies the config as a minimal diff, keeping the connection table.

    \b
    Example: sudo lbxdp attach eth0 --config lb.toml --mode native
    """
    from .. import config, control
    inst = instance(ctx, ifname)   # a bad name is refused before anything is read
    cfg = config.load(config_path)
    print_warnings(config.warnings(cfg))
    res = control.attach(inst, cfg, mode, force, config_path=os.path.abspath(config_path),
                         allow_empty=allow_empty)
    for line in res.diff.lines:
        click.echo(f"  {line}")
    if not res.upgraded:
        verb = "attached"
    elif res.recreated or res.migrated:
        how = ([f"maps migrated to the new layout: {', '.join(res.migrated)}"] if res.migrated else []) + \
              ([f"maps recreated, their entries lost: {', '.join(res.recreated)}"] if res.recreated else [])
        verb = f"re-attached ({'; '.join(how)}; the others kept)"
    else:
        verb = "re-attached (maps kept)"
    click.echo(f"{verb} to {inst.label} ({res.mode}, program id {res.prog_id}); "
               f"{len(cfg.vips)} VIPs, {sum(len(v.backends) for v in cfg.vips)} backends")


@click.command()
@click.argument("ifname")
@click.pass_context
@needs_root
def detach(ctx: click.Context, ifname: str) -> None:
    """Remove the program from IFNAME and delete its pinned maps."""
    from .. import control
    inst = instance(ctx, ifname)
    if control.detach(inst):
        click.echo(f"detached from {inst.label}")
    else:
        click.echo(f"lbxdp was not attached to {inst.label}; nothing to do")


@click.command()
@click.argument("ifname", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def status(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """Show mode, VIPs, backends and counters read from the pinned maps.

    Without IFNAME: every interface lbxdp is attached to (in this namespace).
    """
    from .. import control
    reports = [control.status(i) for i in instances(ctx, ifname)]
    if as_json:
        docs = [r.to_json() for r in reports]
        click.echo(json.dumps(docs if not ifname else docs[0], indent=2))
        return
    for r in reports:
        print_status(r)


def _health_text(b: BackendStatus) -> str:
    h = b.health
    if h.state == "unchecked":
        return "-"
    out = h.state + (" (forced)" if h.forced else "") + (" (passive health)" if h.cause == "passive" else "")
    if h.since:
        out += f" for {max(0, time.time() - h.since):.0f}s"
    if h.last_check:
        out += f" ({h.last_check}" + (f", {h.latency * 1000:.1f} ms)" if h.latency is not None else ")")
    return out


def print_status(r: InstanceStatus) -> None:
    from ..view import NO_ADMISSION
    x, st = r.xdp, r.state
    where = r.interface + (f" (netns {r.netns})" if r.netns else "")
    if x.attached:
        click.echo(f"{where}: attached, {x.mode}, program id {x.prog_id}"
                   + (f", config {st.config}" if st.config else ""))
        if x.trace:
            click.echo(f"  {x.trace.text()}")
    else:
        click.echo(f"{where}: maps pinned at {r.pin_dir} but no XDP program is attached"
                   + (f" ({x.error})" if x.error else ""))
    if r.config_source:
        from ..etcdsrc import source_text
        click.echo(f"  {source_text(r.config_source)}")
    if r.bgp:   # issue 14: announcements and sessions (lbxdp.bgp)
        from .node import text as bgp_text
        for line in bgp_text(r.bgp):
            click.echo(f"  {line}")
    click.echo(f"  connection table: {r.flow_entries} / {r.flow_capacity} entries")
    click.echo(f"  {r.gate.text()}")
    if r.admission != NO_ADMISSION:
        click.echo(f"  admission of new flows (every VIP): {r.admission.text()}")
    for line in r.nat.text() if r.nat else ():
        click.echo(f"  {line}")
    if r.quic.active:
        click.echo(f"  {r.quic.text()}")
    row = "  {:<34} {:>6} {:>12} {:>14} {:>10}  {}"
    click.echo(row.format("VIP / backend", "sched", "packets", "bytes", "new flows", "health (last check)"))
    for v in r.vips:
        click.echo(row.format(f"{v.name} ({v.mode})", v.scheduler, v.stats.packets, v.stats.bytes,
                              v.stats.new_flows, ""))
        if v.admission != NO_ADMISSION:
            click.echo(f"    admission: {v.admission.text()}")
        for line in v.lines():   # QUIC routing, backup overflows (issue 13)
            click.echo(f"    {line}")
        for b in v.backends:
            mark = "" if b.in_table else " (not in table)"
            click.echo(row.format(f"  {b.name}{mark}", "", b.stats.packets, b.stats.bytes, b.stats.new_flows,
                                  _health_text(b)))
            if b.handshakes is not None:
                hs = b.handshakes
                click.echo(f"      handshakes: {hs.synack} ok, {hs.syn_rst} rst, {hs.syn_retx} syn retransmitted; "
                           f"{hs.consecutive} failed in a row")
            if b.conns is not None:
                cap = f" of max {b.conns.max_conns}, {b.conns.cap_hits} new flows turned away at the cap" \
                    if b.conns.max_conns else ""
                click.echo(f"      connections: {b.conns.open} open{cap}")
    click.echo("  verdicts by reason:")
    for reason in r.reasons:
        if reason.packets:
            click.echo(f"    {reason.reason.verdict:<6} {reason.reason.label:<24} {reason.packets:>12} packets "
                       f"{reason.bytes:>14} bytes")


@click.command()
@click.argument("ifname", required=False)
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help="Refresh period; rates are over this period.")
@click.option("--once", is_flag=True, help="Print one frame (rates over one interval) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: one JSON array of instances per "
              "interval (with --once, just one).")
@click.pass_context
@needs_root
def top(ctx: click.Context, ifname: str | None, interval: float, once: bool, as_json: bool) -> None:
    """Live packets/s, bits/s and new flows/s per VIP and backend, and verdicts by reason.

    Without IFNAME: every interface lbxdp is attached to (in this namespace). Reads what
    `lbxdp status` reads, once per interval. q or Ctrl-C quits.

    \b
    Examples:
      sudo lbxdp top eth0
      sudo lbxdp top eth0 --once --interval 5 --json
    """
    from .. import control
    from .. import top as live
    insts = instances(ctx, ifname)
    live.run(lambda: [control.status(i) for i in insts], interval, once_=once, as_json=as_json)


@click.command()
@click.argument("ifnames", metavar="[IFNAME]...", nargs=-1)
@click.option("--listen", default="127.0.0.1:9842", show_default=True, metavar="ADDRESS:PORT",
              help="Where to serve /metrics. 9842 is lbxdp's port; any address other than localhost "
              "must be given explicitly (e.g. 0.0.0.0:9842 or [::]:9842).")
@click.pass_context
@needs_root
def exporter(ctx: click.Context, ifnames: tuple[str, ...], listen: str) -> None:
    """Serve Prometheus metrics for IFNAMEs (default: every attached interface here).

    Runs in the foreground until SIGINT/SIGTERM. Counters are read from the pinned maps at each
    scrape (no polling); an interface that cannot be read shows as lbxdp_up 0. With --netns,
    it serves the instances of that namespace and listens inside it. This is the standalone
    form until the `lbxdp run` daemon exists, which will serve the same metrics.

    \b
    Example: sudo lbxdp exporter eth0 --listen 127.0.0.1:9842
    """
    from .. import exporter as exp
    exp.serve(exp.PinnedMaps(ctx.obj.get("netns"), ifnames), listen, echo=lambda s: click.echo(s))


@click.group("config")
def config_group() -> None:
    """Work with config files."""


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a config file without touching anything."""
    from .. import config
    cfg = config.load(path)
    print_warnings(config.warnings(cfg))
    click.echo(f"{path}: ok, {len(cfg.vips)} VIPs, {sum(len(v.backends) for v in cfg.vips)} backends")


@click.command()
@click.argument("ifname", required=False)
@click.pass_context
def doctor(ctx: click.Context, ifname: str | None) -> None:
    """Check that this machine can run lbxdp, and print the fix for each problem.

    With IFNAME, also check XDP support on that interface.
    """
    from .. import doctor as doc
    ok = doc.run(instance(ctx, ifname) if ifname else None, click.echo)
    if not ok:
        raise LbxError("some checks failed", "apply the fixes above, then run `lbxdp doctor` again")


COMMANDS = (attach, detach, status, exporter, config_group, doctor, top)
