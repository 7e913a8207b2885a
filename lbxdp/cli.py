"""The `lbxdp` command. Thin: parse, call the control plane, print. Failures say what to do.

bcc is imported only when a command compiles something, so `lbxdp --help` works anywhere.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import click

from . import __version__
from .errors import LbxError
from .model import XdpMode
from .paths import Instance, check_netns

log = logging.getLogger("lbxdp")

EPILOG = """\b
Examples:
  sudo lbxdp doctor eth0
  sudo lbxdp attach eth0 --config /etc/lbxdp/lb.toml
  sudo lbxdp status eth0 --json
  sudo lbxdp exporter eth0 --listen 127.0.0.1:9842
  sudo lbxdp detach eth0
  sudo lbxdp demo
"""


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


def instance(ctx: click.Context, ifname: str) -> Instance:
    return Instance(ifname, ctx.obj.get("netns"))


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lbxdp")
@click.option("--netns", metavar="NAME", help="Work inside network namespace NAME (as created by `ip netns add`). "
              "Unlike `ip netns exec`, this keeps the host's bpffs, so pins outlive the command.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, netns: str | None, verbose: int) -> None:
    """lbxdp: a Layer-4 load balancer on XDP."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="lbxdp: %(levelname)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["netns"] = netns
    if netns is not None:
        check_netns(netns)   # before it becomes part of a path
    if netns and ctx.invoked_subcommand not in ("rig", "demo", "config"):
        if ctx.invoked_subcommand == "detach" and not os.path.exists(f"/var/run/netns/{netns}"):
            return  # the namespace is gone with its interface: detach only removes the pins
        enter_netns(netns)


def enter_netns(name: str) -> None:
    """Move this process into network namespace NAME; its mount namespace (bpffs) stays."""
    if not os.path.exists(f"/var/run/netns/{name}"):
        raise LbxError(f"no network namespace named {name!r}", "list them with `ip netns list`")
    from pyroute2 import netns as pr_netns
    try:
        pr_netns.setns(name, flags=0)
    except OSError as e:
        raise LbxError(f"cannot enter network namespace {name!r}: {e.strerror}", "run as root") from e


@cli.command()
@click.argument("ifname")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML file with the VIPs and backends.")
@click.option("--mode", type=click.Choice([m.value for m in XdpMode]), default=XdpMode.AUTO.value, show_default=True,
              help="XDP mode; auto tries native and falls back to generic with a warning.")
@click.option("--force", is_flag=True, help="Replace an XDP program that lbxdp did not attach.")
@click.option("--allow-empty", is_flag=True, help="Let a config without [[vip]] remove all VIPs of an attached "
              "instance (without it, such a config is refused: a truncated file must not clear the balancer).")
@click.pass_context
@needs_root
def attach(ctx: click.Context, ifname: str, config_path: str, mode: str, force: bool, allow_empty: bool) -> None:
    """Compile the XDP program, attach it to IFNAME, and load the VIPs of --config.

    Maps are pinned under /sys/fs/bpf/lbxdp/IFNAME/; attaching again upgrades the program in
    place and applies the config as a minimal diff, keeping the connection table.

    \b
    Example: sudo lbxdp attach eth0 --config lb.toml --mode native
    """
    from . import config, control
    inst = instance(ctx, ifname)   # a bad name is refused before anything is read
    cfg = config.load(config_path)
    print_warnings(config.warnings(cfg))
    res = control.attach(inst, cfg, XdpMode(mode), force, config_path=os.path.abspath(config_path),
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


@cli.command()
@click.argument("ifname")
@click.pass_context
@needs_root
def detach(ctx: click.Context, ifname: str) -> None:
    """Remove the program from IFNAME and delete its pinned maps."""
    from . import control
    inst = instance(ctx, ifname)
    if control.detach(inst):
        click.echo(f"detached from {inst.label}")
    else:
        click.echo(f"lbxdp was not attached to {inst.label}; nothing to do")


@cli.command()
@click.argument("ifname", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def status(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """Show mode, VIPs, backends and counters read from the pinned maps.

    Without IFNAME: every interface lbxdp is attached to (in this namespace).
    """
    from . import control
    netns = ctx.obj.get("netns")
    insts = [instance(ctx, ifname)] if ifname else [i for i in Instance.all() if i.netns == netns]
    if not insts:
        raise LbxError("lbxdp is not attached to any interface here", "attach it: lbxdp attach IFNAME --config FILE")
    reports = [control.status(i) for i in insts]
    if as_json:
        click.echo(json.dumps(reports if not ifname else reports[0], indent=2))
        return
    for r in reports:
        print_status(r)


def _health_text(b: dict[str, Any]) -> str:
    h = b.get("health", "unchecked")
    if h == "unchecked":
        return "-"
    out = h + (" (forced)" if b.get("forced") else "")
    if b.get("health_since"):
        out += f" for {max(0, time.time() - b['health_since']):.0f}s"
    if b.get("last_check"):
        lat = b.get("check_latency")
        out += f" ({b['last_check']}" + (f", {lat * 1000:.1f} ms)" if lat is not None else ")")
    return out


def print_status(r: dict[str, Any]) -> None:
    x, st = r["xdp"], r["state"]
    where = r["interface"] + (f" (netns {r['netns']})" if r["netns"] else "")
    if x.get("attached"):
        click.echo(f"{where}: attached, {x['mode']}, program id {x['prog_id']}"
                   + (f", config {st['config']}" if st.get("config") else ""))
    else:
        click.echo(f"{where}: maps pinned at {r['pin_dir']} but no XDP program is attached"
                   + (f" ({x['error']})" if x.get("error") else ""))
    click.echo(f"  connection table: {r['flows']['entries']} / {r['flows']['capacity']} entries")
    row = "  {:<34} {:>6} {:>12} {:>14} {:>10}  {}"
    click.echo(row.format("VIP / backend", "sched", "packets", "bytes", "new flows", "health (last check)"))
    for v in r["vips"]:
        click.echo(row.format(f"{v['vip']} ({v['mode']})", v["scheduler"], v["packets"], v["bytes"], v["new_flows"], ""))
        for b in v["backends"]:
            mark = "" if b["in_table"] else " (not in table)"
            click.echo(row.format(f"  {b['backend']}{mark}", "", b["packets"], b["bytes"], b["new_flows"],
                                  _health_text(b)))
    click.echo("  verdicts by reason:")
    for reason in r["reasons"]:
        if reason["packets"]:
            click.echo(f"    {reason['verdict']:<6} {reason['reason']:<24} {reason['packets']:>12} packets "
                       f"{reason['bytes']:>14} bytes")


@cli.command()
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
    from . import exporter as exp
    exp.serve(exp.PinnedMaps(ctx.obj.get("netns"), ifnames), listen, echo=lambda s: click.echo(s))


@cli.group("config")
def config_group() -> None:
    """Work with config files."""


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a config file without touching anything."""
    from . import config
    cfg = config.load(path)
    print_warnings(config.warnings(cfg))
    click.echo(f"{path}: ok, {len(cfg.vips)} VIPs, {sum(len(v.backends) for v in cfg.vips)} backends")


@cli.command()
@click.argument("ifname", required=False)
@click.pass_context
def doctor(ctx: click.Context, ifname: str | None) -> None:
    """Check that this machine can run lbxdp, and print the fix for each problem.

    With IFNAME, also check XDP support on that interface.
    """
    from . import doctor as doc
    ok = doc.run(instance(ctx, ifname) if ifname else None, click.echo)
    if not ok:
        raise LbxError("some checks failed", "apply the fixes above, then run `lbxdp doctor` again")


@cli.command()
@click.option("--backends", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--connections", default=30, show_default=True, type=click.IntRange(1, 1000),
              help="TCP connections and UDP datagrams per VIP.")
@click.option("--mode", type=click.Choice(["native", "generic"]), default="native", show_default=True)
@click.option("--scheduler", type=click.Choice(["rr", "hash"]), default="rr", show_default=True)
@needs_root
def demo(backends: int, connections: int, mode: str, scheduler: str) -> None:
    """Build a namespace rig, balance real TCP and UDP over v4 and v6 VIPs, show the counts, clean up."""
    from .lab import demo as d
    d.run(backends=backends, connections=connections, mode=mode, scheduler=scheduler, echo=click.echo)


@cli.group()
def rig() -> None:
    """Keep a namespace rig up for manual play (the demo's rig, without the demo)."""


@rig.command("up")
@click.option("--backends", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--prefix", help="Name the rig (2-12 characters, a-z then a-z/0-9; its namespaces are "
              "PREFIX-cli, PREFIX-lb, ...). Default: lbx + 5 random hex digits.")
@needs_root
def rig_up(backends: int, prefix: str | None) -> None:
    """Build a rig that stays up; prints its prefix and what to try."""
    from .lab.rig import Rig, RigSpec
    if prefix is not None:
        _check_new_prefix(prefix)
    spec = RigSpec(backends=backends) if prefix is None else RigSpec(backends=backends, prefix=prefix)
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
    import re

    from pyroute2 import netns as pr_netns

    from .lab.rig import Rig
    if not re.fullmatch(_PREFIX, prefix):
        raise LbxError(f"rig prefix {prefix!r} is not 2-12 characters of a-z and 0-9 starting with a letter",
                       "e.g. --prefix lab1", exit_code=2)
    if Rig.state_path(prefix).exists() or any(n.startswith(prefix + "-") for n in pr_netns.listnetns()):
        raise LbxError(f"rig prefix {prefix} is in use (a rig or namespaces {prefix}-* exist)",
                       f"pick another, or remove that rig: lbxdp rig down {prefix}", exit_code=2)


def _rigs(prefix: str | None = None) -> list:
    """The rigs that are up (only PREFIX's if given; an error if none)."""
    from .lab.rig import Rig
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
@click.option("--scheduler", type=click.Choice(["rr", "hash"]), default="rr", show_default=True)
@needs_root
def rig_config(prefix: str | None, scheduler: str) -> None:
    """Print an lbxdp config for the rig's VIPs and backends.

    PREFIX may be left out only while a single rig is up."""
    click.echo(_one_rig(prefix).lb_config_toml(scheduler=scheduler, with_mac=False))


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
        from .lab.rig import Rig
        up = ", ".join(Rig.load_state(f).spec.prefix for f in Rig.state_files()) if prefix is None else ""
        raise LbxError("say which rig to remove: a PREFIX" + (f" (up: {up})" if up else "") + ", or --all"
                       if prefix is None else "give a PREFIX or --all, not both",
                       "lbxdp rig down PREFIX, or lbxdp rig down --all", exit_code=2)
    for r in _rigs(prefix):
        r.down()
        click.echo(f"rig {r.spec.prefix} removed")


@cli.command()
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
    from . import control
    from . import top as live
    netns = ctx.obj.get("netns")
    insts = [instance(ctx, ifname)] if ifname else [i for i in Instance.all() if i.netns == netns]
    if not insts:
        raise LbxError("lbxdp is not attached to any interface here", "attach it: lbxdp attach IFNAME --config FILE")
    live.run(lambda: [control.status(i) for i in insts], interval, once_=once, as_json=as_json)


from . import cli_ops  # noqa: E402,F401 - registers vip, backend, run, reload on `cli`


def main() -> None:
    """Entry point: LbxError becomes one clean error line and its exit code, never a traceback."""
    try:
        cli.main(standalone_mode=False, prog_name="lbxdp")
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LbxError as e:
        click.echo(f"lbxdp: error: {e.message}", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        # Kernel refusals (EPERM, EBUSY, ...) are not bugs of lbxdp; say what failed.
        click.echo(f"lbxdp: error: {e}", err=True)
        click.echo("  hint: run `lbxdp doctor` to check this machine", err=True)
        sys.exit(1)

