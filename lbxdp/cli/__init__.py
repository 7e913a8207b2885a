"""The `lbxdp` command. Thin: parse, call the control plane, print. Failures say what to do.

One module per kind of command, each listing its COMMANDS, which this group registers (the
modules never import this one, so there is no import circle):
  instance  attach, detach, status, top, exporter, doctor, config check
  edit      vip, backend, flows (the verbs of lbxdp.edits, and the connection table)
  daemon    run, reload
  lab       demo, rig (lbxdp.lab)
  decap     decap attach, status, detach (lbxdp.decap: the backend side)
  nat       nat ls, nat status (NAT connections and the SNAT pool, lbxdp.conntrack)
  inspect   explain, preview backend, trace (lbxdp.explain, lbxdp.trace)
  params    VIP and ADDR:PORT parameter types, enum choices
  cluster   cluster status, config push (lbxdp.etcdsrc: shared config in etcd)
  node      node drain, undrain, bgp (lbxdp.bgp: this node's BGP announcements)
  common    the root check, which instance a command is about

bcc is imported only when a command compiles something, so `lbxdp --help` works anywhere.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from .. import __version__
from ..errors import LbxError
from ..paths import check_netns
from . import acl, cluster, daemon, decap, edit, inspect, instance, lab, nat
from . import node as node_cmds   # `lbxdp node drain|undrain|bgp` (lbxdp.bgp, issue 14)
from .params import BadValue

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


for _cmd in (*instance.COMMANDS, *edit.COMMANDS, *daemon.COMMANDS, *lab.COMMANDS, *decap.COMMANDS,
             *acl.COMMANDS, *nat.COMMANDS, *inspect.COMMANDS, *cluster.COMMANDS,
             *node_cmds.COMMANDS):
    cli.add_command(_cmd)


def _error(message: str, hint: str | None, code: int) -> None:
    click.echo(f"lbxdp: error: {message}", err=True)
    if hint:
        click.echo(f"  hint: {hint}", err=True)
    sys.exit(code)


def main() -> None:
    """Entry point: LbxError becomes one clean error line and its exit code, never a traceback."""
    try:
        cli.main(standalone_mode=False, prog_name="lbxdp")
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except BadValue as e:   # a VIP or ADDR:PORT that does not parse: lbxdp's words, exit 2
        _error(e.message, e.hint, e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LbxError as e:
        _error(e.message, e.hint, e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        # Kernel refusals (EPERM, EBUSY, ...) are not bugs of lbxdp; say what failed.
        _error(str(e), "run `lbxdp doctor` to check this machine", 1)
