"""TOML config file <-> model.Config: nothing touches a map before the whole file is valid.

This module converts: types, shapes, unknown keys and the syntax of values (addresses, enum
names); then it asks the model (model.Config.problems()) for every rule about what the values
mean together (families, the dsr port rule, table sizes, weights, duplicates, ...), so a file, an
edit and a model built in code get the same errors. Every error names the key path and the bad
value, e.g.
    vip[1].backend[0].address: '10.0.0.300' is not an IPv4 or IPv6 address

    [metrics]
    listen = "127.0.0.1:9842" # where `lbxdp run` serves /metrics (optional)

    [[vip]]
    address = "10.112.0.10"
    port = 8080               # 0 = any port
    protocol = "tcp"          # tcp | udp
    mode = "dsr"              # dsr (L2 direct server return) | ipip | gue (L3 DSR by encapsulation) | nat
    scheduler = "maglev"      # maglev (default) | rr | hash | source | leastconn
    table_size = 65537        # maglev, source, leastconn: a prime, more than 100 x backends for even shares
    # source_prefix = 24      # source only: client address bits hashed (default all: 32 / 128)
    slow_start = 0            # seconds over which a new backend's weight ramps up (`lbxdp run`)
      [[vip.backend]]
      address = "10.111.0.11"
      port = 8080             # optional; in dsr/ipip/gue mode it must equal the VIP's port (nat: any)
      mac = "02:00:00:00:00:11"   # optional; else resolved from the neighbour table
      weight = 1              # 0-1000; 0 = no new flows
      backup = false          # true: new flows only while no primary is usable
      max_conns = 0           # open connections past which it gets no new flow; 0 = no cap
      # server_id = 7         # quic VIPs (quic = true on a udp VIP): the 16-bit id in its connection IDs
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Callable, TypeVar

import tomli_w

from . import abi, health, model
from .errors import LbxError

T = TypeVar("T")

_VIP_KEYS = {"address", "port", "protocol", "mode", "scheduler", "table_size", "slow_start", "health",
             "on_backend_down", "on_all_down", "backend", "gue_port", "ipip_source", "mtu", "mss_clamp",
             "allow", "deny", "new_flow_limit", "snat", "passive_health", "source_prefix", "quic",
             "announce"}
_BACKEND_KEYS = {"address", "port", "mac", "weight", "backup", "health", "max_conns", "server_id"}
_HEALTH_KEYS = {"type", "port", "interval", "timeout", "rise", "fall", "method", "path", "status", "host",
                "send", "expect", "via"}
_HTTP_ONLY, _UDP_ONLY = {"method", "path", "status", "host"}, {"send", "expect"}
_METRICS_KEYS = {"listen"}
_GATE_KEYS = {"flood_threshold"}   # [balancer]: the handshake gate's (bpf/select.h)
_BALANCER_KEYS = {"ipv4_source", "ipv6_source", "flow_source_v4", "flow_source_v6", "mtu",
                  "allow", "deny", "new_flow_limit"}
_NAT_KEYS = {"snat_v4", "snat_v6", "snat_ports", "nat_timeouts"}   # [balancer]: NAT mode's (issue 12)
_NAT_TIMEOUT_KEYS = {"tcp_syn", "tcp_established", "tcp_close", "udp"}
_PASSIVE_HEALTH_KEYS = {"failures", "timeout", "max_ejected"}
_ADMISSION_KEYS = ("allow", "deny", "new_flow_limit")
_LIMIT_KEYS = {"rate", "burst"}
_BGP_KEYS = {"local_as", "router_id", "source_v4", "source_v6", "announce", "hold_time", "withdraw_grace",
             "bfd_interval", "bfd_multiplier", "neighbor"}   # [bgp] (issue 14, lbxdp.bgp)
_BGP_NEIGHBOR_KEYS = {"address", "as", "bfd"}
MAX_WEIGHT, MAX_SLOW_START, MAX_BACKEND_ENTRIES = model.MAX_WEIGHT, model.MAX_SLOW_START, model.MAX_BACKEND_ENTRIES
MAX_BYTES = 4 * 1024 * 1024   # a config file larger than this is refused before it is read


class ConfigError(LbxError):
    def __init__(self, path: str, message: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}", "nothing was applied; fix the config and retry",
                         exit_code=2)
        self.path, self.detail = path, message


def load(path: str | Path) -> model.Config:
    """Read and validate a config file."""
    return parse(read_text(path), source=str(path))


def read_text(path: str | Path) -> str:
    """A config file's text, read so that it cannot block or run away: only a regular file (a
    FIFO, a device like /dev/zero, a directory are refused after an O_NONBLOCK open, before any
    read), at most MAX_BYTES (checked on the size before reading), and UTF-8."""
    p = str(path)

    def fail(why: str, hint: str = "check the path") -> LbxError:
        return LbxError(f"cannot read config {p}: {why}", hint, exit_code=2)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise fail("it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise fail("not a regular file (a FIFO, device or socket)", "write the config to a regular file")
        too_big = fail(f"larger than {MAX_BYTES // (1024 * 1024)} MiB", "a config is at most 4 MiB")
        if st.st_size > MAX_BYTES:
            raise too_big
        chunks, n = [], 0
        while n <= MAX_BYTES:        # the file may grow while we read: never past the limit
            chunk = os.read(fd, min(1 << 20, MAX_BYTES + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > MAX_BYTES:
            raise too_big
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise fail(f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line})",
                   "save the file as UTF-8") from None


def parse(text: str, source: str | None = None) -> model.Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(file)", f"not valid TOML: {e}", source) from e
    except (RecursionError, MemoryError):
        raise ConfigError("(file)", "nested too deeply (arrays or inline tables inside each other)",
                          source) from None
    try:
        cfg = _config(doc)
        for p in cfg.problems()[:1]:
            raise ConfigError(p.path, p.message)
        return cfg
    except ConfigError as e:
        raise ConfigError(e.path, e.detail, source) from None
    except (RecursionError, MemoryError):
        raise ConfigError("(file)", "nested too deeply (arrays or inline tables inside each other)",
                          source) from None


def warnings(cfg: model.Config) -> list[str]:
    """What is valid but probably not meant (model.Config.warnings()), as 'key path: message'
    lines (the CLI prints each as `lbxdp: warning: ...`; nothing is refused for them)."""
    return [str(w) for w in cfg.warnings()]


_show = model.show


def _config(doc: dict[str, Any]) -> model.Config:
    _no_unknown(doc, {"vip", "metrics", "balancer", "bgp"}, "")
    metrics = doc.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ConfigError("metrics", f"{_show(metrics)} must be a table: write [metrics]")
    _no_unknown(metrics, _METRICS_KEYS, "metrics")
    listen = _get(metrics, "listen", "metrics", _listen, None)
    vips_doc = doc.get("vip", [])
    if not isinstance(vips_doc, list):
        raise ConfigError("vip", f"{_show(vips_doc)} must be an array of tables: write [[vip]]")
    return model.Config(tuple(_vip(v, f"vip[{i}]") for i, v in enumerate(vips_doc)), listen,
                        _balancer(doc.get("balancer", {})), bgp=_bgp(doc["bgp"]) if "bgp" in doc else None)


def _bgp(d: Any) -> model.BgpOptions:
    """[bgp] and its [[bgp.neighbor]]s; ranges and families are the model's rules."""
    if not isinstance(d, dict):
        raise ConfigError("bgp", f"{_show(d)} must be a table: write [bgp]")
    _no_unknown(d, _BGP_KEYS, "bgp")
    ns = d.get("neighbor", [])
    if not isinstance(ns, list):
        raise ConfigError("bgp.neighbor", f"{_show(ns)} must be an array of tables: write [[bgp.neighbor]]")
    neighbors = []
    for j, n in enumerate(ns):
        path = f"bgp.neighbor[{j}]"
        if not isinstance(n, dict):
            raise ConfigError(path, f"{_show(n)} must be a table: write [[bgp.neighbor]]")
        _no_unknown(n, _BGP_NEIGHBOR_KEYS, path)
        neighbors.append(model.BgpNeighbor(_get(n, "address", path, _address), _get(n, "as", path, _integer),
                                           _get(n, "bfd", path, _bool, True)))
    dflt = model.BgpOptions(0)
    return model.BgpOptions(
        _get(d, "local_as", "bgp", _integer), tuple(neighbors),
        router_id=_get(d, "router_id", "bgp", _address, None),
        source_v4=_get(d, "source_v4", "bgp", _address, None), source_v6=_get(d, "source_v6", "bgp", _address, None),
        announce=_get(d, "announce", "bgp", _bool, True), hold_time=_get(d, "hold_time", "bgp", _integer, dflt.hold_time),
        withdraw_grace=_get(d, "withdraw_grace", "bgp", _seconds, dflt.withdraw_grace),
        bfd_interval=_get(d, "bfd_interval", "bgp", _integer, dflt.bfd_interval),
        bfd_multiplier=_get(d, "bfd_multiplier", "bgp", _integer, dflt.bfd_multiplier))


def bgp_doc(b: model.BgpOptions) -> dict[str, Any]:
    """[bgp] as a config file writes it (parse() reads it back equal)."""
    d: dict[str, Any] = {"local_as": b.local_as}
    for k in ("router_id", "source_v4", "source_v6"):
        if getattr(b, k) is not None:
            d[k] = str(getattr(b, k))
    d |= {"announce": b.announce, "hold_time": b.hold_time, "withdraw_grace": b.withdraw_grace,
          "bfd_interval": b.bfd_interval, "bfd_multiplier": b.bfd_multiplier,
          "neighbor": [{"address": str(n.address), "as": n.asn, "bfd": n.bfd} for n in b.neighbors]}
    return d


def _balancer(d: Any) -> model.BalancerOptions:
    if not isinstance(d, dict):
        raise ConfigError("balancer", f"{_show(d)} must be a table: write [balancer]")
    _no_unknown(d, _BALANCER_KEYS | _GATE_KEYS | _NAT_KEYS, "balancer")
    timeouts = d.get("nat_timeouts", {})
    if not isinstance(timeouts, dict):
        raise ConfigError("balancer.nat_timeouts", f"{_show(timeouts)} must be a table, e.g. "
                          "nat_timeouts = { tcp_established = 600 }")
    _no_unknown(timeouts, _NAT_TIMEOUT_KEYS, "balancer.nat_timeouts")
    dt = model.NatTimeouts()
    return model.BalancerOptions(
        snat_v4=_get(d, "snat_v4", "balancer", _address, None),
        snat_v6=_get(d, "snat_v6", "balancer", _address, None),
        snat_ports=_get(d, "snat_ports", "balancer", _port_range, None),
        nat_timeouts=model.NatTimeouts(**{k: _get(timeouts, k, "balancer.nat_timeouts", _integer, getattr(dt, k))
                                          for k in sorted(_NAT_TIMEOUT_KEYS)}),
        flood_threshold=_get(d, "flood_threshold", "balancer", _integer, None),
        ipv4_source=_get(d, "ipv4_source", "balancer", _address, None),
        ipv6_source=_get(d, "ipv6_source", "balancer", _address, None),
        flow_source_v4=_get(d, "flow_source_v4", "balancer", _network, None),
        flow_source_v6=_get(d, "flow_source_v6", "balancer", _network, None),
        mtu=_get(d, "mtu", "balancer", _integer, None),
        admission=_admission(d, "balancer"))


def _admission(d: dict[str, Any], path: str) -> model.Admission:
    """allow = ["192.0.2.0/24", ...], deny = [...], new_flow_limit = { rate = 100, burst = 200 }
    of a [[vip]] or [balancer]; the model's rules (families, limits > 0) come later, in problems()."""
    def nets(key: str) -> tuple[model.IPNetwork, ...]:
        v = d.get(key, [])
        if not isinstance(v, list):
            raise ConfigError(f"{path}.{key}", f"{_show(v)} must be an array of prefixes, e.g. [\"192.0.2.0/24\"]")
        return tuple(_prefix(x, f"{path}.{key}[{j}]") for j, x in enumerate(v))
    lim = d.get("new_flow_limit")
    limit = None
    if lim is not None:
        where = f"{path}.new_flow_limit"
        if not isinstance(lim, dict):
            raise ConfigError(where, f"{_show(lim)} must be a table: write new_flow_limit = {{ rate = 100, burst = 200 }}")
        _no_unknown(lim, _LIMIT_KEYS, where)
        limit = model.NewFlowLimit(_get(lim, "rate", where, _integer), _get(lim, "burst", where, _integer))
    return model.Admission(nets("allow"), nets("deny"), limit)


def _prefix(v: Any, where: str) -> model.IPNetwork:
    try:
        return _network(v)
    except (ValueError, TypeError) as e:
        raise ConfigError(where, f"{_show(v)} {e}") from None


def admission_doc(a: model.Admission) -> dict[str, Any]:
    """The keys of a as a config file writes them (none when a is the default)."""
    d: dict[str, Any] = {}
    if a.allow:
        d["allow"] = [str(n) for n in a.allow]
    if a.deny:
        d["deny"] = [str(n) for n in a.deny]
    if a.new_flow_limit is not None:
        d["new_flow_limit"] = {"rate": a.new_flow_limit.rate, "burst": a.new_flow_limit.burst}
    return d


def _port_range(v: Any) -> tuple[int, int]:
    """snat_ports = "20000-32767" (inclusive) or "40000" (one port); the model checks the range."""
    if not isinstance(v, str):
        raise TypeError("is not a string like \"20000-32767\"")
    m = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", v)
    if not m:
        raise ValueError("is not a port range like \"20000-32767\" (LO-HI, inclusive)")
    return int(m[1]), int(m[2] or m[1])


def _passive_health(d: Any, path: str, mode: model.Mode) -> model.PassiveHealth:
    if not isinstance(d, dict):
        raise ConfigError(path, f"{_show(d)} must be a table: write [vip.passive_health]")
    _no_unknown(d, _PASSIVE_HEALTH_KEYS, path)
    dp = model.PassiveHealth()
    timeout = dp.timeout if mode is model.Mode.NAT else model.DSR_PASSIVE_TIMEOUT
    return model.PassiveHealth(_get(d, "failures", path, _integer, dp.failures),
                               _get(d, "timeout", path, _seconds, timeout),
                               _get(d, "max_ejected", path, _share, dp.max_ejected))


def _share(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("is not a number from 0 to 1")
    return float(v)


def _network(v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(v, str):
        raise TypeError("is not a string like \"172.16.0.0/16\"")
    try:
        return ipaddress.ip_network(v)
    except ValueError:
        raise ValueError("is not a network prefix like \"172.16.0.0/16\" (host bits must be zero)") from None


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
    if "%" in v:
        # A zone id names a link, not an address: fe80::1%eth0 and fe80::1 would be two
        # spellings of one backend. The balancer works on one link anyway, so it is refused.
        raise ValueError("has an IPv6 zone id (%...); write the address without it")
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        raise ValueError("is not an IPv4 or IPv6 address") from None
    if a.version == 6 and a.ipv4_mapped is not None:
        raise ValueError(f"is an IPv4-mapped IPv6 address; write the IPv4 address {a.ipv4_mapped}")
    return a


def _int(lo: int, hi: int, what: str = "") -> Callable[[Any], int]:
    """An integer in [lo, hi] (the health check's ranges; the model checks the others')."""
    def conv(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError("is not an integer")
        if not lo <= v <= hi:
            raise ValueError(f"is out of range ({lo}-{hi}{what})")
        return v
    return conv


def _integer(v: Any) -> int:
    """An integer; its range is the model's rule (model.Config.problems)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError("is not an integer")
    return v


_port = _int(1, 65535)


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("is not a number of seconds")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("is not true or false")
    return v


def _listen(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("is not a string like \"127.0.0.1:9842\"")
    return v    # checked by the model with the daemon's own parser (model.parse_listen)


def _protocol(v: Any) -> model.Protocol:
    try:
        return model.Protocol.parse(v)
    except ValueError:
        raise ValueError("is not a protocol; use tcp or udp") from None


def _choice(enum_t: type[T]) -> Callable[[Any], T]:
    def conv(v: Any) -> T:
        try:
            return enum_t(v)  # type: ignore[call-arg]
        except ValueError:
            raise ValueError(f"is not one of: {', '.join(e.value for e in enum_t)}") from None  # type: ignore[attr-defined]
    return conv


def _mac(v: Any) -> str:
    """Stored lower case; what makes a MAC valid is the model's rule."""
    if not isinstance(v, str):
        raise TypeError("is not a MAC address like 02:00:00:00:00:01")
    return v.lower() if model.MAC.fullmatch(v.lower()) else v


def _vip(d: Any, path: str) -> model.Vip:
    if not isinstance(d, dict):
        raise ConfigError(path, f"{_show(d)} must be a table: write [[vip]]")
    _no_unknown(d, _VIP_KEYS, path)
    address = _get(d, "address", path, _address)
    port = _get(d, "port", path, _integer)
    protocol = _get(d, "protocol", path, _protocol)
    mode = _get(d, "mode", path, _choice(model.Mode), model.Mode.DSR)
    scheduler = _get(d, "scheduler", path, _choice(model.Scheduler), model.Scheduler.MAGLEV)
    if "table_size" in d and not scheduler.maglev:
        raise ConfigError(f"{path}.table_size", f"{_show(d['table_size'])}: table_size only applies to "
                          f"schedulers \"maglev\", \"source\" and \"leastconn\" (this VIP's is {scheduler.value!r})")
    if "source_prefix" in d and scheduler is not model.Scheduler.SOURCE:
        raise ConfigError(f"{path}.source_prefix", f"{_show(d['source_prefix'])}: source_prefix only applies to "
                          f"scheduler \"source\" (this VIP's is {scheduler.value!r})")
    table_size = _get(d, "table_size", path, _integer, model.DEFAULT_TABLE_SIZE)
    slow_start = _get(d, "slow_start", path, _seconds, 0.0)
    on_down = _get(d, "on_backend_down", path, _choice(model.OnBackendDown), model.OnBackendDown.KEEP)
    on_all_down = _get(d, "on_all_down", path, _choice(model.OnAllDown), model.OnAllDown.DROP)
    encap = dict(gue_port=_get(d, "gue_port", path, _integer, model.DEFAULT_GUE_PORT),
                 ipip_source=_get(d, "ipip_source", path, _choice(model.EncapSource), model.EncapSource.BALANCER),
                 mtu=_get(d, "mtu", path, _integer, None), mss_clamp=_get(d, "mss_clamp", path, _bool, False))
    health_doc = d.get("health")
    if health_doc is not None and not isinstance(health_doc, dict):
        raise ConfigError(f"{path}.health", f"{_show(health_doc)} must be a table: write [vip.health]")
    vip_health = _health(health_doc, f"{path}.health") if health_doc is not None else None
    backends_doc = d.get("backend", [])
    if not isinstance(backends_doc, list):
        raise ConfigError(f"{path}.backend", f"{_show(backends_doc)} must be an array of tables: "
                          "write [[vip.backend]]")
    if len(backends_doc) > abi.VIP_BACKENDS_MAX:   # before converting a huge array
        raise ConfigError(f"{path}.backend", f"{len(backends_doc)} backends; at most {abi.VIP_BACKENDS_MAX} per VIP")
    backends = tuple(_backend(bd, f"{path}.backend[{j}]", port, health_doc) for j, bd in enumerate(backends_doc))
    ph = d.get("passive_health")
    return model.Vip(address, port, protocol, mode, scheduler, backends, table_size, slow_start,
                     vip_health, on_down, on_all_down, **encap, admission=_admission(d, path),
                     snat=_get(d, "snat", path, _bool, False),
                     passive_health=_passive_health(ph, f"{path}.passive_health", mode) if ph is not None else None,
                     source_prefix=_get(d, "source_prefix", path, _integer, None),
                     quic=_get(d, "quic", path, _bool, False),
                     announce=_get(d, "announce", path, _bool, None))


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
    """A UDP check's send/expect: any non-empty text (control characters included: the
    applied state is written by tomli-w, which escapes them), sent as UTF-8."""
    if not isinstance(v, str) or not v:
        raise TypeError("is not a non-empty string")
    return v


def _http_word(v: Any) -> str:
    """An HTTP check's path or host: it goes into the request line or a header, so one word of
    printable ASCII (no space, control character or non-ASCII; percent-encode those in a path)."""
    if not isinstance(v, str) or not v:
        raise TypeError("is not a non-empty string")
    if not re.fullmatch(r"[\x21-\x7e]+", v):
        raise ValueError("holds a space, a control character or non-ASCII (percent-encode them in a path)")
    return v


def _health(d: dict[str, Any], path: str) -> health.HealthCheck:
    """A [health] table (a backend's is merged over its VIP's before it gets here)."""
    _no_unknown(d, _HEALTH_KEYS, path)
    kind = _get(d, "type", path, _choice(health.CheckType))
    wrong = ((_HTTP_ONLY if kind is not health.CheckType.HTTP else set())
             | (_UDP_ONLY if kind is not health.CheckType.UDP else set()))
    for k in sorted(wrong & set(d)):
        raise ConfigError(f"{path}.{k}", f"{_show(d[k])}: {k!r} does not apply to a {kind.value} check")
    interval = _get(d, "interval", path, _positive_seconds(0.05, 3600), 2.0)
    timeout = _get(d, "timeout", path, _positive_seconds(0.01, 3600), min(1.0, interval))
    path_ = _get(d, "path", path, _http_word, "/")
    if kind is health.CheckType.HTTP and not path_.startswith("/"):
        raise ConfigError(f"{path}.path", f"{_show(path_)} does not start with '/'")
    try:
        return health.HealthCheck(
            type=kind, port=_get(d, "port", path, _port, None), interval=interval, timeout=timeout,
            rise=_get(d, "rise", path, _int(1, 100), 2), fall=_get(d, "fall", path, _int(1, 100), 3),
            http_method=_get(d, "method", path, _one_of("GET", "HEAD", "OPTIONS"), "GET"), http_path=path_,
            http_status=_get(d, "status", path, _statuses, (200,)),
            http_host=_get(d, "host", path, _http_word, None),
            udp_payload=_get(d, "send", path, _text, "ping").encode(),
            udp_expect=(lambda e: e.encode() if e is not None else None)(_get(d, "expect", path, _text, None)),
            via=_get(d, "via", path, _choice(health.Via), None))
    except ValueError as e:   # HealthCheck's own checks: a safety net, the converters above come first
        raise ConfigError(path, str(e)) from None


def _merged_check(vip_health: dict[str, Any] | None, own: dict[str, Any]) -> dict[str, Any]:
    """A backend's [health] over its VIP's. A backend that changes the check's type keeps only
    the VIP's keys that apply to its own type (a tcp override of an http VIP check drops path,
    host, ...); keys it sets itself are checked against its own type as usual."""
    base = dict(vip_health or {})
    if "type" in own and own["type"] != base.get("type"):
        for k in _HTTP_ONLY | _UDP_ONLY:
            base.pop(k, None)
    return base | own


def _backend(d: Any, path: str, vip_port: int, vip_health: dict[str, Any] | None = None) -> model.Backend:
    if not isinstance(d, dict):
        raise ConfigError(path, f"{_show(d)} must be a table: write [[vip.backend]]")
    _no_unknown(d, _BACKEND_KEYS, path)
    address = _get(d, "address", path, _address)
    port = _get(d, "port", path, _integer, vip_port)
    own = d.get("health")
    if own is not None and not isinstance(own, dict):
        raise ConfigError(f"{path}.health", f"{_show(own)} must be a table: write [vip.backend.health]")
    check = _health(_merged_check(vip_health, own), f"{path}.health") if own is not None else None
    return model.Backend(address, port, _get(d, "mac", path, _mac, None), _get(d, "weight", path, _integer, 1),
                         _get(d, "backup", path, _bool, False), check,
                         max_conns=_get(d, "max_conns", path, _integer, 0),
                         server_id=_get(d, "server_id", path, _integer, 0))


def dump(cfg: model.Config) -> str:
    """cfg as a config file that parse() reads back to an equal model (for the applied state).
    Written by tomli-w, which escapes whatever a string holds (quotes, backslashes, control
    characters): tests/unit/test_config.py checks parse(dump(cfg)) == cfg on generated configs."""
    doc: dict[str, Any] = {}
    if cfg.metrics_listen:
        doc["metrics"] = {"listen": cfg.metrics_listen}
    bal = {k: str(v) if not isinstance(v, int) else v for k, v in vars(cfg.balancer).items()
           if v is not None and k not in ("admission", "snat_ports", "nat_timeouts")} | admission_doc(cfg.balancer.admission)
    if cfg.balancer.snat_ports is not None:
        bal["snat_ports"] = "{}-{}".format(*cfg.balancer.snat_ports)
    if cfg.balancer.nat_timeouts != model.NatTimeouts():
        bal["nat_timeouts"] = dict(vars(cfg.balancer.nat_timeouts))
    if bal:
        doc["balancer"] = bal
    vips = []
    for v in cfg.vips:
        d: dict[str, Any] = {"address": str(v.address), "port": v.port, "protocol": v.protocol.value,
                             "mode": v.mode.value, "scheduler": v.scheduler.value}
        if v.scheduler.maglev:
            d["table_size"] = v.table_size
        if v.source_prefix is not None:
            d["source_prefix"] = v.source_prefix
        if v.quic:
            d["quic"] = True
        if v.announce is not None:
            d["announce"] = v.announce
        d |= {"slow_start": v.slow_start, "on_backend_down": v.on_backend_down.value,
              "on_all_down": v.on_all_down.value}
        if v.mode.encap:
            d |= {"gue_port": v.gue_port, "ipip_source": v.ipip_source.value, "mss_clamp": v.mss_clamp}
            if v.mtu is not None:
                d["mtu"] = v.mtu
        d |= admission_doc(v.admission)
        if v.mode is model.Mode.NAT:
            d["snat"] = v.snat
        if v.passive_health is not None:
            d["passive_health"] = dict(vars(v.passive_health))
        if v.health:
            d["health"] = _health_doc(v.health)
        backends = []
        for b in v.backends:
            bd: dict[str, Any] = {"address": str(b.address), "port": b.port, "weight": b.weight, "backup": b.backup}
            if b.max_conns:
                bd["max_conns"] = b.max_conns
            if b.server_id:
                bd["server_id"] = b.server_id
            if b.mac:
                bd["mac"] = b.mac
            if b.health:
                bd["health"] = _health_doc(b.health)
            backends.append(bd)
        d["backend"] = backends
        vips.append(d)
    if vips:
        doc["vip"] = vips
    if cfg.bgp is not None:
        doc["bgp"] = bgp_doc(cfg.bgp)
    return tomli_w.dumps(doc)


def _health_doc(h: health.HealthCheck) -> dict[str, Any]:
    d: dict[str, Any] = {"type": h.type.value, "interval": h.interval, "timeout": h.timeout, "rise": h.rise, "fall": h.fall}
    if h.port is not None:
        d["port"] = h.port
    if h.via is not None:
        d["via"] = h.via.value
    if h.type is health.CheckType.HTTP:
        d |= {"method": h.http_method, "path": h.http_path, "status": list(h.http_status)}
        if h.http_host:
            d["host"] = h.http_host
    if h.type is health.CheckType.UDP:
        d["send"] = h.udp_payload.decode()
        if h.udp_expect is not None:
            d["expect"] = h.udp_expect.decode()
    return d
