"""The daemon's commands: `lbxdp run` (lbxdp.daemon) and `lbxdp reload`."""

from __future__ import annotations

import click

from ..model import XdpMode
from ..paths import Instance
from .common import IFACE_HELP, needs_root, pick_instance
from .params import EnumChoice


@click.command()
@click.argument("ifname")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML file; re-read on SIGHUP or `lbxdp reload`. Or etcd://HOST:PORT/PREFIX: the config "
              "pushed there (`lbxdp config push`), each new revision applied within a second.")
@click.option("--mode", type=EnumChoice(XdpMode), default=XdpMode.AUTO.value, show_default=True)
@click.option("--metrics", metavar="ADDRESS:PORT", help="Serve Prometheus /metrics here (default: the config's "
              "[metrics] listen, else none). 127.0.0.1:9842 is the usual choice.")
@click.option("--keep-attached", is_flag=True, help="On SIGTERM, leave the program attached (it keeps forwarding).")
@click.option("--allow-empty", is_flag=True, help="Let a config without [[vip]] (at start or on a reload) remove "
              "all VIPs of the running instance; without it such a config is refused.")
@click.option("--node", "node_name", metavar="NAME", help="With an etcd:// config: this node's name in "
              "PREFIX/nodes/ and `lbxdp cluster status` (default: HOSTNAME:IFNAME).")
@click.pass_context
@needs_root
def run(ctx: click.Context, ifname: str, config_path: str, mode: XdpMode, metrics: str | None,
        keep_attached: bool, allow_empty: bool, node_name: str | None) -> None:
    """The daemon: attach (or adopt), apply the config, reload on SIGHUP, detach on SIGTERM.

    Runs in the foreground and logs to stderr (systemd-friendly: see systemd/lbxdp@.service).
    Finishes drains at their deadline and steps slow starts. `kill -9` leaves forwarding
    running; started again, it adopts the attached program and the pinned maps.
    """
    from .. import daemon
    daemon.Daemon(Instance(ifname, ctx.obj.get("netns")), config_path, mode, metrics, keep_attached,
                  allow_empty, node_name).run()


@click.command()
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def reload(ctx: click.Context, ifname: str | None) -> None:
    """Ask the running `lbxdp run` daemon to re-read its config file (SIGHUP)."""
    from .. import daemon
    inst = pick_instance(ctx, ifname)
    pid = daemon.signal_daemon(inst)
    click.echo(f"asked the daemon of {inst.label} (pid {pid}) to reload")


COMMANDS = (run, reload)
