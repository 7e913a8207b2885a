"""A real Prometheus server scrapes `lbxdp exporter`; PromQL over what it stored matches the traffic.

lbxdp is attached (generic mode) to the rig's balancer through the real command (the `attached`
fixture, conftest.py), `python -m lbxdp --netns <lb> exporter eth0` serves /metrics inside the
balancer's namespace, and Debian's /usr/bin/prometheus runs in that same namespace (nsenter, as
Rig.ns_cmd does) with a 1 s scrape interval, so it reaches the exporter on 127.0.0.1 there and
nothing listens outside the namespace. Queries go to Prometheus' HTTP API from inside the
namespace too (a short Python snippet run by rig.run).

Time: the instant queries are evaluated at chosen wall-clock times (`time=`): t_before, a moment
whose latest sample was read before the traffic started, and t_after, one whose latest sample
was read a second after it ended. Between the two, the stored counters must have grown by exactly
what the client saw.

Needs /usr/bin/prometheus (scripts/install.sh installs Debian's `prometheus` package); skipped
with that reason when it is missing.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lbxdp import config, model
from lbxdp.health import HealthCheck
from lbxdp.lab.rig import FAILED, HOST_IF, LB, Rig

PROMETHEUS = Path("/usr/bin/prometheus")
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "lbxdp.json"
JOB = "lbxdp"
ROUNDS, PERIOD = 8, 0.5    # traffic rounds, one every PERIOD seconds: about 4 s of traffic

pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(),
                                reason=f"{PROMETHEUS} not found: install Debian's prometheus package "
                                "(scripts/install.sh does unless --no-prometheus)")

FREE_PORT = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
# GET argv[1] with the query parameters of the JSON object argv[2]; print the body. Any HTTP error
# (Prometheus answers 503 until it is ready) is a non-zero exit.
GET = ("import json, sys, urllib.parse, urllib.request; "
       "q = urllib.parse.urlencode(json.loads(sys.argv[2])); "
       "sys.stdout.write(urllib.request.urlopen(sys.argv[1] + ('?' + q if q else ''), timeout=5).read().decode())")

Series = dict[frozenset, float]


def lbxdp_cmd(rig: Rig, *argv: str) -> list[str]:
    return [sys.executable, "-m", "lbxdp", "--netns", rig.ns(LB), *argv]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (a safety net only; the
    fixtures stop what they start by PID)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM our child by its PID, SIGKILL if it has not exited after `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return None
    return proc.returncode


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """check() until truthy, at most `timeout` seconds; fail naming `what` and the last result."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def http(rig: Rig, url: str, params: dict[str, str] | None = None, check: bool = True) -> str | None:
    proc = rig.run(LB, sys.executable, "-c", GET, url, json.dumps(params or {}), check=check, timeout=15)
    return proc.stdout if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def daemon(rig: Rig) -> Iterator[tuple[Rig, str]]:
    """`lbxdp run eth0 --metrics 127.0.0.1:<free port>` in the balancer's namespace: the daemon
    attaches (generic mode), health-checks every backend over TCP and serves the exporter's
    metrics plus its own (reloads, apply and check durations, backend health). Yields the rig and
    the metrics target 'host:port'.

    Scope: module. Depends on: rig. Cleanup: SIGTERM by PID (SIGKILL after 10 s): the daemon
    detaches and removes its pins; it must exit 0. The config file is removed.
    """
    port = rig.run(LB, sys.executable, "-c", FREE_PORT).stdout.strip()
    target = f"127.0.0.1:{port}"
    # Every dashboard panel needs data, the admission table too: a [balancer] new-flow limit far
    # above anything this test sends (it never refuses a flow here).
    cfg = rig.lb_config(scheduler="rr", with_mac=False, health=HealthCheck(type="tcp", interval=0.5, timeout=0.4))
    limit = model.Admission(new_flow_limit=model.NewFlowLimit(rate=100_000, burst=100_000))
    text = config.dump(replace(cfg, balancer=replace(cfg.balancer, admission=limit)))
    with tempfile.NamedTemporaryFile("w", prefix="lbxdp-", suffix=".toml", delete=False) as f:
        f.write(text)
    proc = subprocess.Popen(lbxdp_cmd(rig, "run", HOST_IF, "--config", f.name, "--mode", "generic",
                                      "--metrics", target), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_die_with_parent)
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"lbxdp run exited ({proc.returncode}): {proc.stderr.read()}")
            body = http(rig, f"http://{target}/metrics", check=False)
            return body is not None and "lbxdp_backend_healthy{" in body
        wait_for("the daemon's metrics (with health results)", answers, timeout=60)
        yield rig, target
    finally:
        rc = stop(proc)
        _, err = proc.communicate()
        Path(f.name).unlink()
        assert rc == 0, f"lbxdp run did not exit cleanly on SIGTERM (rc {rc}): {err}"


@pytest.fixture(scope="module")
def attached(daemon: tuple[Rig, str]) -> Rig:
    """The rig, with lbxdp attached by the daemon (overrides conftest's `lbxdp attach` fixture)."""
    return daemon[0]


@pytest.fixture(scope="module")
def exporter(daemon: tuple[Rig, str]) -> str:
    """Where the daemon serves /metrics."""
    return daemon[1]


@pytest.fixture(scope="module")
def prometheus(attached: Rig, exporter: str) -> Iterator[str]:
    """Debian's Prometheus in the balancer's namespace scraping the exporter every second; yields
    its base URL (http://127.0.0.1:<free port>, reachable from inside that namespace only).

    Scope: module. Depends on: exporter, /usr/bin/prometheus. Config, TSDB and log live in a
    temporary directory. Cleanup: SIGTERM by PID (SIGKILL after 10 s), then the directory is
    removed, even if starting it failed.
    """
    rig = attached
    tmp = Path(tempfile.mkdtemp(prefix="lbxdp-prometheus-"))
    proc = None
    try:
        port = rig.run(LB, sys.executable, "-c", FREE_PORT).stdout.strip()
        base = f"http://127.0.0.1:{port}"
        (tmp / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{exporter}']\n")
        log = open(tmp / "prometheus.log", "wb")
        try:
            proc = subprocess.Popen(
                [*rig.ns_cmd(LB), str(PROMETHEUS), f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=info"],
                cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
        finally:
            log.close()

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited ({proc.returncode}):\n"
                            f"{(tmp / 'prometheus.log').read_text(errors='replace')[-3000:]}")
            return http(rig, f"{base}/-/ready", check=False) is not None
        wait_for("prometheus to be ready (/-/ready)", ready, timeout=30)
        yield base
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def query(rig: Rig, base: str, expr: str, at: float) -> Series:
    """Instant query evaluated at wall-clock time `at`: {labels: value}."""
    body = json.loads(http(rig, f"{base}/api/v1/query", {"query": expr, "time": f"{at:.3f}"}))
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body
    return {frozenset(r["metric"].items()): float(r["value"][1]) for r in body["data"]["result"]}


def query_range(rig: Rig, base: str, expr: str, start: float, end: float,
                step: float = 1.0) -> dict[frozenset, list[float]]:
    """Range query, one evaluation every `step` seconds: {labels: [values]}."""
    body = json.loads(http(rig, f"{base}/api/v1/query_range",
                           {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)}))
    assert body["status"] == "success", body
    return {frozenset(r["metric"].items()): [float(v) for _, v in r["values"]] for r in body["data"]["result"]}


def by(series: Series, *labels: str) -> dict[tuple[str, ...], float]:
    out = {}
    for key, v in series.items():
        d = dict(key)
        out[tuple(d.get(lb, "") for lb in labels)] = v
    return out


def by_range(series: dict[frozenset, list[float]]) -> dict[tuple[str, str], list[float]]:
    return {(dict(k)["vip"], dict(k)["backend"]): v for k, v in series.items()}


def vip_label(rig: Rig, version: int, proto: str) -> str:
    return (f"{rig.spec.vip4}:{rig.spec.port}/{proto}" if version == 4
            else f"[{rig.spec.vip6}]:{rig.spec.port}/{proto}")


def backend_label(rig: Rig, role: str, version: int) -> str:
    return f"{rig.addr4(role)}:{rig.spec.port}" if version == 4 else f"[{rig.addr6(role)}]:{rig.spec.port}"


@pytest.fixture(scope="module")
def traffic(attached: Rig, prometheus: str) -> dict[str, Any]:
    """ROUNDS rounds of UDP and TCP to both VIPs, one every PERIOD s (about 4 s), with Prometheus
    scraping throughout (a round takes ~0.1 s; the pacing spreads them over several scrapes).
    Returns what the client saw per (vip, backend) and the times t_before, t_start, t_end,
    t_after (wall clock, as Prometheus stores samples).
    """
    rig, base = attached, prometheus
    up = f'lbxdp_up{{job="{JOB}", interface="{HOST_IF}"}}'
    wait_for("prometheus to scrape the exporter (lbxdp_up 1)",
             lambda: list(query(rig, base, up, time.time()).values()) == [1.0], timeout=20)
    # t_before: the newest sample at or before it was read at least 0.5 s before traffic starts.
    def settled() -> float | None:
        t = time.time() - 0.5
        return t if len(query(rig, base, f'lbxdp_vip_packets_total{{job="{JOB}"}}', t)) == 4 else None
    t_before = wait_for("a stored sample of every VIP before the traffic", settled, timeout=20)

    sent: Counter[tuple[str, str]] = Counter()          # (vip label, backend label) -> new flows
    t_start = time.time()
    for i in range(ROUNDS):                            # one round every PERIOD seconds
        time.sleep(max(0.0, t_start + i * PERIOD - time.time()))
        for version, vip in ((4, rig.spec.vip4), (6, rig.spec.vip6)):
            for proto, n, send in (("udp", 9, rig.udp_names), ("tcp", 6, rig.tcp_names)):
                # Every datagram from its own source port, across rounds too: a port the kernel
                # handed out again would make a datagram part of an earlier flow, not a new one.
                kw = {"sport_base": 31000 + 16 * (2 * i + (version == 6))} if proto == "udp" else {}
                names = send(vip, count=n, timeout=30, **kw)
                assert names[FAILED] == 0 and sum(names.values()) == n, (version, proto, names)
                for role, k in names.items():
                    sent[(vip_label(rig, version, proto), backend_label(rig, role, version))] += k
    t_end = time.time()
    # t_after: just after the first sample scraped a second after the traffic ended (late TCP
    # ACKs have been counted by then, and nothing else reaches the VIP counters).
    def scraped_after() -> float | None:
        t = max(query(rig, base, f"timestamp({up})", time.time()).values(), default=0.0)
        return t if t > t_end + 1 else None
    ts = wait_for("a sample scraped 1 s after the traffic", scraped_after, timeout=20)
    return {"sent": sent, "t_before": t_before, "t_start": t_start, "t_end": t_end,
            "t_after": ts + 0.1}


def test_stored_new_flows_equal_what_the_client_saw_and_rate_is_non_zero(
        attached: Rig, prometheus: str, traffic: dict[str, Any]) -> None:
    rig, base, t = attached, prometheus, traffic
    sel = f'lbxdp_backend_new_flows_total{{job="{JOB}", interface="{HOST_IF}"}}'
    before = by(query(rig, base, sel, t["t_before"]), "vip", "backend")
    after = by(query(rig, base, sel, t["t_after"]), "vip", "backend")
    want = {(vip_label(rig, version, proto), backend_label(rig, role, version)): 0
            for version in (4, 6) for proto in ("tcp", "udp") for role in rig.backends}
    want = {k: t["sent"][k] for k in want}             # every backend of every VIP, 0 if none
    assert set(after) == set(want), sorted(after)
    assert {k: after[k] - before.get(k, 0.0) for k in want} == want
    assert all(n > 0 for n in want.values()), want     # round robin: every backend got flows

    # rate() over the 5 s windows during the traffic: non-zero at some step for every backend
    # that received flows (and never negative).
    rates = query_range(rig, base, f"rate({sel}[5s])", t["t_start"], t["t_after"])
    peak = {k: max(v) for k, v in by_range(rates).items()}
    for k, n in want.items():
        assert peak.get(k, 0.0) > 0 if n else peak.get(k, 0.0) == 0, (k, n, peak.get(k))
    assert all(x >= 0 for v in rates.values() for x in v)


def test_backend_packets_sum_to_their_vip_at_the_same_evaluation_time(
        attached: Rig, prometheus: str, traffic: dict[str, Any]) -> None:
    rig, base, at = attached, prometheus, traffic["t_after"]
    f = f'job="{JOB}", interface="{HOST_IF}"'
    per_backend = by(query(rig, base, f"sum by (interface, vip) (lbxdp_backend_packets_total{{{f}}})", at), "vip")
    per_vip = by(query(rig, base, f"sum by (interface, vip) (lbxdp_vip_packets_total{{{f}}})", at), "vip")
    vips = {(vip_label(rig, v, p),) for v in (4, 6) for p in ("tcp", "udp")}
    assert set(per_vip) == vips, per_vip
    assert per_backend == per_vip
    assert all(n > 0 for n in per_vip.values()), per_vip
    # The same statement as one PromQL expression: no VIP where the two sums differ.
    diff = query(rig, base, f"sum by (vip) (lbxdp_backend_packets_total{{{f}}}) "
                            f"!= sum by (vip) (lbxdp_vip_packets_total{{{f}}})", at)
    assert diff == {}, diff


def test_every_dashboard_query_runs_and_returns_data(attached: Rig, prometheus: str,
                                                     traffic: dict[str, Any]) -> None:
    """dashboards/lbxdp.json against the real server: every panel's PromQL parses and has data,
    with the Grafana variables as "All" would set them."""
    rig, base, at = attached, prometheus, traffic["t_after"]
    dash = json.loads(DASHBOARD.read_text())
    subst = {"$__rate_interval": "5s", "$interface": ".*", "$instance": ".*"}

    def expand(expr: str) -> str:
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, expr
        return expr
    empty = []
    for p in dash["panels"]:
        for tg in p["targets"]:
            if not query(rig, base, expand(tg["expr"]), at):
                empty.append((p["title"], tg["expr"]))
    assert not empty, f"queries without data: {empty}"
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            selector, label = v["query"]["query"][len("label_values("):-1].rsplit(",", 1)
            got = query(rig, base, expand(selector), at)
            assert any(label.strip() in dict(k) for k in got), (v["name"], got)
