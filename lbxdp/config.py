"""TOML config file -> model.Config, validating everything before anything touches a map.

Every error names the key path and the bad value, e.g.
    vip[1].backend[0].address: '10.0.0.300' is not an IPv4 or IPv6 address

    [metrics]
    listen = "127.0.0.1:9842" # where `lbxdp run` serves /metrics (optional)

    [[vip]]
    address = "10.112.0.10"
    port = 8080               # 0 = any port
    protocol = "tcp"          # tcp | udp
    mode = "dsr"              # dsr (L2 direct server return)
    scheduler = "maglev"      # maglev (default) | rr | hash
    table_size = 65537        # maglev only: a prime, more than 100 x backends for even shares
    slow_start = 0            # seconds over which a new backend's weight ramps up (`lbxdp run`)
      [[vip.backend]]
      address = "10.111.0.11"
      port = 8080             # optional; in dsr mode it must equal the VIP's port
      mac = "02:00:00:00:00:11"   # optional; else resolved from the neighbour table
      weight = 1              # 0-1000; 0 = no new flows
      backup = false          # true: new flows only while no primary is usable
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import abi, health, model, ring
from .errors import LbxError

T = TypeVar("T")

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_VIP_KEYS = {"address", "port", "protocol", "mode", "scheduler", "table_size", "slow_start", "health",
             "on_backend_down", "on_all_down", "backend"}
_BACKEND_KEYS = {"address", "port", "mac", "weight", "backup", "health"}
_HEALTH_KEYS = {"type", "port", "interval", "timeout", "rise", "fall", "method", "path", "status", "host",
                "send", "expect"}
_HEALTH_TYPES = ("tcp", "http", "udp")
_HTTP_ONLY, _UDP_ONLY = {"method", "path", "status", "host"}, {"send", "expect"}
_METRICS_KEYS = {"listen"}
MAX_WEIGHT = 1000
MAX_SLOW_START = 3600.0


class ConfigError(LbxError):
    def __init__(self, path: str, message: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}", "nothing was applied; fix the config and retry",
                         exit_code=2)
        self.path, self.detail = path, message


def load(path: str | Path) -> model.Config:
    """Read and validate a config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise LbxError(f"cannot read config {p}: {e.strerror}", "check the path", exit_code=2) from e
    return parse(text, source=str(p))


def parse(text: str, source: str | None = None) -> model.Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(file)", f"not valid TOML: {e}", source) from e
    try:
        return _config(doc)
    except ConfigError as e:
        raise ConfigError(e.path, e.detail, source) from None


def _show(v: Any) -> str:
    """The bad value as the error shows it: its repr, cut short if long."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _config(doc: dict[str, Any]) -> model.Config:
    _no_unknown(doc, {"vip", "metrics"}, "")
    metrics = doc.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ConfigError("metrics", f"{_show(metrics)} must be a table: write [metrics]")
    _no_unknown(metrics, _METRICS_KEYS, "metrics")
    listen = _get(metrics, "listen", "metrics", _listen, None)
    vips_doc = doc.get("vip", [])
    if not isinstance(vips_doc, list):
        raise ConfigError("vip", f"{_show(vips_doc)} must be an array of tables: write [[vip]]")
    vips = tuple(_vip(v, f"vip[{i}]") for i, v in enumerate(vips_doc))
    seen: dict[model.VipKey, str] = {}
    for i, v in enumerate(vips):
        if v.key in seen:
            raise ConfigError(f"vip[{i}]", f"duplicate VIP {v.name} (also {seen[v.key]})")
        seen[v.key] = f"vip[{i}]"
    if len(vips) > abi.MAX_VIPS:
        raise ConfigError("vip", f"{len(vips)} VIPs; at most {abi.MAX_VIPS}")
    return model.Config(vips, listen)


def _no_unknown(d: dict[str, Any], known: set[str], path: str) -> None:
    for k in d:
        if k not in known:
            where = f"{path}.{k}" if path else k
            close = difflib.get_close_matches(k, sorted(known), n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(where, f"unknown key {k!r}; {guess}known keys: {', '.join(sorted(known))}")


def _get(d: dict[str, Any], key: str, path: str, conv: Callable[[Any], T], default: Any = ...) -> T:
    if key not in d:
        if default is ...:
            raise ConfigError(f"{path}.{key}", "is required")
        return default
    try:
        return conv(d[key])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}.{key}", f"{_show(d[key])} {e}") from None


def _address(v: Any) -> model.IPAddress:
    if not isinstance(v, str):
        raise TypeError("is not a string")
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        raise ValueError("is not an IPv4 or IPv6 address") from None


def _int(lo: int, hi: int, what: str = "") -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError("is not an integer")
        if not lo <= v <= hi:
            raise ValueError(f"is out of range ({lo}-{hi}{what})")
        return v
    return conv


_port = _int(1, 65535)
_vip_port = _int(0, 65535, "; 0 = any port")
_weight = _int(0, MAX_WEIGHT)


def _table_size(v: Any) -> int:
    n = _int(2, abi.TABLE_MAX)(v)
    if not ring.is_prime(n):
        raise ValueError("is not prime (Maglev needs a prime table size, e.g. 65537, 16381, 4099, 1021)")
    return n


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("is not a number of seconds")
    if not 0 <= v <= MAX_SLOW_START:
        raise ValueError(f"is out of range (0-{MAX_SLOW_START:.0f} seconds)")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("is not true or false")
    return v


def _listen(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("is not a string like \"127.0.0.1:9842\"")
    host, sep, port = v.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("is not ADDRESS:PORT, e.g. \"127.0.0.1:9842\" or \"[::1]:9842\"")
    return v


def _choice(enum_t: type[T]) -> Callable[[Any], T]:
    def conv(v: Any) -> T:
        try:
            return enum_t(v)  # type: ignore[call-arg]
        except ValueError:
            raise ValueError(f"is not one of: {', '.join(e.value for e in enum_t)}") from None  # type: ignore[attr-defined]
    return conv


def _mac(v: Any) -> str:
    if not isinstance(v, str) or not _MAC.match(v.lower()):
        raise ValueError("is not a MAC address like 02:00:00:00:00:01")
    if v.lower() == "00:00:00:00:00:00" or int(v.split(":")[0], 16) & 1:
        raise ValueError("is not a unicast MAC address")
    return v.lower()


def _is_unicast(a: model.IPAddress) -> bool:
    """An address a packet on the wire can be for: not multicast, broadcast, 0.0.0.0/:: or loopback
    (the kernel drops loopback sources and destinations arriving on a NIC as martians)."""
    broadcast = a == ipaddress.IPv4Address("255.255.255.255")
    return not (a.is_multicast or a.is_unspecified or a.is_loopback or broadcast)


def _vip(d: Any, path: str) -> model.Vip:
    if not isinstance(d, dict):
        raise ConfigError(path, f"{_show(d)} must be a table: write [[vip]]")
    _no_unknown(d, _VIP_KEYS, path)
    address = _get(d, "address", path, _address)
    if not _is_unicast(address):
        raise ConfigError(f"{path}.address", f"{str(address)!r} cannot be a VIP "
                          "(multicast, broadcast, unspecified or loopback)")
    port = _get(d, "port", path, _vip_port)
    protocol = _get(d, "protocol", path, _choice(model.Protocol))
    mode = _get(d, "mode", path, _choice(model.Mode), model.Mode.DSR)
    scheduler = _get(d, "scheduler", path, _choice(model.Scheduler), model.Scheduler.MAGLEV)
    if "table_size" in d and scheduler is not model.Scheduler.MAGLEV:
        raise ConfigError(f"{path}.table_size", f"{_show(d['table_size'])}: table_size only applies to "
                          f"scheduler \"maglev\" (this VIP's is {scheduler.value!r})")
    table_size = _get(d, "table_size", path, _table_size, model.DEFAULT_TABLE_SIZE)
    slow_start = _get(d, "slow_start", path, _seconds, 0.0)
    on_down = _get(d, "on_backend_down", path, _one_of("keep", "migrate"), "keep")
    on_all_down = _get(d, "on_all_down", path, _one_of("drop", "pass"), "drop")
    health_doc = d.get("health")
    if health_doc is not None and not isinstance(health_doc, dict):
        raise ConfigError(f"{path}.health", f"{_show(health_doc)} must be a table: write [vip.health]")
    vip_health = _health(health_doc, f"{path}.health") if health_doc is not None else None
    backends_doc = d.get("backend", [])
    if not isinstance(backends_doc, list):
        raise ConfigError(f"{path}.backend", f"{_show(backends_doc)} must be an array of tables: "
                          "write [[vip.backend]]")
    if not backends_doc:
        raise ConfigError(f"{path}.backend", "a VIP needs at least one backend ([[vip.backend]])")
    if len(backends_doc) > abi.VIP_BACKENDS_MAX:
        raise ConfigError(f"{path}.backend", f"{len(backends_doc)} backends; at most {abi.VIP_BACKENDS_MAX} per VIP")
    backends = []
    seen: dict[tuple[Any, int], int] = {}
    for j, bd in enumerate(backends_doc):
        bpath = f"{path}.backend[{j}]"
        b = _backend(bd, bpath, port, health_doc)
        if b.address.version != address.version:
            raise ConfigError(f"{bpath}.address", f"{str(b.address)!r} is IPv{b.address.version} but the VIP "
                              f"is IPv{address.version}; {mode.value} mode cannot cross address families")
        if mode is model.Mode.DSR and b.port != port:
            raise ConfigError(f"{bpath}.port", f"{b.port} differs from the VIP port {port}; dsr mode "
                              "cannot rewrite ports (the backend answers the client directly)")
        if (b.address, b.port) in seen:
            raise ConfigError(bpath, f"duplicate backend {b.name} (also backend[{seen[(b.address, b.port)]}])")
        seen[(b.address, b.port)] = j
        backends.append(b)
    if scheduler is model.Scheduler.MAGLEV and table_size < 100 * len(backends):
        raise ConfigError(f"{path}.table_size", f"{table_size} is less than 100 x {len(backends)} backends: "
                          "shares would be uneven; use a larger prime (65537 is the default)")
    if not any(b.weight for b in backends):
        raise ConfigError(f"{path}.backend", "every backend has weight 0: the VIP could take no flow")
    return model.Vip(address, port, protocol, mode, scheduler, tuple(backends), table_size, slow_start,
                     vip_health, on_down, on_all_down)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"is not one of: {', '.join(choices)}")
        return v
    return conv


def _positive_seconds(lo: float, hi: float) -> Callable[[Any], float]:
    def conv(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError("is not a number of seconds")
        if not lo <= v <= hi:
            raise ValueError(f"is out of range ({lo:g}-{hi:g} seconds)")
        return float(v)
    return conv


def _statuses(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise TypeError("is not a list of HTTP status codes, e.g. [200, 204]")
    if not all(100 <= x <= 599 for x in v):
        raise ValueError("has a code outside 100-599")
    return tuple(v)


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v or any(c in v for c in "\r\n"):
        raise TypeError("is not a one-line string")
    return v


def _health(d: dict[str, Any], path: str) -> health.HealthCheck:
    """A [health] table (a backend's is merged over its VIP's before it gets here)."""
    _no_unknown(d, _HEALTH_KEYS, path)
    kind = _get(d, "type", path, _one_of(*_HEALTH_TYPES))
    wrong = (_HTTP_ONLY if kind != "http" else set()) | (_UDP_ONLY if kind != "udp" else set())
    for k in sorted(wrong & set(d)):
        raise ConfigError(f"{path}.{k}", f"{_show(d[k])}: {k!r} does not apply to a {kind} check")
    interval = _get(d, "interval", path, _positive_seconds(0.05, 3600), 2.0)
    timeout = _get(d, "timeout", path, _positive_seconds(0.01, 3600), min(1.0, interval))
    if timeout > interval:
        raise ConfigError(f"{path}.timeout", f"{timeout:g} is longer than the interval {interval:g}: "
                          "checks of one backend would overlap")
    path_ = _get(d, "path", path, _text, "/")
    if kind == "http" and not path_.startswith("/"):
        raise ConfigError(f"{path}.path", f"{_show(path_)} does not start with '/'")
    return health.HealthCheck(
        type=kind, port=_get(d, "port", path, _port, None), interval=interval, timeout=timeout,
        rise=_get(d, "rise", path, _int(1, 100), 2), fall=_get(d, "fall", path, _int(1, 100), 3),
        http_method=_get(d, "method", path, _one_of("GET", "HEAD", "OPTIONS"), "GET"), http_path=path_,
        http_status=_get(d, "status", path, _statuses, (200,)), http_host=_get(d, "host", path, _text, None),
        udp_payload=_get(d, "send", path, _text, "ping").encode(),
        udp_expect=(lambda e: e.encode() if e is not None else None)(_get(d, "expect", path, _text, None)))


def _backend(d: Any, path: str, vip_port: int, vip_health: dict[str, Any] | None = None) -> model.Backend:
    if not isinstance(d, dict):
        raise ConfigError(path, f"{_show(d)} must be a table: write [[vip.backend]]")
    _no_unknown(d, _BACKEND_KEYS, path)
    address = _get(d, "address", path, _address)
    if not _is_unicast(address):
        raise ConfigError(f"{path}.address", f"{str(address)!r} cannot be a backend "
                          "(multicast, broadcast, unspecified or loopback)")
    port = _get(d, "port", path, _vip_port if vip_port == 0 else _port, vip_port)
    own = d.get("health")
    if own is not None and not isinstance(own, dict):
        raise ConfigError(f"{path}.health", f"{_show(own)} must be a table: write [vip.backend.health]")
    check = _health((vip_health or {}) | own, f"{path}.health") if own is not None else None
    if (check or vip_health) and port == 0 and (check or _health(vip_health or {}, "")).port is None:
        raise ConfigError(f"{path}.health.port", "is required: an any-port backend has no port to check")
    return model.Backend(address, port, _get(d, "mac", path, _mac, None), _get(d, "weight", path, _weight, 1),
                         _get(d, "backup", path, _bool, False), check)


def dump(cfg: model.Config) -> str:
    """cfg as a config file that parse() reads back to an equal model (for the applied state)."""
    out = []
    if cfg.metrics_listen:
        out += ["[metrics]", f"listen = {_q(cfg.metrics_listen)}", ""]
    for v in cfg.vips:
        out += ["[[vip]]", f"address = {_q(str(v.address))}", f"port = {v.port}",
                f"protocol = {_q(v.protocol.value)}", f"mode = {_q(v.mode.value)}",
                f"scheduler = {_q(v.scheduler.value)}"]
        if v.scheduler is model.Scheduler.MAGLEV:
            out.append(f"table_size = {v.table_size}")
        out += [f"slow_start = {v.slow_start}", f"on_backend_down = {_q(v.on_backend_down)}",
                f"on_all_down = {_q(v.on_all_down)}", ""]
        if v.health:
            out += ["  [vip.health]", *_dump_health(v.health, "  "), ""]
        for b in v.backends:
            out += ["  [[vip.backend]]", f"  address = {_q(str(b.address))}", f"  port = {b.port}",
                    f"  weight = {b.weight}", f"  backup = {str(b.backup).lower()}"]
            if b.mac:
                out.append(f"  mac = {_q(b.mac)}")
            out.append("")
            if b.health:
                out += ["    [vip.backend.health]", *_dump_health(b.health, "    "), ""]
    return "\n".join(out)


def _dump_health(h: health.HealthCheck, indent: str) -> list[str]:
    out = [f"type = {_q(h.type)}", f"interval = {h.interval}", f"timeout = {h.timeout}", f"rise = {h.rise}",
           f"fall = {h.fall}"]
    if h.port is not None:
        out.append(f"port = {h.port}")
    if h.type == "http":
        out += [f"method = {_q(h.http_method)}", f"path = {_q(h.http_path)}",
                f"status = [{', '.join(map(str, h.http_status))}]"]
        if h.http_host:
            out.append(f"host = {_q(h.http_host)}")
    if h.type == "udp":
        out.append(f"send = {_q(h.udp_payload.decode())}")
        if h.udp_expect is not None:
            out.append(f"expect = {_q(h.udp_expect.decode())}")
    return [indent + line for line in out]


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

