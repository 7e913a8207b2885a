"""dashboards/alerts.yml: valid Prometheus rules, unit-tested with promtool, over the exporter's names.

- `promtool check rules` accepts the file, and `promtool test rules` passes every file of
  tests/unit/alerts/ (series as a scrape shows them; each alert's labels and rendered annotations
  are pinned there).
- Every alert is tested firing and not firing, and each of those evaluations matters: with the
  alert's expression replaced by one that never fires, every firing evaluation fails; with one
  that always fires, every not-firing one fails (run on copies in a temporary directory).
- Every metric the rules select, every series the rule tests feed and every metric the
  annotations name is one the exporter (or `lbxdp run`) really exports, with those labels: the
  names come from the real collector over a fake instance that fills every family (NAT included),
  plus the daemon's registry, as in test_dashboard.py (whose PromQL name extractor is reused).

Needs /usr/bin/promtool (Debian's prometheus package, installed by scripts/install.sh); the
promtool tests are skipped with that reason when it is missing, the name checks are not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client import CollectorRegistry

from lbxdp import abi
from lbxdp.conntrack import NatStatus, PortUse
from lbxdp.exporter import make_registry
from lbxdp.maps import Conns, Stats
from lbxdp.paths import Instance
from lbxdp.view import (AdmissionStatus, AttachRecord, BackendStatus, GateStatus, Handshakes, Health, InstanceStatus,
                        QuicStatus, ReasonCount, VipStatus)

from .test_dashboard import daemon_samples, metric_names, samples

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "alerts.yml"
RULES_TESTS_DIR = Path(__file__).parent / "alerts"
RULE_TESTS = sorted(RULES_TESTS_DIR.glob("*.yml"))
PROMTOOL = Path("/usr/bin/promtool")
PROMETHEUS_LABELS = {"job", "instance"}     # what Prometheus adds to every scraped series
PROMETHEUS_SERIES = {"up"}                  # what it writes itself for every target

needs_promtool = pytest.mark.skipif(not PROMTOOL.exists(), reason=f"{PROMTOOL} not found: install Debian's "
                                    "prometheus package (scripts/install.sh does unless --no-prometheus)")


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


ALERTS = [r["alert"] for r in rules()]


def promtool(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *map(str, argv)], capture_output=True, text=True, timeout=60)


def seconds(d: str) -> float:
    """A Prometheus duration ('1m30s', '10m', '45s') in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", d)
    assert parts and "".join(n + u for n, u in parts) == d, d
    return sum(int(n) * units[u] for n, u in parts)


Eval = tuple[str, str, str, float]   # (test file, test name, alert, eval time in seconds)


def evaluations() -> Iterator[tuple[Eval, bool]]:
    """Every alert_rule_test evaluation of the rule tests, and whether it expects the alert."""
    for f in RULE_TESTS:
        doc = yaml.safe_load(f.read_text())
        for t in doc["tests"]:
            for a in t.get("alert_rule_test", []):
                yield (f.name, t.get("name", ""), a["alertname"], seconds(a["eval_time"])), bool(a.get("exp_alerts"))


# ------------------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    proc = promtool("check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout, proc.stdout


@needs_promtool
@pytest.mark.parametrize("path", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_rule_tests_pass(path: Path) -> None:
    proc = promtool("test", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing = {e[2] for e, fires in evaluations() if fires}
    quiet = {e[2] for e, fires in evaluations() if not fires}
    assert RULE_TESTS, "no rule tests in tests/unit/alerts/"
    assert not (firing | quiet) - set(ALERTS), f"tests of alerts that do not exist: {(firing | quiet) - set(ALERTS)}"
    assert not set(ALERTS) - firing, f"never tested firing: {sorted(set(ALERTS) - firing)}"
    assert not set(ALERTS) - quiet, f"never tested not firing: {sorted(set(ALERTS) - quiet)}"
    for r in rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert {"summary", "description"} <= set(r["annotations"]), r["alert"]
        assert r["alert"].startswith("Lbxdp"), r["alert"]


FAILED = re.compile(r"(?:name: (.*?),\s*)?alertname: (\w+), time: (\S+?),")


def failed_evaluations(output: str, file: str) -> set[Eval]:
    """The evaluations promtool reports as failed, from its output for one test file."""
    return {(file, m.group(1) or "", m.group(2), seconds(m.group(3))) for m in FAILED.finditer(output)}


def mutated_run(tmp: Path, alert: str, expr: str) -> set[Eval]:
    """Run the rule tests of `alert` against a copy of the rules where it has expression `expr`
    and no `for` (so it fires at the first evaluation that gives a series); the evaluations that
    failed."""
    doc = yaml.safe_load(RULES.read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            if r.get("alert") == alert:
                r["expr"] = expr
                r.pop("for", None)
    (tmp / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    failed: set[Eval] = set()
    for f in sorted({RULES_TESTS_DIR / e[0] for e, _ in evaluations() if e[2] == alert}):
        t = yaml.safe_load(f.read_text())
        t["rule_files"] = [str(tmp / "alerts.yml")]
        (tmp / f.name).write_text(yaml.safe_dump(t, sort_keys=False))
        proc = promtool("test", "rules", tmp / f.name)
        got = failed_evaluations(proc.stdout + proc.stderr, f.name)
        assert (proc.returncode != 0) == bool(got), proc.stdout + proc.stderr
        failed |= got
    return failed


@needs_promtool
@pytest.mark.parametrize("alert", ALERTS)
def test_each_evaluation_fails_when_its_alert_is_broken(alert: str, tmp_path: Path) -> None:
    """An alert that never fires fails every evaluation expecting it; one that always fires at
    once (a series without labels, no `for`) fails every evaluation expecting silence, pending
    ones included. So no evaluation passes whatever the rule says, and the failure parser sees
    what promtool reports."""
    mine = [(e, fires) for e, fires in evaluations() if e[2] == alert]
    never = mutated_run(tmp_path, alert, "vector(1) < 0")
    assert {e for e, fires in mine if fires} <= never, sorted({e for e, fires in mine if fires} - never)
    always = mutated_run(tmp_path, alert, "vector(1)")
    assert {e for e, fires in mine if not fires} <= always, sorted({e for e, fires in mine if not fires} - always)
    assert {e[2] for e in never | always} == {alert}   # the other alerts' tests still pass


# ------------------------------------------------------------------------------ names


def exporter_samples() -> dict[str, set[str]]:
    """Sample name -> label names: `lbxdp exporter` over a fake instance with data in every
    family (NAT conntrack, SNAT pool, handshakes, a checked backend, a limit), and what `lbxdp
    run` adds. test_fake_instance_fills_every_family keeps the fake complete."""
    return standalone_samples() | daemon_samples()


def standalone_registry() -> CollectorRegistry:
    nat = NatStatus(capacity=4096, entries={("original", "established"): 2, ("reply", "established"): 2}, expired=1,
                    pool=(20000, 20999), sources=("10.113.0.1",), ports=(PortUse("10.113.0.1", "tcp", 2),),
                    handshakes=6, handshake_capacity=2048)
    be = BackendStatus("10.111.0.11:8080", Stats(1, 2, 3), True, health=Health("up", passing=True),
                       handshakes=Handshakes(0, 1, 2, 3), conns=Conns(5, 1, 100))
    snap = InstanceStatus(
        "eth0", vips=(VipStatus("10.112.0.10:8080/tcp", Stats(1, 2, 3), (be,), mode="nat",
                                admission=AdmissionStatus(allow=1, rate=10, burst=20),
                                quic=((abi.QuicReason.BY_ID, 1),), backup_overflows=1),),
        reasons=tuple(ReasonCount(r, 1, 1) for r in abi.Reason.exits()), flow_entries=1, flow_capacity=65536,
        state=AttachRecord({"version": "0.1.0", "mode": "generic", "prog_id": 7}), read_seconds=0.01,
        gate=GateStatus(half_open_entries=1, cpus_flooded=1, inserts_skipped=1, half_open_written=1), nat=nat,
        quic=QuicStatus(1, ((abi.QuicReason.BY_ID, 1),)),
        bgp={"node": "serving", "error": None,           # issue 14: [bgp] (lbxdp.bgp's bgp.json)
             "vips": {"10.112.0.10:8080/tcp": {"prefix": "10.112.0.10/32", "announced": True, "why": "usable"}},
             "neighbors": [{"address": "10.111.1.1", "as": 65000, "bfd": True, "state": "up", "info": "Established",
                            "established": True}]})

    class Source:
        def instances(self) -> list[Instance]:
            return [Instance("eth0")]

        def read(self, inst: Instance) -> InstanceStatus:
            return snap
    return make_registry(Source(), CollectorRegistry())


def standalone_samples() -> dict[str, set[str]]:
    return samples(standalone_registry())


def test_fake_instance_fills_every_family() -> None:
    empty = [f.name for f in standalone_registry().collect() if not f.samples]
    assert not empty, f"families without a sample in the fake (add data for them): {empty}"


def test_every_metric_in_the_rules_is_one_the_exporter_exports() -> None:
    defined = exporter_samples()
    for r in rules():
        used = metric_names(r["expr"])
        assert used, r["alert"]
        unknown = used - set(defined) - PROMETHEUS_SERIES
        assert not unknown, f"{r['alert']}: metrics the exporter does not export: {sorted(unknown)}"
        # The labels the annotations print exist on what the expression selects.
        labels = set().union(*(defined.get(n, set()) for n in used)) | PROMETHEUS_LABELS
        for text in r["annotations"].values():
            printed = set(re.findall(r"\$labels\.(\w+)", text))
            assert printed <= labels, f"{r['alert']}: annotations print labels {sorted(printed - labels)}"
            named = set(re.findall(r"\blbxdp_\w+", text)) - set(defined)
            assert not named, f"{r['alert']}: annotations name metrics the exporter lacks: {sorted(named)}"


def test_rule_tests_feed_series_named_and_labelled_like_the_exporters() -> None:
    defined = exporter_samples()
    seen = 0
    for f in RULE_TESTS:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for s in t["input_series"]:
                m = re.fullmatch(r"\s*([\w:]+)\{(.*)\}\s*", s["series"])
                assert m, (f.name, s["series"])
                name, labels = m.group(1), set(re.findall(r"(\w+)\s*=", m.group(2)))
                if name in PROMETHEUS_SERIES:
                    assert labels == PROMETHEUS_LABELS, (f.name, s["series"])
                    continue
                assert name in defined, f"{f.name}: {name} is not a metric the exporter exports"
                assert labels == defined[name] | PROMETHEUS_LABELS, (f.name, s["series"], sorted(defined[name]))
                seen += 1
    assert seen > 20


def test_the_extractor_sees_the_names_of_multi_line_rules() -> None:
    (r,) = [r for r in rules() if r["alert"] == "LbxdpFlowTableNearCapacity"]
    assert metric_names(r["expr"]) == {"lbxdp_flow_table_entries", "lbxdp_flow_table_capacity",
                                       "lbxdp_vip_new_flows_total"}


def test_install_script_installs_prometheus_for_promtool() -> None:
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(r"PKGS\+=\(prometheus\)", script), "scripts/install.sh must install Debian's prometheus"
    if shutil.which("dpkg-query") and PROMTOOL.exists():
        owner = subprocess.run(["dpkg-query", "-S", str(PROMTOOL)], capture_output=True, text=True)
        assert owner.stdout.startswith("prometheus:"), owner.stdout + owner.stderr
