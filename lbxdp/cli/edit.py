"""The operator's verbs on a running balancer: vip and backend lifecycle, the connection table.

Every edit verb parses its arguments (VIP, ADDR:PORT: lbxdp.cli.params) and hands one function
of lbxdp.edits to control.edit(), which reads what the instance was last told (lbxdp.applied),
changes it, validates the result with the model's rules (as a config file is) and applies it as
a minimal diff; nothing is applied if the result is invalid.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import click

from .. import edits, model
from ..errors import LbxError
from ..model import HealthOverride
from .common import IFACE_HELP, needs_root, pick_instance, show_diff
from .params import BACKEND, VIP, EnumChoice, backend_id

Endpoint = tuple[model.IPAddress, int]


def run_edit(ctx: click.Context, ifname: str | None, what: str,
             change: Callable[[model.Config, float], edits.Change]) -> None:
    """Apply one lbxdp.edits function to the instance and print the diff."""
    from .. import control
    show_diff(control.edit(pick_instance(ctx, ifname), change, what))


def iface_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-i", "--interface", "ifname", help=IFACE_HELP)(fn)


def listing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """-i IFNAME and --json on a command that reads one instance (as root)."""
    return iface_option(click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(
        click.pass_context(needs_root(fn))))


# --- vip -------------------------------------------------------------------------------------------

@click.group()
def vip() -> None:
    """Add, remove and list VIPs of a running balancer."""


@vip.command("ls")
@listing
def vip_ls(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """List the VIPs with their scheduler, table size and backends."""
    from .. import control
    st = control.status(pick_instance(ctx, ifname))
    rows = [{"vip": v.name, "mode": v.mode, "scheduler": v.scheduler, "table_size": v.table_size,
             "packets": v.stats.packets, "bytes": v.stats.bytes, "new_flows": v.stats.new_flows,
             "backends": len(v.backends)} for v in st.vips]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<34} {:<5} {:<7} {:>8} {:>9} {:>12} {:>10}"
    click.echo(fmt.format("VIP", "mode", "sched", "slots", "backends", "packets", "new flows"))
    for v in st.vips:
        click.echo(fmt.format(v.name, v.mode, v.scheduler, v.table_size, len(v.backends), v.stats.packets,
                              v.stats.new_flows))


@vip.command("add")
@click.argument("key", metavar="VIP", type=VIP)
@click.option("-b", "--backend", "backends", multiple=True, required=True, metavar="ADDR:PORT", type=BACKEND,
              help="A backend (repeat the option for more); weight 1. Add others with `backend add`.")
@click.option("--scheduler", type=EnumChoice(model.Scheduler), default=model.Scheduler.MAGLEV.value,
              show_default=True)
@click.option("--table-size", type=int, default=model.DEFAULT_TABLE_SIZE, show_default=True,
              help="Maglev table slots (a prime).")
@click.option("--slow-start", type=float, default=0.0, show_default=True, metavar="SECONDS")
@click.option("--source-prefix", type=int, default=None, metavar="BITS",
              help="scheduler source: leading bits of the client address hashed (default: all).")
@iface_option
@click.pass_context
@needs_root
def vip_add(ctx: click.Context, key: model.VipKey, backends: tuple[Endpoint, ...], scheduler: model.Scheduler,
            table_size: int, slow_start: float, source_prefix: int | None, ifname: str | None) -> None:
    """Add VIP (ADDR:PORT/PROTO) with its backends.

    \b
    Example: sudo lbxdp vip add 10.112.0.20:80/tcp -b 10.111.0.11:80 -b 10.111.0.12:80
    """
    bes = tuple(model.Backend(*b) for b in backends)
    run_edit(ctx, ifname, "vip add",
             lambda cfg, now: edits.vip_add(cfg, key, bes, scheduler, table_size, slow_start, source_prefix))


@vip.command("set-scheduler")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("scheduler", type=EnumChoice(model.Scheduler))
@click.option("--source-prefix", type=int, default=None, metavar="BITS",
              help="source: leading bits of the client address hashed (default: all).")
@iface_option
@click.pass_context
@needs_root
def vip_set_scheduler(ctx: click.Context, key: model.VipKey, scheduler: model.Scheduler,
                      source_prefix: int | None, ifname: str | None) -> None:
    """Set VIP's SCHEDULER (maglev, rr, hash, source, leastconn); established flows stay."""
    run_edit(ctx, ifname, "vip set-scheduler",
             lambda cfg, now: edits.vip_set_scheduler(cfg, key, scheduler, source_prefix))


@vip.command("del")
@click.argument("key", metavar="VIP", type=VIP)
@iface_option
@click.pass_context
@needs_root
def vip_del(ctx: click.Context, key: model.VipKey, ifname: str | None) -> None:
    """Remove VIP: its traffic passes to the kernel from now on."""
    run_edit(ctx, ifname, "vip del", lambda cfg, now: edits.vip_del(cfg, key))


# --- backend ---------------------------------------------------------------------------------------

@click.group()
def backend() -> None:
    """Add, remove, weigh, drain and list backends of a running balancer."""


@backend.command("ls")
@click.argument("key", metavar="[VIP]", required=False, type=VIP)
@listing
def backend_ls(ctx: click.Context, key: model.VipKey | None, ifname: str | None, as_json: bool) -> None:
    """List backends (of VIP, or of every VIP) with weight, state and counters."""
    from .. import applied, control
    inst = pick_instance(ctx, ifname)
    st = control.status(inst)
    want = key.name if key else None
    told = applied.load(inst)
    conf = {bid: b for bid, (_, b) in told.cfg.backends().items()}
    rows = []
    for v in st.vips:
        if want and v.name != want:
            continue
        for b in v.backends:
            bid = v.backend_id(b)
            c = conf.get(bid)
            if bid in told.draining:
                state = "draining"
            elif b.health.state == "down":
                state = "down" + (" (forced)" if b.health.forced else "")
            elif b.in_table:
                state = "active"
            else:
                state = "standby" if c and c.backup else "no new flows"
            rows.append({"vip": v.name, "backend": b.name, "weight": c.weight if c else None,
                         "backup": bool(c and c.backup), "state": state,
                         "drain_deadline": told.draining.get(bid), "in_table": b.in_table,
                         "health": b.health.state, "last_check": b.health.last_check,
                         "packets": b.stats.packets, "bytes": b.stats.bytes, "new_flows": b.stats.new_flows})
    if want and st.vip(want) is None:
        raise LbxError(f"no VIP {want} on this balancer", "list them: lbxdp vip ls", exit_code=2)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<26} {:<24} {:>6} {:<12} {:>12} {:>10}"
    click.echo(fmt.format("VIP", "backend", "weight", "state", "packets", "new flows"))
    for r in rows:
        click.echo(fmt.format(r["vip"], r["backend"], str(r["weight"]), r["state"], r["packets"], r["new_flows"]))


@backend.command("add")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@click.option("--weight", type=int, default=1, show_default=True)
@click.option("--backup", is_flag=True, help="New flows only while no primary is usable.")
@click.option("--mac", help="Next-hop MAC (default: from the neighbour table).")
@click.option("--max-conns", type=int, default=0, show_default=True, help="Connection cap; 0 = none.")
@iface_option
@click.pass_context
@needs_root
def backend_add(ctx: click.Context, key: model.VipKey, be: Endpoint, weight: int, backup: bool, mac: str | None,
                max_conns: int, ifname: str | None) -> None:
    """Add BACKEND (ADDR:PORT) to VIP; with slow start its weight ramps up.

    \b
    Example: sudo lbxdp backend add 10.112.0.10:8080/tcp 10.111.0.14:8080 --weight 2
    """
    new = model.Backend(*be, mac, weight, backup, max_conns=max_conns)
    run_edit(ctx, ifname, "backend add", lambda cfg, now: edits.backend_add(cfg, key, new))


@backend.command("del")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@iface_option
@click.pass_context
@needs_root
def backend_del(ctx: click.Context, key: model.VipKey, be: Endpoint, ifname: str | None) -> None:
    """Remove BACKEND from VIP at once (its flows move on; `drain` lets them finish)."""
    bid = backend_id(key, be)
    run_edit(ctx, ifname, "backend del", lambda cfg, now: edits.backend_del(cfg, bid))


# ignore_unknown_options: a negative WEIGHT (-1) is an argument that validation refuses as out of
# range, not an unknown option.
@backend.command("set-weight", context_settings={"ignore_unknown_options": True})
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@click.argument("weight", type=int)
@iface_option
@click.pass_context
@needs_root
def backend_set_weight(ctx: click.Context, key: model.VipKey, be: Endpoint, weight: int, ifname: str | None) -> None:
    """Set BACKEND's WEIGHT on VIP (0: no new flows; established ones stay)."""
    bid = backend_id(key, be)
    run_edit(ctx, ifname, "backend set-weight", lambda cfg, now: edits.backend_set_weight(cfg, bid, weight))


@backend.command("set-max-conns", context_settings={"ignore_unknown_options": True})
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@click.argument("max_conns", metavar="N", type=int)
@iface_option
@click.pass_context
@needs_root
def backend_set_max_conns(ctx: click.Context, key: model.VipKey, be: Endpoint, max_conns: int,
                          ifname: str | None) -> None:
    """Cap BACKEND's open connections on VIP at N (0: no cap); at the cap new flows go elsewhere."""
    bid = backend_id(key, be)
    run_edit(ctx, ifname, "backend set-max-conns",
             lambda cfg, now: edits.backend_set_max_conns(cfg, bid, max_conns))


@backend.command("drain")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@click.option("--deadline", type=click.FloatRange(0, 86400), default=30.0, show_default=True, metavar="SECONDS",
              help="Then its connection-table entries are removed and it leaves the VIP.")
@click.option("--wait", is_flag=True, help="Stay until the deadline and finish the drain (without `lbxdp run`, "
              "nothing else finishes it before the next change).")
@iface_option
@click.pass_context
@needs_root
def backend_drain(ctx: click.Context, key: model.VipKey, be: Endpoint, deadline: float, wait: bool,
                  ifname: str | None) -> None:
    """Drain BACKEND: no new flow goes to it; its established flows go on until --deadline."""
    from .. import control
    bid = backend_id(key, be)
    run_edit(ctx, ifname, "backend drain", lambda cfg, now: edits.backend_drain(cfg, bid, now + deadline))
    if wait:
        time.sleep(deadline)
        show_diff(control.apply(pick_instance(ctx, ifname)))


@backend.command("set-health")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@click.argument("state", type=EnumChoice(HealthOverride))
@iface_option
@click.pass_context
@needs_root
def backend_set_health(ctx: click.Context, key: model.VipKey, be: Endpoint, state: HealthOverride,
                       ifname: str | None) -> None:
    """Force BACKEND's health on VIP: up or down (for maintenance), or auto (its check decides).

    \b
    Example: sudo lbxdp backend set-health 10.112.0.10:8080/tcp 10.111.0.11:8080 down
    """
    bid = backend_id(key, be)
    run_edit(ctx, ifname, "backend set-health", lambda cfg, now: edits.backend_set_health(cfg, bid, state))


# --- flows -----------------------------------------------------------------------------------------

def flow_matcher(vip: model.VipKey | None, be: Endpoint | None) -> Any:
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


@click.group()
def flows() -> None:
    """Look into and flush the connection table (flow 5-tuple -> backend).

    \b
    Examples:
      sudo lbxdp flows count
      sudo lbxdp flows ls --limit 20
      sudo lbxdp flows flush --backend 10.111.0.12:8080
    """


@flows.command("ls")
@iface_option
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True, help="At most N entries; 0: all.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@needs_root
def flows_ls(ctx: click.Context, ifname: str | None, limit: int, as_json: bool) -> None:
    """List connection-table entries with their backend.

    An entry is live while its backend entry is; a stale one's backend was removed (its next
    packet is a new flow) and it waits for the LRU to evict it.
    """
    from .. import control
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
@listing
def flows_count(ctx: click.Context, ifname: str | None, as_json: bool) -> None:
    """Count connection-table entries, in all and per VIP and backend."""
    from .. import control
    with control.open_maps(pick_instance(ctx, ifname)) as m:
        out = flow_counts(m.flow_entries()) | {"capacity": m.flow_map.info.max_entries}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{out['entries']} / {out['capacity']} entries ({out['live']} live, {out['stale']} stale)")
    for r in out["by_backend"]:
        click.echo(f"  {r['vip']:<34} {r['backend']:<26} {r['flows']:>8}")


@flows.command("flush")
@iface_option
@click.option("--vip", "key", metavar="VIP", type=VIP, help="Only flows of VIP (ADDR:PORT/PROTO).")
@click.option("--backend", "be", metavar="ADDR:PORT", type=BACKEND,
              help="Only flows on this backend (of any VIP, or of --vip).")
@click.pass_context
@needs_root
def flows_flush(ctx: click.Context, ifname: str | None, key: model.VipKey | None, be: Endpoint | None) -> None:
    """Delete connection-table entries: all, or those of --vip and/or --backend.

    A flushed flow's next packet is a new flow: it goes where its VIP's table sends it now. An
    established connection survives that only if the table still picks its backend (nothing
    changed since it started); otherwise its new backend resets it.
    """
    from .. import applied, control
    match = flow_matcher(key, be)
    inst = pick_instance(ctx, ifname)
    with applied.locked(inst), control.open_maps(inst) as m:
        n = m.delete_flows([e for e in m.flow_entries() if match(e)])
    click.echo(f"flushed {n} connection-table entries")


@flows.command("recount")
@iface_option
@click.pass_context
@needs_root
def flows_recount(ctx: click.Context, ifname: str | None) -> None:
    """Recount leastconn/max_conns backends' open connections from the connection table now.

    The daemon does this every 10 seconds; the program's own counts miss connections that end
    by timeout or by the server alone (DSR), and entries that were evicted or flushed.
    """
    from .. import applied, control
    inst = pick_instance(ctx, ifname)
    with applied.locked(inst), control.open_maps(inst) as m:
        changed = m.recount_conns()
    click.echo(f"recounted: {len(changed)} backend entries corrected" +
               "".join(f"\n  id {bid}: {a} -> {b}" for bid, (a, b) in sorted(changed.items())))


COMMANDS = (vip, backend, flows)
