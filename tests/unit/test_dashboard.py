"""dashboards/lbxdp.json: valid Grafana JSON whose every query names metrics the exporter defines.

The metric names come from the real collector (LbxCollector over a fake source, as in
test_exporter.py), so renaming a metric in lbxdp/exporter.py without the dashboard fails here.
Counters appear with their `_total` suffix and the info family as `lbxdp_info`: the names are
those of the samples, which is what PromQL selects. The PromQL is not parsed fully: metric_names()
removes strings, label matchers, ranges and grouping label lists, then takes the identifiers that
are neither called (functions, aggregations) nor keywords. Its own test pins what it finds.
(tests/netns/test_prometheus.py also runs every expression against a real Prometheus.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client import CollectorRegistry

from lbxdp import abi
from lbxdp.exporter import make_registry
from lbxdp.maps import Stats
from lbxdp.paths import Instance
from lbxdp.view import AdmissionStatus, AttachRecord, BackendStatus, Health, InstanceStatus, ReasonCount, VipStatus

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "lbxdp.json"

# Series Prometheus itself writes for every target (not the exporter's): the dashboard shows
# whether the exporter was reachable and how long the whole scrape took.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds"}

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "atan2"}
IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables allowed anywhere)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)   # strings
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)                                  # Grafana variables
    s = re.sub(r"\{[^{}]*\}", " ", s)                                         # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)                                       # ranges, subqueries
    s = GROUPING.sub(" ", s)                                                  # by (vip, ...)
    return {m.group(1) for m in IDENT.finditer(s)
            if not m.group(2) and m.group(1).lower() not in KEYWORDS}


@pytest.mark.parametrize("expr, want", [
    ('sum by (instance, vip) (rate(lbxdp_vip_packets_total{interface=~"$interface"}[$__rate_interval])) * 8',
     {"lbxdp_vip_packets_total"}),
    ('max(a_total{x="rate(b)"} / b_total) or vector(0)', {"a_total", "b_total"}),
    ("sum(rate(x[5m] offset 1h)) without (le) > bool 1e3", {"x"}),
    ("count(y == 0) by (job) and on(job) group_left(z) w", {"y", "w"}),
    ('histogram_quantile(0.9, sum by (le) (rate(h_bucket{a="1",b=~"${v}"}[5m:1m])))', {"h_bucket"}),
    ("-Inf < up unless NaN", {"up"}),
])
def test_metric_names_extractor(expr: str, want: set[str]) -> None:
    assert metric_names(expr) == want


def exporter_samples() -> dict[str, set[str]]:
    """Sample name -> label names, from the real collector over a fake instance with data, and
    what `lbxdp run` adds to it."""
    return standalone_samples() | daemon_samples()


def standalone_samples() -> dict[str, set[str]]:
    """Sample name -> label names of `lbxdp exporter`: the real collector over a fake instance
    with data (a checked backend, so that lbxdp_backend_healthy appears; a VIP with a limit, for
    lbxdp_new_flow_limit_*)."""
    snap = InstanceStatus("eth0", vips=(VipStatus("10.112.0.10:8080/tcp", Stats(1, 2, 3), (
        BackendStatus("10.111.0.11:8080", Stats(1, 2, 3), True, health=Health("up", passing=True)),),
        admission=AdmissionStatus(allow=1, rate=10, burst=20)),),
        reasons=tuple(ReasonCount(r, 1, 1) for r in abi.Reason.exits()), flow_entries=1, flow_capacity=65536,
        state=AttachRecord({"version": "0.1.0", "mode": "generic", "prog_id": 7}), read_seconds=0.01)

    class Source:
        def instances(self) -> list[Instance]:
            return [Instance("eth0")]

        def read(self, inst: Instance) -> InstanceStatus:
            return snap
    return samples(make_registry(Source(), CollectorRegistry()))


def daemon_samples() -> dict[str, set[str]]:
    """Sample name -> label names of what only `lbxdp run` adds: reloads, apply and health-check
    durations (one of each observed so that every sample appears)."""
    return samples(daemon_registry())


def daemon_registry() -> CollectorRegistry:
    from lbxdp.daemon import Daemon

    reg = CollectorRegistry()
    m = Daemon(Instance("eth0"), "lb.toml").metrics.register(reg)
    m["reloads"].labels("eth0", "ok").inc()
    m["apply"].labels("eth0").observe(0.01)
    m["check"].labels("eth0", "10.112.0.10:8080/tcp", "10.111.0.11:8080", "ok").observe(0.001)
    return reg


def samples(reg: CollectorRegistry) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for fam in reg.collect():
        for s in fam.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


def test_the_standalone_exporter_serves_all_but_the_daemons_process_metrics() -> None:
    """Backend health is the exporter's too (read from the run directory), with the labels the
    daemon used; only the daemon's process metrics (in its memory) are its own."""
    standalone, daemon = standalone_samples(), daemon_samples()
    assert standalone["lbxdp_backend_healthy"] == {"interface", "vip", "backend"}
    families = {f.name for f in daemon_registry().collect()}
    assert families == {"lbxdp_config_reloads", "lbxdp_apply_seconds", "lbxdp_health_check_seconds",
                        "lbxdp_nat_gc_removed", "lbxdp_nat_gc_scanned", "lbxdp_nat_gc_seconds",   # NAT GC (issue 12)
                        "lbxdp_passive_suspects", "lbxdp_passive_ejections", "lbxdp_passive_ejections_capped"}
    assert not set(daemon) & set(standalone)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside (collapsed) rows too; rows themselves are not yielded."""
    for p in d["panels"]:
        if p.get("type") == "row":
            yield from panels(p)
        else:
            yield p


def variable_queries(d: dict[str, Any]) -> Iterator[str]:
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            yield q["query"] if isinstance(q, dict) else q


def test_every_panel_has_the_datasource_variable_and_a_target(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["interface"]["type"] == "query"
    ids = []
    for p in panels(dashboard):
        ids.append(p["id"])
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: target without expr"
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_metric_in_the_dashboard_is_one_the_exporter_defines(dashboard: dict[str, Any]) -> None:
    defined = set(exporter_samples())
    used: dict[str, set[str]] = {}
    for p in panels(dashboard):
        for t in p["targets"]:
            for name in metric_names(t["expr"]):
                used.setdefault(name, set()).add(p["title"])
    for q in variable_queries(dashboard):
        m = re.fullmatch(r"\s*label_values\(\s*(.+),\s*\w+\s*\)\s*", q)
        assert m, f"variable query {q!r}: expected label_values(SELECTOR, LABEL)"
        for name in metric_names(m.group(1)):
            used.setdefault(name, set()).add("templating")
    unknown = {n: sorted(where) for n, where in used.items() if n not in defined | PROMETHEUS_SERIES}
    assert not unknown, f"metrics the exporter does not define: {unknown} (it defines {sorted(defined)})"
    # The panels the dashboard promises are all there.
    for name in ("lbxdp_vip_packets_total", "lbxdp_vip_bytes_total", "lbxdp_backend_packets_total",
                 "lbxdp_backend_bytes_total", "lbxdp_vip_new_flows_total", "lbxdp_backend_new_flows_total",
                 "lbxdp_verdict_packets_total", "lbxdp_flow_table_entries", "lbxdp_flow_table_capacity",
                 "lbxdp_up", "lbxdp_scrape_duration_seconds", "lbxdp_backend_healthy",
                 "lbxdp_health_check_seconds_bucket", "lbxdp_config_reloads_total", "lbxdp_apply_seconds_bucket"):
        assert name in used, f"no panel shows {name}"


def test_metrics_with_an_interface_label_are_filtered_by_the_variable(dashboard: dict[str, Any]) -> None:
    with_iface = {n for n, labels in exporter_samples().items() if "interface" in labels}
    for p in panels(dashboard):
        for t in p["targets"]:
            for name in metric_names(t["expr"]) & with_iface:
                selectors = re.findall(rf"(?<![\w:]){name}(\{{[^}}]*\}})?", t["expr"])
                for sel in selectors:
                    assert 'interface=~"$interface"' in sel, f"{p['title']!r}: {name} without $interface"
