"""Shared config in etcd (issue 14): three `lbxdp run --config etcd://...` daemons and a real etcd.

Shape multi (lbxdp/lab/shapes.py): cli - rt - {lb1, lb2, lb3, be1..be3} on one core segment; rt
spreads the VIP over the three balancers by ECMP. etcd (Debian's etcd-server) runs in rt's
namespace, on rt's core address and a free port, started by the module's fixture, waited for,
killed by PID and its data directory removed even on failure. Each balancer runs `lbxdp run` on
its eth0 (generic XDP) with --config etcd://<rt>:<port>/<prefix>.

What is checked: a push reaches all three within 1 s, with equal table tags (`lbxdp cluster
status`), and the client's connections follow the new config whichever balancer they cross; a
bad revision is refused by every node (log, status, cluster status) and the last good one keeps
forwarding; etcd killed: the nodes keep forwarding with their config and say etcd is down;
etcd back: they resume (a new push is applied); `lbxdp config push` of a bad file: exit 2,
nothing written.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from lbxdp import etcdsrc
from lbxdp.lab import configs
from lbxdp.lab import namespaces as nsx
from lbxdp.lab.rig import HOST_IF, RT, Rig, RigSpec
from lbxdp.lab.shapes import Shape
from lbxdp.paths import Instance

from .daemon import REPO, Daemon, rig_up

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed "
                                "(scripts/install.sh installs it)")

PREFIX = "/lbxdp-test"
CONVERGE = 1.0      # seconds: every node applies a pushed revision within this
RESUME = 5.0        # seconds: ... and the first one after etcd came back (a slower first round seen once)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    yield from rig_up(RigSpec(shape=Shape.MULTI, balancers=3, backends=3))


class Etcd:
    """etcd in the router's namespace: start() (again after kill(), same data), kill() by PID."""

    def __init__(self, rig: Rig, workdir: Path):
        self.rig, self.ns = rig, rig.ns(RT)
        self.addr = str(rig.addr4(RT, "core"))
        self.data = workdir / "etcd-data"
        self.log = workdir / "etcd.log"
        self.port, self.peer = _free_port(self.ns), _free_port(self.ns)
        self.popen: subprocess.Popen | None = None
        self.url = etcdsrc.EtcdUrl(self.addr, self.port, PREFIX)

    def start(self) -> None:
        me = f"http://127.0.0.1:{self.peer}"
        argv = ["etcd", "--name", "lbxdp-test", "--data-dir", str(self.data),
                "--listen-client-urls", f"http://{self.addr}:{self.port},http://127.0.0.1:{self.port}",
                "--advertise-client-urls", f"http://{self.addr}:{self.port}",
                "--listen-peer-urls", me, "--initial-advertise-peer-urls", me,
                "--initial-cluster", f"lbxdp-test={me}"]
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen([*nsx.ns_cmd(self.ns), *argv], stdin=subprocess.DEVNULL, stdout=f,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.popen.poll() is None, f"etcd exited:\n{self.log.read_text()[-3000:]}"
            try:
                with nsx.in_netns(self.ns):
                    etcdsrc.Client(self.url, timeout=0.5).revision_of("/ready")
                return
            except etcdsrc.EtcdError:
                assert time.monotonic() < deadline, f"etcd not ready in 30 s:\n{self.log.read_text()[-3000:]}"
                time.sleep(0.1)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def client(self) -> etcdsrc.Client:
        return etcdsrc.Client(self.url)

    def put(self, key: str, value: bytes) -> int:
        with nsx.in_netns(self.ns):
            return self.client().put(key, value)

    def get(self, key: str) -> etcdsrc.KV | None:
        with nsx.in_netns(self.ns):
            return self.client().get(key)


def _free_port(ns: str) -> int:
    with nsx.in_netns(ns):
        s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class NodeDaemon(Daemon):
    """tests/netns/daemon.Daemon, in balancer `lb`'s namespace, with an etcd:// config."""

    def __init__(self, rig: Rig, lb: str, url: str, log: Path) -> None:   # noqa: super() not called
        self.log, self.lb = log, lb
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        argv = [sys.executable, "-m", "lbxdp", "--netns", rig.ns(lb), "run", HOST_IF, "--config", url,
                "--mode", "generic", "--node", lb]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=REPO)
        self._reader = threading.Thread(target=self._read, name=f"daemon-{lb}", daemon=True)
        self._reader.start()


def lbxdp(rig: Rig, ns_role: str | None, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lbxdp", *(["--netns", rig.ns(ns_role)] if ns_role else []), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert not check or proc.returncode == 0, f"{cmd}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def config_text(rig: Rig, backends: list[str], weights: dict[str, int] | None = None) -> str:
    return configs.dump(rig.vip(4, "tcp", backends, scheduler="maglev", weights=weights))


@pytest.fixture(scope="module")
def cluster(rig: Rig) -> Iterator[tuple[Etcd, list[NodeDaemon]]]:
    work = Path(tempfile.mkdtemp(prefix="lbxdp-etcd-"))
    etcd = Etcd(rig, work)
    nodes: list[NodeDaemon] = []
    try:
        etcd.start()
        first = work / "first.toml"
        first.write_text(config_text(rig, ["be1", "be2", "be3"]))
        out = lbxdp(rig, RT, "config", "push", str(first), str(etcd.url)).stdout
        assert "revision" in out, out
        for lb in rig.balancers:
            nodes.append(NodeDaemon(rig, lb, str(etcd.url), work / f"{lb}.log"))
        for d in nodes:
            d.wait_event("attached", timeout=180)
        yield etcd, nodes
    finally:
        for d in nodes:
            d.stop()
        for lb in rig.balancers:
            lbxdp(rig, lb, "detach", HOST_IF, check=False)
        etcd.kill()
        for lb in rig.balancers:
            inst = Instance(HOST_IF, rig.ns(lb))
            assert not inst.pin_dir.exists() and not inst.run_dir.exists(), f"{lb}: pins or run state left"
        shutil.rmtree(work, ignore_errors=True)
        assert not work.exists()


def cluster_status(rig: Rig, etcd: Etcd) -> dict:
    return json.loads(lbxdp(rig, RT, "cluster", "status", str(etcd.url), "--json").stdout)


def wait_cluster(rig: Rig, etcd: Etcd, cond, what: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = cluster_status(rig, etcd)
        if cond(doc):
            return doc
        assert time.monotonic() < deadline, f"cluster never got {what}: {json.dumps(doc, indent=1)}"
        time.sleep(0.3)


def node_status(rig: Rig, lb: str) -> dict:
    return json.loads(lbxdp(rig, lb, "status", HOST_IF, "--json").stdout)


def names(rig: Rig, count: int = 60) -> dict[str, int]:
    """Backend roles that answered `count` connections of the client (FAILED counted as such)."""
    return {k: v for k, v in rig.tcp_names(rig.spec.vip4, count=count, timeout=30).items() if v}


def push_timed(etcd: Etcd, nodes: list[NodeDaemon], text: str) -> tuple[int, list[float]]:
    """Write a revision (as `config push` does: compare-and-swap) and return it with the time
    each node took to log `config-applied revision=N` after the write returned."""
    with nsx.in_netns(etcd.ns):
        c = etcd.client()
        kv = c.get(etcd.url.config_key)
        t0 = time.time()
        ok, rev = c.put_if(etcd.url.config_key, text.encode(), kv.mod_revision if kv else 0)
    assert ok
    took = []
    for d in nodes:
        t, _ = d.wait_event("config-applied", timeout=10, revision=str(rev))
        took.append(t - t0)
    if max(took) >= CONVERGE:   # what each daemon logged meanwhile, for the failure message
        for d in nodes:
            print(f"{d.lb}: " + "; ".join(f"{t - t0:+.3f} {line}" for t, line in d.lines if t > t0 - 3))
    return rev, took


def test_all_nodes_start_on_the_pushed_config_with_equal_tables(rig: Rig, cluster) -> None:
    etcd, nodes = cluster
    doc = wait_cluster(rig, etcd, lambda d: len(d["nodes"]) == 3 and d["converged"], "three converged nodes")
    assert sorted(n["node"] for n in doc["nodes"]) == sorted(rig.balancers)
    tags = {json.dumps(n["table_tags"], sort_keys=True) for n in doc["nodes"]}
    assert len(tags) == 1 and doc["tags_equal"] and all(doc["tags_equal"].values()), doc
    got = names(rig)
    assert set(got) == {"be1", "be2", "be3"}, got


def test_a_push_reaches_every_node_within_a_second_with_equal_tags(rig: Rig, cluster) -> None:
    etcd, nodes = cluster
    before = cluster_status(rig, etcd)
    figures = []
    for i, (bes, w) in enumerate([(["be1", "be2"], {"be1": 3}), (["be1", "be2", "be3"], None),
                                  (["be2", "be3"], {"be3": 2}), (["be1", "be3"], None), (["be1", "be2"], None)]):
        rev, took = push_timed(etcd, nodes, config_text(rig, bes, w))
        figures.append(max(took))
        print(f"revision {rev}: applied by {len(nodes)} nodes after "
              + ", ".join(f"{d.lb} {t * 1000:.0f} ms" for d, t in zip(nodes, took)))
        assert max(took) < CONVERGE, took
    doc = wait_cluster(rig, etcd, lambda d: d["converged"] and d["revision"] == rev, f"revision {rev} everywhere")
    assert all(doc["tags_equal"].values()), doc
    assert doc["tags_equal"] != {} and before["nodes"][0]["table_tags"] != doc["nodes"][0]["table_tags"]
    print(f"convergence (slowest node per push, {len(figures)} pushes): median {statistics.median(figures) * 1000:.0f} "
          f"ms, max {max(figures) * 1000:.0f} ms")
    got = names(rig)
    assert set(got) == {"be1", "be2"}, got       # every balancer forwards by the last revision


def test_a_bad_revision_is_refused_everywhere_and_the_last_good_stays(rig: Rig, cluster) -> None:
    etcd, nodes = cluster
    good = cluster_status(rig, etcd)
    assert good["converged"]
    bad = config_text(rig, ["be1", "be2", "be3"]).replace("weight = 1", "weight = -3", 1)
    assert bad != config_text(rig, ["be1", "be2", "be3"])
    rev = etcd.put(etcd.url.config_key, bad.encode())
    for d in nodes:
        _, kv = d.wait_event("config-refused", timeout=10, revision=str(rev))
        assert "weight" in kv["reason"], kv
    doc = wait_cluster(rig, etcd, lambda d: all((n.get("refused") or {}).get("revision") == rev for n in d["nodes"]),
                       "the refusal on every node")
    assert {n["applied_revision"] for n in doc["nodes"]} == {good["revision"]}
    assert [n["table_tags"] for n in doc["nodes"]] == [n["table_tags"] for n in good["nodes"]]
    for lb in rig.balancers:
        src = node_status(rig, lb)["config_source"]
        assert src["applied_revision"] == good["revision"] and src["refused"]["revision"] == rev, src
    got = names(rig)
    assert set(got) == {"be1", "be2"}, got       # still the last good revision
    # a good revision after it clears the refusal
    rev2, took = push_timed(etcd, nodes, config_text(rig, ["be1", "be2", "be3"]))
    assert max(took) < CONVERGE, took
    doc = wait_cluster(rig, etcd, lambda d: d["converged"] and d["revision"] == rev2 and
                       not any(n.get("refused") for n in d["nodes"]), "the good revision everywhere")


def test_etcd_down_nodes_keep_forwarding_and_say_so_then_resume(rig: Rig, cluster) -> None:
    etcd, nodes = cluster
    doc = cluster_status(rig, etcd)
    rev = doc["revision"]
    etcd.kill()
    t0 = time.time()
    try:
        for d in nodes:
            t, kv = d.wait_event("etcd-down", timeout=10)
            assert t - t0 < 3.0
        for lb in rig.balancers:
            src = node_status(rig, lb)["config_source"]
            assert src["etcd"] == "down" and src["applied_revision"] == rev, src
            assert "etcd DOWN" in lbxdp(rig, lb, "status", HOST_IF).stdout
        got = names(rig)
        assert set(got) == {"be1", "be2", "be3"}, got   # forwarding with the applied config
        time.sleep(2)
        assert all(d.alive() for d in nodes)
    finally:
        etcd.start()
    for d in nodes:
        d.wait_event("etcd-up", timeout=15)
    etcd.put("/lbxdp-test-probe", b"writable")   # etcd takes writes again (its first after a restart)
    rev2, took = push_timed(etcd, nodes, config_text(rig, ["be2", "be3"]))
    print(f"after etcd came back: revision {rev2} applied after " + ", ".join(f"{t * 1000:.0f} ms" for t in took))
    assert max(took) < RESUME, took
    doc = wait_cluster(rig, etcd, lambda d: len(d["nodes"]) == 3 and d["converged"] and d["revision"] == rev2,
                       "the nodes back in etcd on the new revision")
    for lb in rig.balancers:
        assert node_status(rig, lb)["config_source"]["etcd"] == "up"
    got = names(rig)
    assert set(got) == {"be2", "be3"}, got


def test_config_push_of_a_bad_file_exits_2_and_writes_nothing(rig: Rig, cluster, tmp_path: Path) -> None:
    etcd, nodes = cluster
    before = etcd.get(etcd.url.config_key)
    bad = tmp_path / "bad.toml"
    bad.write_text(config_text(rig, ["be1"]).replace("port = ", "port = -", 1))
    proc = lbxdp(rig, RT, "config", "push", str(bad), str(etcd.url), check=False)
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.startswith("lbxdp: error: ") and str(bad) in proc.stderr, proc.stderr
    after = etcd.get(etcd.url.config_key)
    assert after is not None and before is not None
    assert (after.mod_revision, after.value) == (before.mod_revision, before.value)
    # the same file, valid, is written; pushing it again changes nothing
    good = tmp_path / "good.toml"
    good.write_text(config_text(rig, ["be1", "be2", "be3"]))
    out = lbxdp(rig, RT, "config", "push", str(good), str(etcd.url)).stdout
    assert "pushed" in out, out
    out2 = lbxdp(rig, RT, "config", "push", str(good), str(etcd.url)).stdout
    assert "unchanged" in out2, out2
    for d in nodes:
        d.wait_event("config-applied", timeout=10, revision=str(etcd.get(etcd.url.config_key).mod_revision))
