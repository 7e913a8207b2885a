"""The operator's verbs on a running balancer: vip and backend lifecycle, reload, the daemon.

Registered on the `lbxdp` group by lbxdp.cli. Every edit verb parses its arguments and hands
one function of lbxdp.edits to control.edit(), which reads what the instance was last told
(lbxdp.applied), changes it, validates the result with the model's rules (as a config file is)
and applies it as a minimal diff; nothing is applied if the result is invalid.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import click

from . import edits, model
from .cli import cli, needs_root
from .errors import LbxError
from .model import BackendId, HealthOverride, XdpMode
from .paths import Instance

IFACE_HELP = "Interface of the balancer (default: the only one lbxdp is attached to here)."


def pick_instance(ctx: click.Context, ifname: str | None) -> Instance:
    netns = ctx.obj.get("netns")
    if ifname:
        return Instance(ifname, netns)
    found = [i for i in Instance.all() if i.netns == netns]
    if len(found) == 1:
        return found[0]
    if not found:
        raise LbxError("lbxdp is not attached to any interface here", "attach it: lbxdp attach IFNAME --config FILE")
    raise LbxError(f"lbxdp is attached to {len(found)} interfaces here ({', '.join(i.ifname for i in found)})",
                   "say which one with -i IFNAME")


def parse_endpoint(text: str, what: str) -> tuple[model.IPAddress, int]:
    """'10.0.0.1:80', '[fd00::1]:80' or '10.0.0.1:*' (any port) -> (address, port)."""
    try:
        return model.parse_endpoint(text)
    except ValueError:
        raise LbxError(f"{what} {text!r} is not ADDRESS:PORT", "write it like 10.0.0.1:80 or [fd00::1]:80",
                       exit_code=2) from None


def parse_vip(text: str) -> model.VipKey:
    """'10.0.0.1:80/tcp' -> VipKey (the same names status and the metrics use)."""
    ep, slash, proto = text.rpartition("/")
    try:
        protocol = model.Protocol.parse(proto)
    except ValueError as e:
        why = str(e) if slash else "has no protocol"
        raise LbxError(f"VIP {text!r}: {why}" if slash else f"VIP {text!r} {why}",
                       "write it like 10.0.0.1:80/tcp or [fd00::1]:53/udp", exit_code=2) from None
    return model.VipKey(*parse_endpoint(ep, "VIP"), protocol)


def parse_backend_id(vip_name: str, be: str) -> BackendId:
    """VIP and BACKEND arguments -> the backend's identity."""
    return BackendId(parse_vip(vip_name), *parse_endpoint(be, "backend"))


def run_edit(ctx: click.Context, ifname: str | None, what: str,
             change: Callable[[model.Config, float], edits.Change]) -> None:
    """Apply one lbxdp.edits function to the instance and print the diff."""
    from . import control
    show_diff(control.edit(pick_instance(ctx, ifname), change, what))


def show_diff(diff: Any) -> None:
    for line in diff.lines:
        click.echo(f"  {line}")
    if diff.empty:
        click.echo("  (no change)")


# --- vip -------------------------------------------------------------------------------------------

@cli.group()
def vip() -> None:
    """Add, remove and list VIPs of a running balancer."""


@vip.command("ls")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def vip_ls(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """List the VIPs with their scheduler, table size and backends."""
    from . import control
    st = control.status(pick_instance(ctx, ifname))
    rows = [{k: v[k] for k in ("vip", "mode", "scheduler", "table_size", "packets", "bytes", "new_flows")}
            | {"backends": len(v["backends"])} for v in st["vips"]]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<34} {:<5} {:<7} {:>8} {:>9} {:>12} {:>10}"
    click.echo(fmt.format("VIP", "mode", "sched", "slots", "backends", "packets", "new flows"))
    for r in rows:
        click.echo(fmt.format(r["vip"], r["mode"], r["scheduler"], r["table_size"], r["backends"], r["packets"],
                              r["new_flows"]))


@vip.command("add")
@click.argument("vip_name", metavar="VIP")
@click.option("-b", "--backend", "backends", multiple=True, required=True, metavar="ADDR:PORT",
              help="A backend (repeat the option for more); weight 1. Add others with `backend add`.")
@click.option("--scheduler", type=click.Choice([s.value for s in model.Scheduler]),
              default=model.Scheduler.MAGLEV.value, show_default=True)
@click.option("--table-size", type=int, default=model.DEFAULT_TABLE_SIZE, show_default=True,
              help="Maglev table slots (a prime).")
@click.option("--slow-start", type=float, default=0.0, show_default=True, metavar="SECONDS")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def vip_add(ctx: click.Context, vip_name: str, backends: tuple[str, ...], scheduler: str, table_size: int,
            slow_start: float, ifname: str | None) -> None:
    """Add VIP (ADDR:PORT/PROTO) with its backends.

    \b
    Example: sudo lbxdp vip add 10.112.0.20:80/tcp -b 10.111.0.11:80 -b 10.111.0.12:80
    """
    key = parse_vip(vip_name)
    bes = tuple(model.Backend(*parse_endpoint(b, "backend")) for b in backends)
    run_edit(ctx, ifname, "vip add",
             lambda cfg, now: edits.vip_add(cfg, key, bes, model.Scheduler(scheduler), table_size, slow_start))


@vip.command("del")
@click.argument("vip_name", metavar="VIP")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def vip_del(ctx: click.Context, vip_name: str, ifname: str | None) -> None:
    """Remove VIP: its traffic passes to the kernel from now on."""
    key = parse_vip(vip_name)
    run_edit(ctx, ifname, "vip del", lambda cfg, now: edits.vip_del(cfg, key))


# --- backend ---------------------------------------------------------------------------------------

@cli.group()
def backend() -> None:
    """Add, remove, weigh, drain and list backends of a running balancer."""


@backend.command("ls")
@click.argument("vip_name", metavar="[VIP]", required=False)
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def backend_ls(ctx: click.Context, vip_name: str | None, ifname: str | None, as_json: bool) -> None:
    """List backends (of VIP, or of every VIP) with weight, state and counters."""
    from . import applied, control
    inst = pick_instance(ctx, ifname)
    st = control.status(inst)
    want = parse_vip(vip_name).name if vip_name else None
    cfg = applied.load(inst)
    rows = []
    for v in st["vips"]:
        if want and v["vip"] != want:
            continue
        conf = {b.name: b for cv in cfg.cfg.vips if cv.name == v["vip"] for b in cv.backends}
        for b in v["backends"]:
            c = conf.get(b["backend"])
            key = parse_backend_id(v["vip"], b["backend"])
            if key in cfg.draining:
                state = "draining"
            elif b.get("health") == "down":
                state = "down" + (" (forced)" if b.get("forced") else "")
            elif b["in_table"]:
                state = "active"
            else:
                state = "standby" if c and c.backup else "no new flows"
            rows.append({"vip": v["vip"], "backend": b["backend"], "weight": c.weight if c else None,
                         "backup": bool(c and c.backup), "state": state,
                         "drain_deadline": cfg.draining.get(key), "in_table": b["in_table"],
                         "health": b.get("health"), "last_check": b.get("last_check"),
                         "packets": b["packets"], "bytes": b["bytes"], "new_flows": b["new_flows"]})
    if want and not any(v["vip"] == want for v in st["vips"]):
        raise LbxError(f"no VIP {want} on this balancer", "list them: lbxdp vip ls", exit_code=2)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<26} {:<24} {:>6} {:<12} {:>12} {:>10}"
    click.echo(fmt.format("VIP", "backend", "weight", "state", "packets", "new flows"))
    for r in rows:
        click.echo(fmt.format(r["vip"], r["backend"], str(r["weight"]), r["state"], r["packets"], r["new_flows"]))


@backend.command("add")
@click.argument("vip_name", metavar="VIP")
@click.argument("be", metavar="BACKEND")
@click.option("--weight", type=int, default=1, show_default=True)
@click.option("--backup", is_flag=True, help="New flows only while no primary is usable.")
@click.option("--mac", help="Next-hop MAC (default: from the neighbour table).")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def backend_add(ctx: click.Context, vip_name: str, be: str, weight: int, backup: bool, mac: str | None,
                ifname: str | None) -> None:
    """Add BACKEND (ADDR:PORT) to VIP; with slow start its weight ramps up.

    \b
    Example: sudo lbxdp backend add 10.112.0.10:8080/tcp 10.111.0.14:8080 --weight 2
    """
    bid = parse_backend_id(vip_name, be)
    new = model.Backend(bid.address, bid.port, mac, weight, backup)
    run_edit(ctx, ifname, "backend add", lambda cfg, now: edits.backend_add(cfg, bid.vip, new))


@backend.command("del")
@click.argument("vip_name", metavar="VIP")
@click.argument("be", metavar="BACKEND")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def backend_del(ctx: click.Context, vip_name: str, be: str, ifname: str | None) -> None:
    """Remove BACKEND from VIP at once (its flows move on; `drain` lets them finish)."""
    bid = parse_backend_id(vip_name, be)
    run_edit(ctx, ifname, "backend del", lambda cfg, now: edits.backend_del(cfg, bid))


# ignore_unknown_options: a negative WEIGHT (-1) is an argument that validation refuses as out of
# range, not an unknown option.
@backend.command("set-weight", context_settings={"ignore_unknown_options": True})
@click.argument("vip_name", metavar="VIP")
@click.argument("be", metavar="BACKEND")
@click.argument("weight", type=int)
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def backend_set_weight(ctx: click.Context, vip_name: str, be: str, weight: int, ifname: str | None) -> None:
    """Set BACKEND's WEIGHT on VIP (0: no new flows; established ones stay)."""
    bid = parse_backend_id(vip_name, be)
    run_edit(ctx, ifname, "backend set-weight", lambda cfg, now: edits.backend_set_weight(cfg, bid, weight))


@backend.command("drain")
@click.argument("vip_name", metavar="VIP")
@click.argument("be", metavar="BACKEND")
@click.option("--deadline", type=click.FloatRange(0, 86400), default=30.0, show_default=True, metavar="SECONDS",
              help="Then its connection-table entries are removed and it leaves the VIP.")
@click.option("--wait", is_flag=True, help="Stay until the deadline and finish the drain (without `lbxdp run`, "
              "nothing else finishes it before the next change).")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def backend_drain(ctx: click.Context, vip_name: str, be: str, deadline: float, wait: bool,
                  ifname: str | None) -> None:
    """Drain BACKEND: no new flow goes to it; its established flows go on until --deadline."""
    from . import control
    bid = parse_backend_id(vip_name, be)
    run_edit(ctx, ifname, "backend drain", lambda cfg, now: edits.backend_drain(cfg, bid, now + deadline))
    if wait:
        time.sleep(deadline)
        show_diff(control.apply(pick_instance(ctx, ifname)))


@backend.command("set-health")
@click.argument("vip_name", metavar="VIP")
@click.argument("be", metavar="BACKEND")
@click.argument("state", type=click.Choice([s.value for s in HealthOverride]))
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def backend_set_health(ctx: click.Context, vip_name: str, be: str, state: str, ifname: str | None) -> None:
    """Force BACKEND's health on VIP: up or down (for maintenance), or auto (its check decides).

    \b
    Example: sudo lbxdp backend set-health 10.112.0.10:8080/tcp 10.111.0.11:8080 down
    """
    bid = parse_backend_id(vip_name, be)
    run_edit(ctx, ifname, "backend set-health",
             lambda cfg, now: edits.backend_set_health(cfg, bid, HealthOverride(state)))


# --- daemon ----------------------------------------------------------------------------------------

@cli.command()
@click.argument("ifname")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML file; re-read on SIGHUP or `lbxdp reload`.")
@click.option("--mode", type=click.Choice([m.value for m in XdpMode]), default=XdpMode.AUTO.value, show_default=True)
@click.option("--metrics", metavar="ADDRESS:PORT", help="Serve Prometheus /metrics here (default: the config's "
              "[metrics] listen, else none). 127.0.0.1:9842 is the usual choice.")
@click.option("--keep-attached", is_flag=True, help="On SIGTERM, leave the program attached (it keeps forwarding).")
@click.option("--allow-empty", is_flag=True, help="Let a config without [[vip]] (at start or on a reload) remove "
              "all VIPs of the running instance; without it such a config is refused.")
@click.pass_context
@needs_root
def run(ctx: click.Context, ifname: str, config_path: str, mode: str, metrics: str | None,
        keep_attached: bool, allow_empty: bool) -> None:
    """The daemon: attach (or adopt), apply the config, reload on SIGHUP, detach on SIGTERM.

    Runs in the foreground and logs to stderr (systemd-friendly: see systemd/lbxdp@.service).
    Finishes drains at their deadline and steps slow starts. `kill -9` leaves forwarding
    running; started again, it adopts the attached program and the pinned maps.
    """
    from . import daemon
    daemon.Daemon(Instance(ifname, ctx.obj.get("netns")), config_path, XdpMode(mode), metrics, keep_attached,
                  allow_empty).run()


@cli.command()
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.pass_context
@needs_root
def reload(ctx: click.Context, ifname: str | None) -> None:
    """Ask the running `lbxdp run` daemon to re-read its config file (SIGHUP)."""
    from . import daemon
    inst = pick_instance(ctx, ifname)
    pid = daemon.signal_daemon(inst)
    click.echo(f"asked the daemon of {inst.label} (pid {pid}) to reload")


# --- flows -----------------------------------------------------------------------------------------

def flow_matcher(vip: model.VipKey | None, be: tuple[model.IPAddress, int] | None) -> Any:
    """A predicate on maps.FlowEntry: the flow is of VIP and on backend BE (None: any).

    A live entry knows its VIP and backend by its backend entry. An entry that is not live (its
    backend entry was removed or reused) has no backend, so it matches no --backend; it matches a
    VIP by its destination (address, protocol, and port unless the VIP is an any-port one).
    """
    be_name = model.endpoint(*be) if be is not None else None

    def match(e: Any) -> bool:
        if be_name is not None and e.backend != be_name:
            return False
        if vip is None:
            return True
        if e.live:
            return e.vip == vip.name
        return e.dst == vip.address and e.protocol == vip.protocol and vip.port in (0, e.dport)
    return match


def flow_row(e: Any) -> dict[str, Any]:
    return {"src": str(e.src), "sport": e.sport, "dst": str(e.dst), "dport": e.dport,
            "protocol": e.protocol.value, "backend_id": e.backend_id, "gen": e.gen, "live": e.live,
            "backend": e.backend, "vip": e.vip}


def flow_counts(entries: list[Any]) -> dict[str, Any]:
    """Live entries per (VIP, backend) and the number of stale ones: what `flows count` prints."""
    by: dict[tuple[str, str], int] = {}
    for e in entries:
        if e.live:
            by[(e.vip, e.backend)] = by.get((e.vip, e.backend), 0) + 1
    live = sum(by.values())
    return {"entries": len(entries), "live": live, "stale": len(entries) - live,
            "by_backend": [{"vip": v, "backend": b, "flows": n} for (v, b), n in sorted(by.items())]}


@cli.group()
def flows() -> None:
    """Look into and flush the connection table (flow 5-tuple -> backend).

    \b
    Examples:
      sudo lbxdp flows count
      sudo lbxdp flows ls --limit 20
      sudo lbxdp flows flush --backend 10.111.0.12:8080
    """


@flows.command("ls")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True, help="At most N entries; 0: all.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def flows_ls(ctx: click.Context, ifname: str | None, limit: int, as_json: bool) -> None:
    """List connection-table entries with their backend.

    An entry is live while its backend entry is; a stale one's backend was removed (its next
    packet is a new flow) and it waits for the LRU to evict it.
    """
    from . import control
    with control.open_maps(pick_instance(ctx, ifname)) as m:
        entries = m.flow_entries(limit or None)
        total = m.flow_count() if limit and len(entries) >= limit else len(entries)
    rows = [flow_row(e) for e in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<62} {:<26} {}"
    click.echo(fmt.format("flow", "backend", "state"))
    for e in entries:
        click.echo(fmt.format(e.name, e.backend or f"(id {e.backend_id})", "live" if e.live else "stale"))
    if total > len(entries):
        click.echo(f"({len(entries)} of {total} entries; --limit 0 lists all)")


@flows.command("count")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def flows_count(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """Count connection-table entries, in all and per VIP and backend."""
    from . import control
    with control.open_maps(pick_instance(ctx, ifname)) as m:
        out = flow_counts(m.flow_entries()) | {"capacity": m.flow_map.info.max_entries}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{out['entries']} / {out['capacity']} entries ({out['live']} live, {out['stale']} stale)")
    for r in out["by_backend"]:
        click.echo(f"  {r['vip']:<34} {r['backend']:<26} {r['flows']:>8}")


@flows.command("flush")
@click.option("-i", "--interface", "ifname", help=IFACE_HELP)
@click.option("--vip", "vip_name", metavar="VIP", help="Only flows of VIP (ADDR:PORT/PROTO).")
@click.option("--backend", "be", metavar="ADDR:PORT", help="Only flows on this backend (of any VIP, or of --vip).")
@click.pass_context
@needs_root
def flows_flush(ctx: click.Context, ifname: str | None, vip_name: str | None, be: str | None) -> None:
    """Delete connection-table entries: all, or those of --vip and/or --backend.

    A flushed flow's next packet is a new flow: it goes where its VIP's table sends it now. An
    established connection survives that only if the table still picks its backend (nothing
    changed since it started); otherwise its new backend resets it.
    """
    from . import applied, control
    match = flow_matcher(parse_vip(vip_name) if vip_name else None,
                         parse_endpoint(be, "backend") if be else None)
    inst = pick_instance(ctx, ifname)
    with applied.locked(inst), control.open_maps(inst) as m:
        n = m.delete_flows([e for e in m.flow_entries() if match(e)])
    click.echo(f"flushed {n} connection-table entries")
