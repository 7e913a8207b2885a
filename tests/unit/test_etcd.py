"""lbxdp.etcdsrc without a kernel: URLs, table tags, the config source's decisions, the poll thread
against a stand-in for etcd's JSON gateway on loopback (tests/netns/test_etcd.py runs real etcd),
and `lbxdp config push` refusing a bad file before it talks to anyone."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from lbxdp import etcdsrc
from lbxdp.cli import cli
from lbxdp.errors import LbxError
from lbxdp.etcdsrc import EtcdService, EtcdUrl, table_tag
from lbxdp.paths import Instance

GOOD = """
[[vip]]
address = "10.0.0.1"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "10.0.1.1"
"""


@pytest.mark.parametrize("text, host, port, prefix", [
    ("etcd://127.0.0.1:2379/lbxdp", "127.0.0.1", 2379, "/lbxdp"),
    ("etcd://[fd00::1]:2379/a/b/", "fd00::1", 2379, "/a/b"),
    ("etcd://etcd.example:1", "etcd.example", 1, ""),
])
def test_urls(text: str, host: str, port: int, prefix: str) -> None:
    u = EtcdUrl.parse(text)
    assert (u.host, u.port, u.prefix) == (host, port, prefix)
    assert u.config_key == f"{prefix}/config" and u.nodes_prefix == f"{prefix}/nodes/"
    assert EtcdUrl.parse(str(u)) == u


@pytest.mark.parametrize("text", ["http://h:1/x", "etcd://h/x", "etcd://:1/x", "etcd://h:99999/x",
                                  "etcd://h:abc/x", "etcd://h:1/a//b", "etcd://h:1/a b"])
def test_bad_urls_are_refused_with_exit_2(text: str) -> None:
    with pytest.raises(LbxError) as e:
        EtcdUrl.parse(text)
    assert e.value.exit_code == 2 and "etcd://HOST:PORT/PREFIX" in (e.value.hint or "")


def test_table_tags_name_backends_not_slots_order_free_of_ids() -> None:
    a = table_tag(["10.0.1.1:80", "10.0.1.2:80", "10.0.1.1:80"])
    assert a == table_tag(["10.0.1.1:80", "10.0.1.2:80", "10.0.1.1:80"])
    assert a != table_tag(["10.0.1.2:80", "10.0.1.1:80", "10.0.1.1:80"])
    assert a != table_tag(["10.0.1.1:80", "10.0.1.2:80"])
    assert table_tag([]) == "empty" and len(a) == 16


# --- a stand-in for etcd's v3 JSON gateway ----------------------------------------------------------
class FakeEtcd:
    """Enough of /v3/kv/range|put|txn and /v3/lease/* for the client: one revision counter."""

    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, int, int]] = {}   # key -> (value, mod_revision, lease)
        self.rev = 1
        self.leases: set[int] = set()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def handle(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append(path)
            d = base64.b64decode
            e = lambda b: base64.b64encode(b).decode()   # noqa: E731
            if path == "/v3/kv/range":
                key = d(body["key"])
                end = d(body["range_end"]) if "range_end" in body else None
                keys = sorted(k for k in self.kv if (k == key if end is None else key <= k < end))
                kvs = [{"key": e(k), "mod_revision": str(self.kv[k][1]),
                        **({} if body.get("keys_only") else {"value": e(self.kv[k][0])})} for k in keys]
                return {"header": {"revision": str(self.rev)}, **({"kvs": kvs, "count": str(len(kvs))} if kvs else {})}
            if path == "/v3/kv/put":
                self.rev += 1
                self.kv[d(body["key"])] = (d(body["value"]), self.rev, int(body.get("lease", 0)))
                return {"header": {"revision": str(self.rev)}}
            if path == "/v3/kv/txn":
                (c,) = body["compare"]
                have = self.kv.get(d(c["key"]), (b"", 0, 0))[1]
                if have != int(c["mod_revision"]):
                    return {"header": {"revision": str(self.rev)}}
                (op,) = body["success"]
                self.rev += 1
                self.kv[d(op["request_put"]["key"])] = (d(op["request_put"]["value"]), self.rev, 0)
                return {"header": {"revision": str(self.rev)}, "succeeded": True}
            if path == "/v3/lease/grant":
                lease = 1000 + len(self.leases)
                self.leases.add(lease)
                return {"header": {}, "ID": str(lease), "TTL": body["TTL"]}
            if path == "/v3/lease/keepalive":
                return {"result": {"ID": body["ID"], "TTL": "5" if int(body["ID"]) in self.leases else "0"}}
            if path == "/v3/lease/revoke":
                lease = int(body["ID"])
                self.leases.discard(lease)
                self.kv = {k: v for k, v in self.kv.items() if v[2] != lease}
                return {"header": {}}
        raise KeyError(path)


@pytest.fixture
def fake() -> Iterator[tuple[FakeEtcd, ThreadingHTTPServer]]:
    etcd = FakeEtcd()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:   # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                out = json.dumps(etcd.handle(self.path, body)).encode()
                self.send_response(200)
            except KeyError:
                out = b'{"error": "not found"}'
                self.send_response(404)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield etcd, srv
    finally:
        srv.shutdown()
        srv.server_close()


def url_of(srv: ThreadingHTTPServer) -> EtcdUrl:
    return EtcdUrl("127.0.0.1", srv.server_address[1], "/t")


def test_client_calls(fake) -> None:
    etcd, srv = fake
    c = etcdsrc.Client(url_of(srv))
    assert c.get("/t/config") is None and c.revision_of("/t/config")[0] == 0
    ok, rev = c.put_if("/t/config", b"one", 0)
    assert ok and c.get("/t/config") == etcdsrc.KV("/t/config", b"one", rev)
    assert c.put_if("/t/config", b"two", 0) == (False, rev)        # a stale revision: not written
    assert c.get("/t/config").value == b"one"
    c.put("/t/nodes/a", b"{}")
    c.put("/t/nodesx", b"{}")
    assert [kv.key for kv in c.prefix("/t/nodes/")] == ["/t/nodes/a"]


def test_an_unreachable_etcd_is_an_etcd_error() -> None:
    with pytest.raises(etcdsrc.EtcdError):
        etcdsrc.Client(EtcdUrl("127.0.0.1", 1, "/t"), timeout=0.5).get("/t/config")


class Source:
    """An EtcdService with a fake apply and no maps (table tags stay as given)."""

    def __init__(self, tmp_path: Path, url: EtcdUrl, fail_apply: bool = False):
        self.applied_cfgs: list[Any] = []
        self.fail_apply = fail_apply
        inst = Instance("eth9")
        self.svc = EtcdService(inst, url, "n1", threading.Event(), self.apply, lambda: {"10.0.0.1:80/tcp": "announced"})

    def apply(self, cfg: Any, source: str) -> None:
        if self.fail_apply:
            raise LbxError("cannot resolve the MAC of 10.0.1.1")
        self.applied_cfgs.append(cfg)


@pytest.fixture
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(tmp_path / "pins"))
    (tmp_path / "run" / "eth9").mkdir(parents=True)
    return tmp_path


def test_a_bad_revision_is_refused_and_the_last_good_one_stays(run_root: Path) -> None:
    s = Source(run_root, EtcdUrl("127.0.0.1", 1, "/t"))
    s.svc._revision(5, GOOD.encode())
    assert s.svc.applied == 5 and s.svc.refused is None and len(s.applied_cfgs) == 1
    s.svc._revision(6, GOOD.replace('protocol = "tcp"', 'protocol = "sctp"').encode())
    assert s.svc.applied == 5 and s.svc.refused["revision"] == 6 and "protocol" in s.svc.refused["reason"]
    s.svc._revision(7, b"\xff\xfe")
    assert s.svc.applied == 5 and s.svc.refused["revision"] == 7 and "UTF-8" in s.svc.refused["reason"]
    s.svc._revision(8, None)
    assert s.svc.applied == 5 and "deleted" in s.svc.refused["reason"]
    s.svc._revision(9, GOOD.encode())
    assert s.svc.applied == 9 and s.svc.refused is None and len(s.applied_cfgs) == 2
    rec = s.svc.record()
    assert rec["applied_revision"] == 9 and rec["announcements"] == {"10.0.0.1:80/tcp": "announced"}


def test_a_revision_that_cannot_be_applied_is_refused(run_root: Path) -> None:
    s = Source(run_root, EtcdUrl("127.0.0.1", 1, "/t"), fail_apply=True)
    s.svc._revision(3, GOOD.encode())
    assert s.svc.applied == 0 and s.svc.refused["revision"] == 3 and "MAC" in s.svc.refused["reason"]


def test_the_watcher_follows_revisions_keeps_the_record_and_sees_etcd_go(run_root: Path, fake) -> None:
    etcd, srv = fake
    url = url_of(srv)
    c = etcdsrc.Client(url)
    s = Source(run_root, url)
    c.put_if(url.config_key, GOOD.encode(), 0)
    s.svc.watcher.poll = 0.05
    s.svc.start(None)
    try:
        deadline = time.monotonic() + 5
        while s.svc.applied == 0:
            assert time.monotonic() < deadline, "no revision applied"
            time.sleep(0.02)
            s.svc.tick()
        first = s.svc.applied
        assert first == c.get(url.config_key).mod_revision
        while not c.prefix(url.nodes_prefix):
            assert time.monotonic() < deadline, "no node record"
            time.sleep(0.02)
            s.svc.tick()
        (rec,) = c.prefix(url.nodes_prefix)
        assert rec.key == url.nodes_prefix + "n1" and json.loads(rec.value)["applied_revision"] == first
        assert etcd.kv[rec.key.encode()][2] in etcd.leases                    # put with a lease
        src = json.loads(etcdsrc.source_file(s.svc.inst).read_text())
        assert src["etcd"] == "up" and src["applied_revision"] == first
        # etcd goes away: the applied revision stays, source.json says etcd is down
        srv.shutdown()
        srv.server_close()
        deadline = time.monotonic() + 5
        while s.svc.watcher.up is not False:
            assert time.monotonic() < deadline, "etcd never seen down"
            time.sleep(0.05)
        s.svc.tick()
        src = json.loads(etcdsrc.source_file(s.svc.inst).read_text())
        assert src["etcd"] == "down" and src["applied_revision"] == first and src["etcd_error"]
        assert "etcd DOWN" in etcdsrc.source_text(src)
    finally:
        s.svc.stop()
    assert not etcdsrc.source_file(s.svc.inst).exists()


def test_config_push_refuses_a_bad_file_with_exit_2_before_talking_to_etcd(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("port = 80", "port = 70000"))
    r = subprocess.run([sys.executable, "-m", "lbxdp", "config", "push", str(bad), "etcd://127.0.0.1:1/t"],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and r.stdout == "", r
    first, *rest = r.stderr.splitlines()
    assert first.startswith(f"lbxdp: error: {bad}: vip[0].port: 70000") and len(rest) == 1, r.stderr
    assert "etcd" not in r.stderr     # refused before any connection (port 1 would have said so)


def test_config_push_writes_with_compare_and_swap(tmp_path: Path, fake) -> None:
    etcd, srv = fake
    url = url_of(srv)
    good = tmp_path / "lb.toml"
    good.write_text(GOOD)
    r = CliRunner().invoke(cli, ["config", "push", str(good), str(url)])
    assert r.exit_code == 0 and "pushed" in r.output, r.output
    rev = etcdsrc.Client(url).get(url.config_key).mod_revision
    r = CliRunner().invoke(cli, ["config", "push", str(good), str(url)])
    assert r.exit_code == 0 and "unchanged" in r.output
    good.write_text(GOOD.replace("10.0.1.1", "10.0.1.2"))
    r = CliRunner().invoke(cli, ["config", "push", str(good), str(url), "--if-revision", str(rev - 1)])
    assert r.exception.exit_code == 3 and etcdsrc.Client(url).get(url.config_key).mod_revision == rev
    r = CliRunner().invoke(cli, ["config", "push", str(good), str(url), "--if-revision", str(rev)])
    assert r.exit_code == 0 and etcdsrc.Client(url).get(url.config_key).value == good.read_bytes()


def test_cluster_status_marks_differing_tags(fake) -> None:
    etcd, srv = fake
    url = url_of(srv)
    c = etcdsrc.Client(url)
    _, rev = c.put_if(url.config_key, GOOD.encode(), 0)
    for n, tag, applied in (("a", "1111", rev), ("b", "1111", rev), ("c", "2222", rev - 1)):
        c.put(url.nodes_prefix + n, json.dumps({"node": n, "applied_revision": applied,
                                                 "table_tags": {"10.0.0.1:80/tcp": tag}}).encode())
    r = CliRunner().invoke(cli, ["cluster", "status", str(url), "--json"])
    doc = json.loads(r.output)
    assert doc["revision"] == rev and not doc["converged"] and doc["tags_equal"] == {"10.0.0.1:80/tcp": False}
    assert [n["current"] for n in doc["nodes"]] == [True, True, False]
    text = CliRunner().invoke(cli, ["cluster", "status", str(url)]).output
    assert "NOT converged" in text and "(behind)" in text and "table 2222 *" in text
