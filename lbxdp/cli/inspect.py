"""`lbxdp explain`, `lbxdp preview` and `lbxdp trace`: what the program does with a packet, what a
backend change would move, and what it did with the packets going through it now.

explain and trace run the program itself (lbxdp.explain: a dry run over the live maps;
lbxdp.trace: the trace build swapped in while tracing), so they cannot disagree with it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import sys
import time
from typing import Any, Iterator

import click

from .. import model
from ..errors import LbxError
from .common import pick_instance
from .edit import listing
from .params import BACKEND, VIP


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("packet", nargs=-1, required=True)
@click.option("--syn", is_flag=True, help="A TCP SYN (a new connection); default: a later segment of the flow.")
@listing
def explain(ctx: click.Context, ifname: str | None, as_json: bool, packet: tuple[str, ...], syn: bool) -> None:
    """Which backend the attached program gives PACKET, and why.

    PACKET is SRC[:PORT] -> VIP:PORT/PROTO (the arrow is optional; SRC without a port: 40000).
    The real program runs on a copy of what it writes (lbxdp.explain): nothing is recorded,
    no counter moves. The answer is this CPU's (round robin and flood state are per CPU).

    \b
    Examples:
      sudo lbxdp explain 10.0.0.5:40000 '->' 10.112.0.10:80/tcp --syn
      sudo lbxdp explain 10.0.0.5:40000 10.112.0.10:80/tcp
      sudo lbxdp explain '[fd00::5]:5353 -> [fd00::10]:53/udp' --json
    """
    from .. import explain as ex
    try:
        probe = ex.parse_probe(" ".join(packet), syn=syn)
    except ValueError as e:
        raise LbxError(str(e), "write it like 10.0.0.5:40000 -> 10.112.0.10:80/tcp", exit_code=2) from None
    with ex.Session(pick_instance(ctx, ifname)) as s:
        e = s.explain(probe)
    if as_json:
        click.echo(json.dumps(e.to_json(), indent=2))
    else:
        click.echo("\n".join(e.text()))


@click.group()
def preview() -> None:
    """What a change would move, before making it.

    \b
    Examples:
      sudo lbxdp preview backend set-weight 10.112.0.10:80/tcp 10.111.0.21:8080 3
      sudo lbxdp preview backend remove 10.112.0.10:80/tcp 10.111.0.21:8080 --json
    """


@preview.group("backend")
def preview_backend() -> None:
    """Backend changes: set-weight, remove."""


def _preview(ctx: click.Context, ifname: str | None, as_json: bool, key: model.VipKey,
             be: tuple[model.IPAddress, int], weight: int | None) -> None:
    from .. import applied, control
    from .. import explain as ex
    inst = pick_instance(ctx, ifname)
    st = applied.load(inst)
    with control.open_maps(inst) as m:
        p = ex.preview(m, st, key, be, weight, time.time())
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else "\n".join(p.text()))


@preview_backend.command("set-weight")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@click.argument("weight", type=click.IntRange(0, 1000))
@listing
def preview_set_weight(ctx: click.Context, ifname: str | None, as_json: bool, key: model.VipKey,
                       be: tuple[model.IPAddress, int], weight: int) -> None:
    """Share of VIP's new-flow table slots and recorded flows that weight W would move."""
    _preview(ctx, ifname, as_json, key, be, weight)


@preview_backend.command("remove")
@click.argument("key", metavar="VIP", type=VIP)
@click.argument("be", metavar="BACKEND", type=BACKEND)
@listing
def preview_remove(ctx: click.Context, ifname: str | None, as_json: bool, key: model.VipKey,
                   be: tuple[model.IPAddress, int]) -> None:
    """Share of VIP's new-flow table slots and recorded flows that removing BACKEND would move."""
    _preview(ctx, ifname, as_json, key, be, None)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the trace like Ctrl-C does: the normal build is put back. SIGINT is
    set too: a trace started with SIGINT ignored (a script's background job) would not stop on
    Ctrl-C otherwise (lbxdp/top.py: _on_quit_signals)."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@click.command()
@click.option("--vip", "vip_text", metavar="VIP", help="Only packets to this VIP (ADDR:PORT/PROTO, or an address).")
@click.option("--src", metavar="CIDR", help="Only packets from this prefix (an address: a /32 or /128).")
@click.option("--reason", "reasons", multiple=True, metavar="R",
              help="Only packets that left for reason R (e.g. forward, not_vip, src_rate); repeatable.")
@click.option("-n", "--count", type=click.IntRange(1), default=None, help="Stop after N matching packets.")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=None, help="Stop after this long.")
@click.option("--pcap", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the packets' first 128 bytes, as they arrived, to this pcap file (Wireshark).")
@click.option("--restore", is_flag=True, help="Only put the normal build back, if a killed `lbxdp trace` left "
              "the trace build attached.")
@listing
def trace(ctx: click.Context, ifname: str | None, as_json: bool, vip_text: str | None, src: str | None,
          reasons: tuple[str, ...], count: int | None, seconds: float | None, pcap: str | None, restore: bool) -> None:
    """Live per-packet events: verdict, reason, 5-tuple, VIP and backend.

    While it runs, the program is its trace build (the same C with -DLBX_TRACE, over the same
    maps), swapped in atomically and swapped back when it stops (N packets, --seconds, Ctrl-C,
    SIGTERM). Without a tracer the program has no trace code at all. Killed with SIGKILL, it
    leaves the trace build attached (still forwarding; `lbxdp status` says so): put the normal
    build back with `lbxdp trace --restore`, `lbxdp attach`, or a daemon reload.

    \b
    Examples:
      sudo lbxdp trace -n 20
      sudo lbxdp trace --vip 10.112.0.10:80/tcp --src 10.111.0.0/24 --pcap /tmp/lb.pcap
      sudo lbxdp trace --reason not_vip --reason bad_source --json
    """
    from .. import trace as tr
    inst = pick_instance(ctx, ifname)
    if restore:
        done = tr.restore(inst)
        click.echo("normal build put back" if done else "no trace build left attached; nothing to do")
        return
    flt = _filter(tr, vip_text, src, reasons)
    out = open(pcap, "wb") if pcap else None
    n = 0
    try:
        writer = tr.PcapWriter(out) if out else None
        with _stop_on_signals(), tr.Tracer(inst) as t:
            try:    # the echo too: a SIGTERM sent on seeing this line can land before the loop
                click.echo(f"tracing {inst.label} (trace build attached; Ctrl-C stops)", err=True)
                for e in t.events(flt, count, seconds):
                    n += 1
                    click.echo(json.dumps(e.to_json()) if as_json else e.text())
                    if writer:
                        writer.write(e)
            except KeyboardInterrupt:
                pass
            lost = t.ring.lost() if t.ring else 0
    finally:
        if out:
            out.close()
    click.echo(f"{n} packets; normal build put back" + (f"; {lost} events lost (ring full)" if lost else ""), err=True)
    sys.stdout.flush()


def _filter(tr: Any, vip_text: str | None, src: str | None, reasons: tuple[str, ...]) -> Any:
    vip_key = vip_addr = None
    if vip_text:
        try:
            vip_key = model.VipKey.parse(vip_text)
        except ValueError:
            try:
                vip_addr = ipaddress.ip_address(vip_text.strip("[]"))
            except ValueError:
                raise LbxError(f"--vip {vip_text!r} is neither a VIP nor an address",
                               "write it like 10.0.0.1:80/tcp or 10.0.0.1", exit_code=2) from None
    net = None
    if src:
        try:
            net = ipaddress.ip_network(src, strict=False)
        except ValueError:
            raise LbxError(f"--src {src!r} is not a prefix", "write it like 10.0.0.0/24", exit_code=2) from None
    try:
        rs = frozenset(tr.parse_reason(r) for r in reasons) if reasons else None
    except ValueError as e:
        raise LbxError(str(e), "see `lbxdp status` for the reasons", exit_code=2) from None
    return tr.Filter(vip_key, vip_addr, net, rs)


COMMANDS = (explain, preview, trace)
