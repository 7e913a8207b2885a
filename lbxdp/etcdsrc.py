"""Shared desired config in etcd (issue 14): `lbxdp run --config etcd://HOST:PORT/PREFIX`,
`lbxdp config push`, `lbxdp cluster status`.

Layout under PREFIX (etcd v3 keys):
  PREFIX/config         the config document, TOML text exactly as in a file: one key, so one etcd
                        revision is one whole config (its mod_revision is "the revision" below)
  PREFIX/nodes/<node>   one JSON record per running daemon, put with a lease (LEASE_TTL s, kept
                        alive), so a node that dies disappears: applied and refused revision, the
                        tag of each VIP's table (table_tags()), the announcement state, whether
                        etcd was reachable

The client speaks etcd's v3 JSON gateway (POST /v3/kv/range, /v3/kv/put, /v3/kv/txn,
/v3/lease/*; keys and values base64) with urllib: no new dependency. Debian's python3-etcd3 imports,
but it drags grpcio and protobuf into /usr/bin/python3 for four calls that are one HTTP POST each.

The daemon's EtcdService polls the config key's mod_revision every POLL seconds (a keys-only range:
a few hundred bytes); a new revision is fetched, validated exactly like a file reload
(config.parse, then control.apply, which refuses what cannot be applied, e.g. an unknown
neighbour or an empty config) and applied as one minimal diff. A revision that fails is logged
`config-refused revision=N reason=...`, recorded in the node record and in source.json (`lbxdp
status`), and the running config stays. etcd unreachable: the applied config stays, `etcd-down` is
logged once, the poll backs off (up to BACKOFF_MAX s) and `etcd-up` is logged when it answers again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from .errors import LbxError
from .paths import Instance, atomic_write

log = logging.getLogger("lbxdp.daemon")

SCHEME = "etcd://"
POLL = 0.2            # seconds between two reads of the config key's revision
LEASE_TTL = 5         # seconds a node record outlives its daemon
BACKOFF_MAX = 5.0     # longest wait between two tries while etcd does not answer
TIMEOUT = 2.0         # one HTTP request to etcd


def is_url(s: str) -> bool:
    return s.startswith(SCHEME)


@dataclass(frozen=True)
class EtcdUrl:
    host: str
    port: int
    prefix: str   # "/lbxdp" (leading slash, no trailing one); "" for the root

    @classmethod
    def parse(cls, text: str) -> "EtcdUrl":
        def bad(why: str) -> LbxError:
            return LbxError(f"bad etcd URL {text!r}: {why}", "write etcd://HOST:PORT/PREFIX, e.g. "
                            "etcd://10.0.0.5:2379/lbxdp", exit_code=2)
        if not is_url(text):
            raise bad("it does not start with etcd://")
        rest = text[len(SCHEME):]
        hostport, _, prefix = rest.partition("/")
        if hostport.startswith("["):
            host, sep, port_s = hostport[1:].partition("]:")
        else:
            host, sep, port_s = hostport.rpartition(":")
        if not sep or not host:
            raise bad("no HOST:PORT")
        try:
            port = int(port_s)
        except ValueError:
            raise bad(f"port {port_s!r} is not a number") from None
        if not 0 < port < 65536:
            raise bad(f"port {port} is out of range")
        prefix = prefix.strip("/")
        if any(c.isspace() for c in prefix) or "//" in prefix:
            raise bad("the prefix has a space or an empty path element")
        return cls(host, port, f"/{prefix}" if prefix else "")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}{host}:{self.port}{self.prefix}"

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}/nodes/"


class EtcdError(LbxError):
    """etcd did not answer, or answered with an error."""

    def __init__(self, url: EtcdUrl, why: str):
        super().__init__(f"etcd at {url} : {why}", "check that etcd runs and is reachable "
                         f"(etcdctl --endpoints {url.endpoint} endpoint health)")
        self.why = why


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _prefix_end(p: str) -> str:
    """The range_end that makes a range a prefix scan (the prefix with its last byte + 1)."""
    b = bytearray(p.encode())
    b[-1] += 1
    return _b64(bytes(b))


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int


class Client:
    """The few etcd v3 calls lbxdp needs, over the JSON gateway."""

    def __init__(self, url: EtcdUrl, timeout: float = TIMEOUT):
        self.url, self.timeout = url, timeout

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url.endpoint + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                doc = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("error") or e.reason
            except (ValueError, OSError, AttributeError):
                detail = e.reason
            raise EtcdError(self.url, f"HTTP {e.code} on {path}: {detail}") from None
        except urllib.error.URLError as e:
            raise EtcdError(self.url, str(getattr(e.reason, "strerror", None) or e.reason)) from None
        except (OSError, ValueError) as e:   # timeouts, resets, a reply that is not JSON
            raise EtcdError(self.url, f"{type(e).__name__}: {e}") from None
        if "error" in doc and "header" not in doc and "result" not in doc:
            raise EtcdError(self.url, f"{path}: {doc.get('error')}")
        return doc

    def revision_of(self, key: str) -> tuple[int, int]:
        """(the key's mod_revision, 0 if absent; the store's revision), without the value."""
        doc = self.call("/v3/kv/range", {"key": _b64(key), "keys_only": True})
        kvs = doc.get("kvs") or []
        return (int(kvs[0].get("mod_revision", 0)) if kvs else 0), int(doc["header"].get("revision", 0))

    def get(self, key: str) -> KV | None:
        doc = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = doc.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return KV(key, _unb64(kv.get("value", "")), int(kv.get("mod_revision", 0)))

    def prefix(self, prefix: str) -> list[KV]:
        doc = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [KV(_unb64(kv["key"]).decode(errors="replace"), _unb64(kv.get("value", "")),
                   int(kv.get("mod_revision", 0))) for kv in doc.get("kvs") or []]

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"].get("revision", 0))

    def put_if(self, key: str, value: bytes, mod_revision: int) -> tuple[bool, int]:
        """Compare-and-swap: put only if the key's mod_revision is still mod_revision (0: absent).
        (succeeded, the store's revision after it: the key's new mod_revision if it succeeded)."""
        doc = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD", "mod_revision": str(mod_revision), "result": "EQUAL"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}]})
        return bool(doc.get("succeeded")), int(doc["header"].get("revision", 0))

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after the renewal; 0 if it had expired (it is gone)."""
        doc = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int((doc.get("result") or {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})


# --- table tags ---------------------------------------------------------------------------------
def table_tag(slots: list[str]) -> str:
    """A digest of one VIP's table as backends (ADDR:PORT per slot), not entry ids: entry ids are
    a node's own numbering, the backend each slot names is what must agree across nodes."""
    if not slots:
        return "empty"
    h = hashlib.blake2b(digest_size=8, person=b"lbxdp-tag")
    h.update(len(slots).to_bytes(4, "little"))
    h.update("\n".join(slots).encode())
    return h.hexdigest()


def table_tags(inst: Instance) -> dict[str, str]:
    """VIP name -> table_tag() of the table this node's maps hold now (read back from the maps)."""
    from . import control
    out = {}
    with control.open_maps(inst) as m:
        names = {i: e.name for i, e in m.backends().items()}
        for key, meta in m.vips().items():
            table = m.table(meta.id)
            out[key.name] = table_tag([names.get(i, f"#{i}") for i in table])
    return out


# --- the daemon's side --------------------------------------------------------------------------
def source_file(inst: Instance) -> Any:
    """source.json in the run directory: where the running daemon's config comes from and how it
    fares (read by `lbxdp status`)."""
    return inst.run_dir / "source.json"


def read_source(inst: Instance) -> dict[str, Any] | None:
    try:
        return json.loads(source_file(inst).read_text())
    except (OSError, ValueError):
        return None


def source_text(doc: dict[str, Any]) -> str:
    """One line of `lbxdp status` for source.json."""
    out = f"config from {doc.get('source')}: revision {doc.get('applied_revision') or 'none (kept from before)'} applied"
    if doc.get("refused"):
        out += f"; revision {doc['refused'].get('revision')} refused ({doc['refused'].get('reason')})"
    if doc.get("etcd") == "down":
        since = doc.get("etcd_down_since")
        ago = f" for {max(0.0, time.time() - since):.0f}s" if since else ""
        out += f"; etcd DOWN{ago} ({doc.get('etcd_error')}), keeping the applied config"
    return out


def default_node_name(inst: Instance) -> str:
    host = socket.gethostname()
    return f"{host}:{inst.netns}:{inst.ifname}" if inst.netns else f"{host}:{inst.ifname}"


def _event(name: str, **kv: Any) -> None:
    from .daemon import _event as ev
    ev(name, **kv)


class Watcher:
    """The poll thread: follows the config key's revision and keeps the node record alive.

    It only talks to etcd; the daemon's thread takes what it fetched (take()) and applies it, and
    hands back what the record says (publish())."""

    def __init__(self, url: EtcdUrl, node: str, wake: threading.Event, poll: float = POLL):
        self.url, self.node, self.wake, self.poll = url, node, wake, poll
        self.client = Client(url)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen = 0                              # newest config revision fetched
        self._pending: tuple[int, bytes | None] | None = None
        self.up: bool | None = None                # None: not asked yet
        self.error = ""
        self.down_since: float | None = None
        self._record: dict[str, Any] = {}
        self._record_dirty = False
        self._lease = 0
        self._renewed = 0.0
        self._poke = threading.Event()             # wakes the thread before its next poll

    # daemon thread
    def start(self, seen: int) -> None:
        self.seen = seen
        self._thread = threading.Thread(target=self._run, name="lbxdp-etcd", daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, bytes | None] | None:
        with self._lock:
            p, self._pending = self._pending, None
            return p

    def publish(self, record: dict[str, Any]) -> None:
        with self._lock:
            if record == self._record:
                return
            self._record, self._record_dirty = dict(record), True
        self._poke.set()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout=TIMEOUT + 1)
        if self._lease:
            try:   # a clean stop: the record goes at once, not after its TTL
                Client(self.url, timeout=1.0).revoke(self._lease)
            except EtcdError:
                pass

    # the thread
    def _run(self) -> None:
        backoff = self.poll
        while not self._stop.is_set():
            try:
                self._once()
                self._set_up(True, "")
                backoff = self.poll
            except EtcdError as e:
                self._set_up(False, e.why)
                self._lease = 0    # granted again (with the record) once etcd answers
                backoff = min(BACKOFF_MAX, max(backoff * 2, 0.5))
            self._poke.wait(backoff)
            self._poke.clear()

    def _once(self) -> None:
        mod, _ = self.client.revision_of(self.url.config_key)
        if mod != self.seen:
            kv = self.client.get(self.url.config_key)
            rev = kv.mod_revision if kv else 0
            with self._lock:
                self.seen = rev
                self._pending = (rev, kv.value if kv else None)
            self.wake.set()
        self._keep_record()

    def _keep_record(self) -> None:
        now = time.monotonic()
        with self._lock:
            record, dirty = self._record, self._record_dirty
        if not record:
            return
        if self._lease and now - self._renewed >= LEASE_TTL / 3:
            if self.client.keepalive(self._lease) <= 0:
                self._lease = 0
            self._renewed = now
        if not self._lease:
            self._lease = self.client.grant(LEASE_TTL)
            self._renewed = now
            dirty = True
        if dirty:
            doc = dict(record, etcd="up", updated=time.time())
            self.client.put(self.url.nodes_prefix + self.node, json.dumps(doc, sort_keys=True).encode(),
                            lease=self._lease)
            with self._lock:
                if self._record is record:
                    self._record_dirty = False

    def _set_up(self, up: bool, error: str) -> None:
        with self._lock:
            was = self.up
            self.up, self.error = up, error
            if up:
                self.down_since = None
            elif self.down_since is None:
                self.down_since = time.time()
        if was is not up:
            self.wake.set()   # the daemon logs it and rewrites source.json


def fetch_config(url: EtcdUrl, timeout: float = TIMEOUT) -> tuple[int, str]:
    """(revision, text) of the config document now; EtcdError if etcd does not answer, LbxError
    (exit 2) if there is no document under the prefix."""
    kv = Client(url, timeout).get(url.config_key)
    if kv is None:
        raise LbxError(f"no config at {url} (key {url.config_key} is absent)",
                       f"push one: lbxdp config push lb.toml {url}", exit_code=2)
    return kv.mod_revision, _text(kv.value)


def _text(value: bytes) -> str:
    from . import config
    if len(value) > config.MAX_BYTES:
        raise LbxError(f"larger than {config.MAX_BYTES // (1024 * 1024)} MiB", "a config is at most 4 MiB", exit_code=2)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LbxError(f"not UTF-8 (byte at offset {e.start})", "push a UTF-8 file", exit_code=2) from None


class EtcdService:
    """The daemon's config source when --config is an etcd:// URL (see the module docstring).

    apply(cfg, source) is the daemon's reload path (validated apply of a minimal diff; raises on
    refusal); announcements() what the BGP service says, if there is one."""

    name = "etcd"

    def __init__(self, inst: Instance, url: EtcdUrl, node: str, wake: threading.Event,
                 apply: Callable[[Any, str], Any], announcements: Callable[[], Any] | None = None):
        self.inst, self.url, self.node = inst, url, node
        self.apply_fn, self.announcements = apply, announcements
        self.watcher = Watcher(url, node, wake)
        self.applied = 0          # revision applied (0: none from etcd yet, e.g. kept from an earlier run)
        self.applied_at: float | None = None
        self.refused: dict[str, Any] | None = None
        self.tags: dict[str, str] = {}
        self._logged_up: bool | None = None
        self._down_t = 0.0
        self._force = False       # apply the next revision fetched even if it is the applied one
        self._source_doc: dict[str, Any] = {}

    def initial(self, timeout: float = 5.0) -> tuple[int, Any]:
        """The config to start with: etcd's document (validated), (revision, cfg). etcd down at
        start: the instance's last applied config if it has one (revision 0), else an error."""
        from . import applied, config
        deadline = time.monotonic() + timeout
        while True:
            try:
                rev, text = fetch_config(self.url)
                break
            except EtcdError as e:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if self.inst.applied_file.exists():
                    st = applied.load(self.inst)
                    if st.cfg.vips:
                        _event("etcd-down", url=self.url, error=e.why, kept="the instance's last applied config")
                        self.watcher.up, self.watcher.error, self.watcher.down_since = False, e.why, time.time()
                        return 0, st.cfg
                raise
        cfg = config.parse(text, source=f"{self.url}@{rev}")
        self.applied, self.applied_at = rev, time.time()
        return rev, cfg

    # Service
    def start(self, state: Any) -> None:
        self.watcher.start(self.applied)
        self._write_source()

    def on_change(self, state: Any) -> None:
        try:
            self.tags = table_tags(self.inst)
        except (LbxError, OSError) as e:
            log.debug("table tags: %s", e)
        self._publish()

    def tick(self) -> None:
        w = self.watcher
        if w.up is not self._logged_up and w.up is not None:
            if w.up:
                _event("etcd-up", url=self.url, **({"was_down_for": f"{time.time() - self._down_t:.1f}s"}
                                                   if self._logged_up is False else {}))
            else:
                self._down_t = w.down_since or time.time()
                _event("etcd-down", url=self.url, error=w.error, kept=f"revision {self.applied or 'from before'}",
                       retry="with backoff")
            self._logged_up = w.up
        got = w.take()
        if got is not None:
            self._revision(*got)
        self._publish()
        self._write_source()

    def _revision(self, rev: int, value: bytes | None) -> None:
        from . import config
        if rev == self.applied and not self._force:
            return
        self._force = False
        t = time.monotonic()
        try:
            if value is None:
                raise LbxError(f"the key {self.url.config_key} was deleted", "push a config")
            cfg = config.parse(_text(value), source=f"{self.url}@{rev}")
            self.apply_fn(cfg, f"{self.url}@{rev}")
        except Exception as e:  # noqa: BLE001 - any refusal: the running config stays
            reason = e.message if isinstance(e, LbxError) else f"{type(e).__name__}: {e}"
            self.refused = {"revision": rev, "reason": reason, "at": time.time()}
            _event("config-refused", revision=rev, reason=reason, kept=f"revision {self.applied}")
            return
        self.applied, self.applied_at, self.refused = rev, time.time(), None
        _event("config-applied", revision=rev, seconds=f"{time.monotonic() - t:.3f}")

    def refetch(self) -> None:
        """SIGHUP (`lbxdp reload`): fetch the current revision and apply it again, e.g. after a
        refusal for something outside the config (a neighbour that did not resolve)."""
        self._force = True
        with self.watcher._lock:
            self.watcher.seen = -1
        self.watcher._poke.set()

    def _announce(self) -> Any:
        if self.announcements is None:
            return None
        try:
            return self.announcements()
        except Exception:  # noqa: BLE001 - the BGP side's trouble is not the record's
            return None

    def record(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"node": self.node, "interface": self.inst.label, "applied_revision": self.applied,
                               "table_tags": self.tags, "refused": self.refused}
        ann = self._announce()
        if ann is not None:
            doc["announcements"] = ann
        return doc

    def _publish(self) -> None:
        self.watcher.publish(self.record())

    def status(self) -> dict[str, Any]:
        w = self.watcher
        return {"source": str(self.url), "node": self.node, "applied_revision": self.applied,
                "applied_at": self.applied_at, "refused": self.refused,
                "etcd": "up" if w.up else "down" if w.up is False else "unknown",
                "etcd_error": w.error or None, "etcd_down_since": w.down_since, "seen_revision": w.seen}

    def _write_source(self) -> None:
        doc = self.status()
        if doc != self._source_doc:
            try:
                atomic_write(source_file(self.inst), json.dumps(doc, indent=2))
                self._source_doc = doc
            except OSError:
                pass

    def stop(self) -> None:
        self.watcher.stop()
        try:
            source_file(self.inst).unlink()
        except OSError:
            pass
