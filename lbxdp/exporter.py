"""Prometheus metrics, read from the pinned maps at scrape time.

LbxCollector.collect() asks its source for the instances, reads each one once (an
lbxdp.view.InstanceStatus: the same typed read `lbxdp status` shows), and turns that into metric
families. Nothing polls and nothing keeps a second copy of the counters: the per-CPU maps are the
only source of truth (see STYLE.md, "Metrics are read from the maps at scrape time").

The source is injectable: PinnedMaps is the real one (lbxdp.view.read on each Instance); the unit
tests pass a fake that returns fixed InstanceStatus values, and a fresh CollectorRegistry.

An instance whose maps cannot be read is reported as lbxdp_up{interface=...} 0 and counted in
lbxdp_scrape_errors_total; it never fails the scrape, and it never emits half of its metrics
(an instance is read whole before anything of it is yielded).

Backend health (lbxdp_backend_healthy) is the daemon's: the checker's verdict per checked
backend, which `lbxdp run` writes to the run directory (checks.json) once a second and on every
transition. Read from there, it is the same family with the same labels whether `lbxdp run
--metrics` or a standalone `lbxdp exporter` serves it. What stays daemon-only are the daemon's
process metrics, which exist only in its memory: lbxdp_config_reloads_total, lbxdp_apply_seconds
and lbxdp_health_check_seconds (see lbxdp.daemon.MetricsService).

Cost: the counters are one lookup per VIP/backend/reason, but lbxdp_flow_table_entries walks the
keys of the connection table (one syscall per entry: ~64k at a full table, tens of ms). It is
kept because a filling table is what an operator needs to see; lbxdp_scrape_duration_seconds
shows what it costs.

NAT (issue 12): lbxdp_nat_entries / _expired_entries / _capacity, lbxdp_nat_handshake_entries /
_capacity (lbx_nat_new), lbxdp_snat_pool_ports and
lbxdp_snat_ports_in_use come from one batched walk of the NAT conntrack (lbxdp.conntrack.summarize:
counted over the raw bytes, no object per entry); the per-backend handshake signals are one
lookup per NAT backend. The NAT reasons are lbxdp_verdict_packets_total's (every reason is).
The daemon's own: lbxdp_nat_gc_*, lbxdp_passive_{suspects,ejections,ejections_capped}_total.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__, abi, model
from .errors import LbxError
from .paths import Instance

if TYPE_CHECKING:
    from .view import InstanceStatus

log = logging.getLogger(__name__)

DEFAULT_PORT = 9842
GLOBAL_SCOPE = "global"   # the vip label of the [balancer] admission scope (no VIP is named so)
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


class Source(Protocol):
    def instances(self) -> Iterable[Instance]:
        """The instances to export, listed at each scrape (so a later attach shows up)."""

    def read(self, inst: Instance) -> InstanceStatus:
        """Read one instance (lbxdp.view.read); raises if its maps cannot be read."""


class PinnedMaps:
    """The real source: the pinned maps of the given interfaces, or of every instance in netns."""

    def __init__(self, netns: str | None = None, ifnames: Iterable[str] = ()):
        self.netns = netns
        self.ifnames = tuple(ifnames)

    def instances(self) -> list[Instance]:
        if self.ifnames:
            return [Instance(i, self.netns) for i in self.ifnames]
        return [i for i in Instance.all() if i.netns == self.netns]

    def read(self, inst: Instance) -> InstanceStatus:
        from . import applied, view
        return view.read(inst, told=applied.load_runtime)


class LbxCollector(Collector):
    """Reads every instance of `source` in collect(); register it on any registry."""

    def __init__(self, source: Source):
        self.source = source
        self._errors = 0
        self._lock = threading.Lock()   # the HTTP server scrapes from several threads

    def _error(self, what: str, e: BaseException) -> None:
        log.warning("scrape: %s: %s", what, e)
        with self._lock:
            self._errors += 1

    def collect(self) -> Iterable:
        snaps: list[InstanceStatus] = []
        up = GaugeMetricFamily("lbxdp_up", "1 if the instance's pinned maps could be read at this scrape, else 0.",
                               labels=["interface"])
        try:
            insts = list(self.source.instances())
        except Exception as e:  # noqa: BLE001 - a broken source must not break the scrape
            self._error("listing instances", e)
            insts = []
        for inst in insts:
            try:
                snaps.append(self.source.read(inst))
                up.add_metric([inst.ifname], 1)
            except Exception as e:  # noqa: BLE001
                self._error(f"reading {inst.label}", e)
                up.add_metric([inst.ifname], 0)
        yield up
        yield CounterMetricFamily("lbxdp_scrape_errors", "Instances (or instance listings) that could not "
                                  "be read, since the exporter started.", value=self._errors)
        yield from self._families(snaps)
        from .bgp import metric_families   # issue 14: [bgp] announcements and sessions
        yield from metric_families(snaps)

    @staticmethod
    def _families(snaps: list[InstanceStatus]) -> Iterable:
        def counters(prefix: str, what: str, labels: list[str]) -> dict[str, CounterMetricFamily]:
            return {
                "packets": CounterMetricFamily(f"{prefix}_packets_total", f"Packets {what}.", labels=labels),
                "bytes": CounterMetricFamily(f"{prefix}_bytes_total", f"Bytes (whole frames) {what}.", labels=labels),
                "new_flows": CounterMetricFamily(f"{prefix}_new_flows_total",
                                                 f"New connection-table entries {what}.", labels=labels),
            }

        vip = counters("lbxdp_vip", "forwarded for the VIP", ["interface", "vip"])
        be = counters("lbxdp_backend", "forwarded to the backend", ["interface", "vip", "backend"])
        in_table = GaugeMetricFamily("lbxdp_backend_in_table",
                                     "1 if the backend is in its VIP's live selection table, else 0 (draining).",
                                     labels=["interface", "vip", "backend"])
        healthy = GaugeMetricFamily("lbxdp_backend_healthy", "1 if the backend passes its health check (after "
                                    "rise/fall), 0 if not; only checked backends appear (written by `lbxdp run`).",
                                    labels=["interface", "vip", "backend"])
        v_pkts = CounterMetricFamily("lbxdp_verdict_packets_total", "Packets by XDP verdict and reason.",
                                     labels=["interface", "verdict", "reason"])
        v_bytes = CounterMetricFamily("lbxdp_verdict_bytes_total", "Bytes by XDP verdict and reason.",
                                      labels=["interface", "verdict", "reason"])
        entries = GaugeMetricFamily("lbxdp_flow_table_entries",
                                    "Entries in the connection table (counted by walking it at scrape time).",
                                    labels=["interface"])
        capacity = GaugeMetricFamily("lbxdp_flow_table_capacity", "Size of the connection table (max entries).",
                                     labels=["interface"])
        info = InfoMetricFamily("lbxdp", "The attached program: lbxdp version, XDP mode, program id.",
                                labels=["interface"])
        took = GaugeMetricFamily("lbxdp_scrape_duration_seconds",
                                 "Time this scrape took to read the instance's maps.", labels=["interface"])
        acl_rules = GaugeMetricFamily("lbxdp_acl_rules", "CIDR rules of a scope (a VIP, or vip=\"global\": every "
                                      "VIP) in the live ACL trie, by list (allow, deny); drops are the verdict "
                                      "reasons acl_deny and acl_not_allowed.", labels=["interface", "vip", "list"])
        lim_rate = GaugeMetricFamily("lbxdp_new_flow_limit_rate", "A scope's per-source limit of new flows per "
                                     "second (per CPU); absent: no limit. Drops: reason src_rate.",
                                     labels=["interface", "vip"])
        lim_burst = GaugeMetricFamily("lbxdp_new_flow_limit_burst", "A scope's per-source burst of new flows; "
                                      "absent: no limit.", labels=["interface", "vip"])
        half_open = GaugeMetricFamily("lbxdp_half_open_entries", "Entries in the half-open table: handshakes "
                                      "whose SYN's choice waits for the client's ACK (bpf/select.h).",
                                      labels=["interface"])
        flood_threshold = GaugeMetricFamily("lbxdp_flood_threshold", "New flows per second per CPU past which "
                                            "that CPU is under a new-flow flood ([balancer] flood_threshold).",
                                            labels=["interface"])
        flood_cpus = GaugeMetricFamily("lbxdp_flood_cpus", "CPUs over the flood threshold in their current "
                                       "second.", labels=["interface"])
        skipped = CounterMetricFamily("lbxdp_flood_inserts_skipped", "Connection-table records refused because "
                                      "the CPU was under a new-flow flood (packets proving no handshake).",
                                      labels=["interface"])
        ho_written = CounterMetricFamily("lbxdp_half_open_written", "Half-open entries written (SYNs and first "
                                         "datagrams whose choice the VIP's table cannot repeat).",
                                         labels=["interface"])
        nat_entries = GaugeMetricFamily("lbxdp_nat_entries", "Live NAT conntrack entries (two per connection) by "
                                        "direction and state (counted at scrape time).",
                                        labels=["interface", "direction", "state"])
        nat_expired = GaugeMetricFamily("lbxdp_nat_expired_entries", "NAT conntrack entries past their state's "
                                        "timeout (absent for the program) not yet removed by the daemon's GC.",
                                        labels=["interface"])
        nat_capacity = GaugeMetricFamily("lbxdp_nat_capacity", "Size of the NAT conntrack (max entries).",
                                         labels=["interface"])
        nat_hs = GaugeMetricFamily("lbxdp_nat_handshake_entries", "Live entries of the NAT handshake table (two "
                                   "per new connection: a TCP handshake its client has not acknowledged, a UDP "
                                   "flow before its client's second datagram; a flood fills it, not the "
                                   "conntrack).", labels=["interface"])
        nat_hs_capacity = GaugeMetricFamily("lbxdp_nat_handshake_capacity", "Size of the NAT handshake table "
                                            "(max entries).", labels=["interface"])
        pool_size = GaugeMetricFamily("lbxdp_snat_pool_ports", "Ports in the SNAT pool, per source address and "
                                      "protocol ([balancer] snat_ports).", labels=["interface"])
        pool_use = GaugeMetricFamily("lbxdp_snat_ports_in_use", "SNAT ports held by live connections, per source "
                                     "address and protocol.", labels=["interface", "address", "protocol"])
        hs_fail = GaugeMetricFamily("lbxdp_backend_handshake_failures_in_a_row", "NAT backend: failed handshakes "
                                    "(RST to a SYN, SYN retransmitted) since its last SYN-ACK: passive health's signal.",
                                    labels=["interface", "vip", "backend"])
        hs_total = CounterMetricFamily("lbxdp_backend_handshakes", "NAT backend handshakes seen by the program, by "
                                       "result: synack (completed), syn_rst (refused), syn_retx (SYN retransmitted).",
                                       labels=["interface", "vip", "backend", "result"])
        open_conns = GaugeMetricFamily("lbxdp_backend_open_connections", "Open connections of a backend of a "
                                       "leastconn VIP or with max_conns, as the program counts them (opened on a "
                                       "recorded flow, closed on the client's FIN/RST; recounted by the daemon).",
                                       labels=["interface", "vip", "backend"])
        max_conns = GaugeMetricFamily("lbxdp_backend_max_conns", "A backend's connection cap (max_conns); 0 = none.",
                                      labels=["interface", "vip", "backend"])
        cap_hits = CounterMetricFamily("lbxdp_backend_cap_hits", "New flows a backend at its max_conns passed on "
                                       "to another choice.", labels=["interface", "vip", "backend"])
        passive_down = GaugeMetricFamily("lbxdp_backend_passive_down", "1 if the backend is down because passive "
                                         "health ejected it (NAT VIPs with [vip.passive_health]), else 0.",
                                         labels=["interface", "vip", "backend"])
        quic_pkts = CounterMetricFamily("lbxdp_quic_packets", "QUIC VIPs' packets of tuples the connection table "
                                        "did not know, by how they were routed: by_id (server id in the connection ID), "
                                        "initial (Initial/0-RTT, by the table), unknown_id/down_id/short_cid (fell "
                                        "back to the table), other (Retry, version negotiation, other versions).",
                                        labels=["interface", "how"])
        quic_ids = GaugeMetricFamily("lbxdp_quic_server_ids", "Server ids the program routes QUIC connection IDs "
                                     "by (every QUIC VIP).", labels=["interface"])
        vip_quic = CounterMetricFamily("lbxdp_vip_quic_packets", "A QUIC VIP's packets of tuples the connection "
                                       "table did not know, by how they were routed (the `how` of "
                                       "lbxdp_quic_packets_total).", labels=["interface", "vip", "how"])
        overflows = CounterMetricFamily("lbxdp_vip_backup_overflows", "New flows of a VIP sent to a backup because "
                                        "every primary candidate was at its max_conns (VIPs with backups).",
                                        labels=["interface", "vip"])
        for s in snaps:
            iface = s.interface
            if s.quic.active:
                quic_ids.add_metric([iface], s.quic.ids)
                for r, n in s.quic.packets:
                    quic_pkts.add_metric([iface, r.name.lower()], n)
            if s.nat is not None:
                for (d, st), n in sorted(s.nat.entries.items()):
                    nat_entries.add_metric([iface, d, st], n)
                nat_expired.add_metric([iface], s.nat.expired)
                nat_capacity.add_metric([iface], s.nat.capacity)
                if s.nat.handshake_capacity:
                    nat_hs.add_metric([iface], s.nat.handshakes)
                    nat_hs_capacity.add_metric([iface], s.nat.handshake_capacity)
                if s.nat.pool is not None:
                    pool_size.add_metric([iface], s.nat.pool_size)
                    have = {(p.address, p.protocol): p.in_use for p in s.nat.ports}
                    for a in s.nat.sources:   # every source and protocol, 0 when unused
                        for proto in ("tcp", "udp"):
                            pool_use.add_metric([iface, a, proto], have.get((a, proto), 0))
            for v in s.vips:
                for b in v.backends:
                    if b.handshakes is not None:
                        labels = [iface, v.name, b.name]
                        hs_fail.add_metric(labels, b.handshakes.consecutive)
                        for result in ("synack", "syn_rst", "syn_retx"):
                            hs_total.add_metric([*labels, result], getattr(b.handshakes, result))
                        passive_down.add_metric(labels, 1 if b.health.cause == "passive" else 0)
            half_open.add_metric([iface], s.gate.half_open_entries)
            flood_threshold.add_metric([iface], s.gate.threshold)
            flood_cpus.add_metric([iface], s.gate.cpus_flooded)
            skipped.add_metric([iface], s.gate.inserts_skipped)
            ho_written.add_metric([iface], s.gate.half_open_written)
            for scope, adm in ((GLOBAL_SCOPE, s.admission), *((v.name, v.admission) for v in s.vips)):
                acl_rules.add_metric([iface, scope, "allow"], adm.allow)
                acl_rules.add_metric([iface, scope, "deny"], adm.deny)
                if adm.rate is not None:
                    lim_rate.add_metric([iface, scope], adm.rate)
                    lim_burst.add_metric([iface, scope], adm.burst or 0)
            for v in s.vips:
                for k, fam in vip.items():
                    fam.add_metric([iface, v.name], getattr(v.stats, k))
                for r, n in v.quic or ():
                    vip_quic.add_metric([iface, v.name, r.name.lower()], n)
                if v.backup_overflows is not None:
                    overflows.add_metric([iface, v.name], v.backup_overflows)
                for b in v.backends:
                    labels = [iface, v.name, b.name]
                    for k, fam in be.items():
                        fam.add_metric(labels, getattr(b.stats, k))
                    in_table.add_metric(labels, 1 if b.in_table else 0)
                    if b.health.passing is not None:
                        healthy.add_metric(labels, 1 if b.health.passing else 0)
                    if b.conns is not None:
                        open_conns.add_metric(labels, b.conns.open)
                        max_conns.add_metric(labels, b.conns.max_conns)
                        cap_hits.add_metric(labels, b.conns.cap_hits)
            reasons = s.reason_counts()
            for r in abi.Reason.exits():   # every reason, 0 if never seen: rate() needs the series
                p, b = reasons.get(r, (0, 0))
                v_pkts.add_metric([iface, r.verdict, r.label], p)
                v_bytes.add_metric([iface, r.verdict, r.label], b)
            entries.add_metric([iface], s.flow_entries)
            capacity.add_metric([iface], s.flow_capacity)
            info.add_metric([iface], {"version": s.state.version, "mode": s.state.mode,
                                      "prog_id": str(s.state.prog_id)})
            took.add_metric([iface], s.read_seconds)
        yield from (*vip.values(), *be.values(), in_table, healthy, v_pkts, v_bytes, entries, capacity, info, took,
                    acl_rules, lim_rate, lim_burst, half_open, flood_threshold, flood_cpus, skipped, ho_written,
                    nat_entries, nat_expired, nat_capacity, nat_hs, nat_hs_capacity, pool_size, pool_use, hs_fail,
                    hs_total, passive_down, open_conns, max_conns, cap_hits, quic_pkts, quic_ids, vip_quic, overflows)


def make_registry(source: Source, registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """`registry` (a new one if None) with an LbxCollector on `source` registered."""
    reg = registry if registry is not None else CollectorRegistry()
    reg.register(LbxCollector(source))
    return reg


def parse_listen(listen: str, option: str = "--listen") -> tuple[str, int]:
    """'127.0.0.1:9842', '[::1]:9842', ':9842' (all addresses, explicitly) -> (addr, port).
    option: how the user gave it (--listen, --metrics), for the error."""
    try:
        return model.parse_listen(listen)   # the same parser as the config's [metrics] listen
    except ValueError as e:
        raise LbxError(f"{option} {listen!r} {e}", f"for example {option} {DEFAULT_LISTEN}", exit_code=2) from None


def serve(source: Source, listen: str = DEFAULT_LISTEN, echo: Callable[[str], None] = print,
          stop: threading.Event | None = None) -> None:
    """Serve /metrics on `listen` in the foreground until SIGINT/SIGTERM (or `stop` is set)."""
    from prometheus_client import start_http_server
    from prometheus_client.process_collector import ProcessCollector

    addr, port = parse_listen(listen)
    reg = make_registry(source)
    ProcessCollector(registry=reg)
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server, thread = start_http_server(port, addr, registry=reg)
    except OSError as e:
        raise LbxError(f"cannot listen on {listen}: {e.strerror}", "pick another port with --listen ADDRESS:PORT") from e
    echo(f"lbxdp {__version__} exporter: serving http://{listen}/metrics")
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
