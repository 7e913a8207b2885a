"""lbxdp.config: TOML text -> model.Config, and every way a config can be wrong.

Each bad config is one table row: id, TOML text, the exact key path the error must name, and a
piece of the message that shows the bad value (or says what is missing). Every error must be a
ConfigError (exit code 2) whose message starts with "<key path>: ".
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import time
from textwrap import dedent

import pytest
import tomli_w

from lbxdp import abi, config, edits, exporter, model
from lbxdp.errors import LbxError
from lbxdp.model import Backend, Mode, Protocol, Scheduler, Vip

GOOD = """
[[vip]]
address = "10.112.0.10"
port = 8080
protocol = "tcp"
  [[vip.backend]]
  address = "10.111.0.11"
  port = 8080
  mac = "02:00:00:00:00:11"
  [[vip.backend]]
  address = "10.111.0.12"
  mac = "02:AB:CD:EF:00:12"     # upper case is accepted and stored lower case
  [[vip.backend]]
  address = "10.111.0.13"       # no mac: resolved from the neighbour table

[[vip]]
address = "fd00:112::10"
port = 53
protocol = "udp"
mode = "dsr"
scheduler = "hash"
  [[vip.backend]]
  address = "fd00:111::11"

[[vip]]                         # same address and port, other protocol: a different VIP
address = "10.112.0.10"
port = 8080
protocol = "udp"
  [[vip.backend]]
  address = "10.111.0.11"
"""

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


def test_good_config_parses_into_the_model() -> None:
    cfg = config.parse(GOOD)
    assert cfg == model.Config((
        Vip(V4("10.112.0.10"), 8080, Protocol.TCP, Mode.DSR, Scheduler.MAGLEV, (
            Backend(V4("10.111.0.11"), 8080, "02:00:00:00:00:11"),
            Backend(V4("10.111.0.12"), 8080, "02:ab:cd:ef:00:12"),
            Backend(V4("10.111.0.13"), 8080, None),
        )),
        Vip(V6("fd00:112::10"), 53, Protocol.UDP, Mode.DSR, Scheduler.HASH, (
            Backend(V6("fd00:111::11"), 53, None),
        )),
        Vip(V4("10.112.0.10"), 8080, Protocol.UDP, Mode.DSR, Scheduler.MAGLEV, (
            Backend(V4("10.111.0.11"), 8080, None),
        )),
    ))


FULL = """
[metrics]
listen = "[::1]:9842"

[[vip]]
address = "10.112.0.20"
port = 0                        # any port
protocol = "udp"
table_size = 4099
slow_start = 2.5
  [[vip.backend]]
  address = "10.111.0.11"
  weight = 3
  [[vip.backend]]
  address = "10.111.0.12"
  weight = 0
  [[vip.backend]]
  address = "10.111.0.13"
  backup = true
"""


def test_weights_backups_table_size_slow_start_any_port_and_metrics() -> None:
    cfg = config.parse(FULL)
    assert cfg.metrics_listen == "[::1]:9842"
    v = cfg.vips[0]
    assert (v.port, v.table_size, v.slow_start, v.scheduler) == (0, 4099, 2.5, Scheduler.MAGLEV)
    assert [(b.port, b.weight, b.backup) for b in v.backends] == [(0, 3, False), (0, 0, False), (0, 1, True)]
    assert v.name == "10.112.0.20:*/udp"


@pytest.mark.parametrize("text", [GOOD, FULL])
def test_dump_reads_back_to_the_same_model(text: str) -> None:
    cfg = config.parse(text)
    assert config.parse(config.dump(cfg)) == cfg


def test_defaults_and_types() -> None:
    vip = config.parse(GOOD).vips[0]
    assert isinstance(vip.address, V4) and isinstance(vip.backends[0].address, V4)
    assert vip.mode is Mode.DSR and vip.scheduler is Scheduler.MAGLEV and vip.table_size == 65537
    assert vip.backends[0].weight == 1 and not vip.backends[0].backup and vip.slow_start == 0
    assert vip.backends[1].port == vip.port          # backend port defaults to the VIP port
    assert vip.backends[2].mac is None
    assert vip.name == "10.112.0.10:8080/tcp"
    assert isinstance(config.parse(GOOD).vips[1].address, V6)


def test_an_empty_file_is_no_vips() -> None:
    assert config.parse("") == model.Config(())


def test_max_backends_is_allowed() -> None:
    text = vip(scheduler='"rr"') + _backends(abi.VIP_BACKENDS_MAX)
    assert len(config.parse(text).vips[0].backends) == abi.VIP_BACKENDS_MAX


def test_load_names_the_file(tmp_path) -> None:
    f = tmp_path / "lb.toml"
    f.write_text(vip(port="65536") + BE)
    with pytest.raises(config.ConfigError) as ei:
        config.load(f)
    assert str(f) in ei.value.message and "port" in ei.value.message


def test_load_missing_file_is_a_clean_error(tmp_path) -> None:
    with pytest.raises(config.LbxError) as ei:
        config.load(tmp_path / "nope.toml")
    assert ei.value.exit_code == 2
    assert "nope.toml" in ei.value.message and "No such file" in ei.value.message


# --- bad configs ------------------------------------------------------------------------------

VIP = '[[vip]]\naddress = "10.0.0.1"\nport = 80\nprotocol = "tcp"\n'   # needs a backend
BE = '[[vip.backend]]\naddress = "10.0.1.1"\n'


def _backends(n: int) -> str:
    return "".join(f'[[vip.backend]]\naddress = "10.1.{i // 250}.{i % 250 + 1}"\n' for i in range(n))


def _vips(n: int) -> str:
    return "".join(f'[[vip]]\naddress = "10.2.{i // 250}.{i % 250 + 1}"\nport = 80\nprotocol = "tcp"\n'
                   f'[[vip.backend]]\naddress = "10.0.1.1"\n' for i in range(n))


def vip(**kv: str) -> str:
    """A [[vip]] table: the valid defaults above, with keys replaced (value None drops the key)."""
    keys = {"address": '"10.0.0.1"', "port": "80", "protocol": '"tcp"'} | kv
    return "[[vip]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


def be(**kv: str) -> str:
    keys = {"address": '"10.0.1.1"'} | kv
    return "[[vip.backend]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


BAD = [
    # id, TOML, key path, part of the message showing the bad value (or what is wrong)
    ("invalid-toml", "[[vip]\naddress = 1\n", "(file)", "line 1"),
    ("invalid-toml-duplicate-key", VIP + 'port = 81\n' + BE, "(file)", "not valid TOML"),
    ("unknown-top-level-key", "vips = []\n", "vips", "'vips'"),
    ("vip-not-array", '[vip]\naddress = "10.0.0.1"\nport = 80\nprotocol = "tcp"\n', "vip", "array of tables"),
    ("vip-is-a-string", 'vip = "10.0.0.1"\n', "vip", "'10.0.0.1'"),
    ("vip-element-not-table", 'vip = ["10.0.0.1"]\n', "vip[0]", "'10.0.0.1'"),
    ("bad-vip-address", vip(address='"10.0.0.300"') + BE, "vip[0].address", "'10.0.0.300'"),
    ("vip-address-with-port", vip(address='"10.0.0.1:80"') + BE, "vip[0].address", "'10.0.0.1:80'"),
    ("vip-address-cidr", vip(address='"10.0.0.0/24"') + BE, "vip[0].address", "'10.0.0.0/24'"),
    ("vip-address-not-string", vip(address="167772161") + BE, "vip[0].address", "167772161"),
    ("missing-vip-address", vip(address=None) + BE, "vip[0].address", "is required"),
    ("misspelled-vip-key", vip(address=None, adress='"10.0.0.1"') + BE, "vip[0].adress", "'adress'"),
    ("multicast-vip", vip(address='"224.0.0.1"') + BE, "vip[0].address", "'224.0.0.1'"),
    ("multicast-vip-v6", vip(address='"ff02::1"') + be(address='"fd00::1"'), "vip[0].address", "'ff02::1'"),
    ("unspecified-vip", vip(address='"0.0.0.0"') + BE, "vip[0].address", "'0.0.0.0'"),
    ("unspecified-vip-v6", vip(address='"::"') + be(address='"fd00::1"'), "vip[0].address", "'::'"),
    ("loopback-vip", vip(address='"127.0.0.1"') + BE, "vip[0].address", "'127.0.0.1'"),
    ("broadcast-vip", vip(address='"255.255.255.255"') + BE, "vip[0].address", "'255.255.255.255'"),
    ("port-65536", vip(port="65536") + BE, "vip[0].port", "65536 is out of range"),
    ("port-70000", vip(port="70000") + BE, "vip[0].port", "70000"),
    ("port-negative", vip(port="-1") + BE, "vip[0].port", "-1"),
    ("port-as-string", vip(port='"80"') + BE, "vip[0].port", "'80'"),
    ("port-as-bool", vip(port="true") + BE, "vip[0].port", "True"),
    ("port-as-float", vip(port="80.0") + BE, "vip[0].port", "80.0"),
    ("missing-port", vip(port=None) + BE, "vip[0].port", "is required"),
    ("unknown-protocol", vip(protocol='"sctp"') + BE, "vip[0].protocol", "'sctp'"),
    ("protocol-as-number", vip(protocol="6") + BE, "vip[0].protocol", "6"),
    ("missing-protocol", vip(protocol=None) + BE, "vip[0].protocol", "is required"),
    ("unknown-mode", vip(mode='"tproxy"') + BE, "vip[0].mode", "'tproxy'"),
    ("mode-as-list", vip(mode='["dsr"]') + BE, "vip[0].mode", "['dsr']"),
    ("unknown-scheduler", vip(scheduler='"wlc"') + BE, "vip[0].scheduler", "'wlc'"),
    ("table-size-not-prime", VIP + "table_size = 65536\n" + BE, "vip[0].table_size", "65536 is not prime"),
    ("table-size-too-big", VIP + "table_size = 2000003\n" + BE, "vip[0].table_size", "2000003 is out of range"),
    ("table-size-too-small-for-backends", VIP + "table_size = 101\n" + BE + be(address='"10.0.1.2"'),
     "vip[0].table_size", "101 is less than 100 x 2 backends"),
    ("table-size-with-rr", vip(scheduler='"rr"') + "table_size = 65537\n" + BE, "vip[0].table_size",
     "only applies to scheduler"),
    ("table-size-string", VIP + 'table_size = "big"\n' + BE, "vip[0].table_size", "'big'"),
    ("slow-start-negative", VIP + "slow_start = -1\n" + BE, "vip[0].slow_start", "-1"),
    ("slow-start-too-long", VIP + "slow_start = 7200\n" + BE, "vip[0].slow_start", "7200"),
    ("slow-start-string", VIP + 'slow_start = "10s"\n' + BE, "vip[0].slow_start", "'10s'"),
    ("weight-negative", VIP + be(weight="-1"), "vip[0].backend[0].weight", "-1 is out of range"),
    ("weight-too-big", VIP + be(weight="1001"), "vip[0].backend[0].weight", "1001 is out of range"),
    ("weight-float", VIP + be(weight="1.5"), "vip[0].backend[0].weight", "1.5"),
    ("all-weights-zero", VIP + be(weight="0"), "vip[0].backend", "every backend has weight 0"),
    ("backup-not-bool", VIP + be(backup='"yes"'), "vip[0].backend[0].backup", "'yes'"),
    ("metrics-bad-listen", '[metrics]\nlisten = "localhost"\n' + VIP + BE, "metrics.listen", "'localhost'"),
    ("metrics-unknown-key", '[metrics]\nport = 9842\n' + VIP + BE, "metrics.port", "'port'"),
    ("metrics-not-table", 'metrics = "127.0.0.1:9842"\n' + VIP + BE, "metrics", "'127.0.0.1:9842'"),
    ("any-port-vip-backend-port", vip(port="0") + be(port="80"), "vip[0].backend[0].port", "80"),
    ("no-backends", VIP, "vip[0].backend", "at least one backend"),
    ("empty-backend-array", VIP + "backend = []\n", "vip[0].backend", "at least one backend"),
    ("backend-table-not-array", VIP + '[vip.backend]\naddress = "10.0.1.1"\n', "vip[0].backend", "array of tables"),
    ("backend-is-a-string", VIP + 'backend = "10.0.1.1"\n', "vip[0].backend", "'10.0.1.1'"),
    ("backend-element-not-table", VIP + 'backend = ["10.0.1.1"]\n', "vip[0].backend[0]", "'10.0.1.1'"),
    ("too-many-backends", VIP + _backends(abi.VIP_BACKENDS_MAX + 1), "vip[0].backend", f"{abi.VIP_BACKENDS_MAX + 1} backends"),
    ("too-many-vips", _vips(abi.MAX_VIPS + 1), "vip", f"{abi.MAX_VIPS + 1} VIPs"),
    ("bad-backend-address", VIP + BE + be(address='"10.0.1.x"'), "vip[0].backend[1].address", "'10.0.1.x'"),
    ("missing-backend-address", VIP + be(address=None, port="80"), "vip[0].backend[0].address", "is required"),
    ("unknown-backend-key", VIP + be(wieght="2"), "vip[0].backend[0].wieght", "'wieght'"),
    ("loopback-backend", VIP + be(address='"127.0.0.1"'), "vip[0].backend[0].address", "'127.0.0.1'"),
    ("loopback-backend-v6", vip(address='"fd00::1"') + be(address='"::1"'), "vip[0].backend[0].address", "'::1'"),
    ("multicast-backend", VIP + be(address='"239.1.1.1"'), "vip[0].backend[0].address", "'239.1.1.1'"),
    ("unspecified-backend", VIP + be(address='"0.0.0.0"'), "vip[0].backend[0].address", "'0.0.0.0'"),
    ("v6-backend-on-v4-vip", VIP + BE + be(address='"fd00::11"'), "vip[0].backend[1].address", "'fd00::11'"),
    ("v4-backend-on-v6-vip", vip(address='"fd00::1"') + BE, "vip[0].backend[0].address", "'10.0.1.1'"),
    ("dsr-backend-port-differs", VIP + be(port="8080"), "vip[0].backend[0].port", "8080"),
    ("backend-port-0", VIP + be(port="0"), "vip[0].backend[0].port", "0 is out of range"),
    ("backend-port-70000", VIP + be(port="70000"), "vip[0].backend[0].port", "70000 is out of range"),
    ("backend-port-string", VIP + be(port='"http"'), "vip[0].backend[0].port", "'http'"),
    ("duplicate-backend", VIP + BE + be(port="80"), "vip[0].backend[1]", "10.0.1.1:80"),
    ("duplicate-backend-v6-spelling", vip(address='"fd00::1"') + be(address='"fd00::11"')
     + be(address='"fd00:0:0::11"'), "vip[0].backend[1]", "[fd00::11]:80"),
    ("duplicate-vip", VIP + BE + VIP + BE, "vip[1]", "10.0.0.1:80/tcp"),
    ("duplicate-vip-v6-spelling", vip(address='"fd00::1"') + be(address='"fd00::11"')
     + vip(address='"fd00:0::1"') + be(address='"fd00::11"'), "vip[1]", "[fd00::1]:80/tcp"),
    ("bad-mac", VIP + be(mac='"02:00:00:00:00"'), "vip[0].backend[0].mac", "'02:00:00:00:00'"),
    ("mac-with-dashes", VIP + be(mac='"02-00-00-00-00-01"'), "vip[0].backend[0].mac", "'02-00-00-00-00-01'"),
    ("mac-not-hex", VIP + be(mac='"02:00:00:00:00:zz"'), "vip[0].backend[0].mac", "'02:00:00:00:00:zz'"),
    ("mac-as-number", VIP + be(mac="2"), "vip[0].backend[0].mac", "2 is not a MAC"),
    ("multicast-mac", VIP + be(mac='"01:00:5e:00:00:01"'), "vip[0].backend[0].mac", "'01:00:5e:00:00:01'"),
    ("broadcast-mac", VIP + be(mac='"ff:ff:ff:ff:ff:ff"'), "vip[0].backend[0].mac", "'ff:ff:ff:ff:ff:ff'"),
    ("zero-mac", VIP + be(mac='"00:00:00:00:00:00"'), "vip[0].backend[0].mac", "'00:00:00:00:00:00'"),
    ("error-in-second-vip", VIP + BE + vip(port="81") + BE + be(address='"10.0.1.300"'),
     "vip[1].backend[1].address", "'10.0.1.300'"),
]

def hc(**kv: str) -> str:
    """A [vip.health] table (goes between the [[vip]] keys and the first [[vip.backend]])."""
    return "[vip.health]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())


# Issue 8: what validation accepted but made no sense, or could not be written back.
BAD += [
    ("mac-trailing-newline", VIP + be(mac='"02:00:00:00:00:01\\n"'), "vip[0].backend[0].mac", "'02:00:00:00:00:01\\n'"),
    ("listen-trailing-newline", '[metrics]\nlisten = "127.0.0.1:9842\\n"\n' + VIP + BE, "metrics.listen",
     "'127.0.0.1:9842\\n'"),
    ("listen-plus-port", '[metrics]\nlisten = "127.0.0.1:+80"\n' + VIP + BE, "metrics.listen", "'127.0.0.1:+80'"),
    ("listen-half-bracket", '[metrics]\nlisten = "[::1:9842"\n' + VIP + BE, "metrics.listen", "'[::1:9842'"),
    ("listen-bracketed-v4", '[metrics]\nlisten = "[127.0.0.1]:9842"\n' + VIP + BE, "metrics.listen",
     "'[127.0.0.1]:9842'"),
    ("listen-unicode-digits", '[metrics]\nlisten = "127.0.0.1:\u0669\u0668"\n' + VIP + BE, "metrics.listen",
     "is not ADDRESS:PORT"),
    ("http-path-space", VIP + hc(type='"http"', path='"/a b"') + BE, "vip[0].health.path", "'/a b'"),
    ("http-path-control", VIP + hc(type='"http"', path='"/a\\u0001"') + BE, "vip[0].health.path", "'/a\\x01'"),
    ("http-path-non-ascii", VIP + hc(type='"http"', path='"/café"') + BE, "vip[0].health.path", "'/café'"),
    ("http-host-space", VIP + hc(type='"http"', host='"a b"') + BE, "vip[0].health.host", "'a b'"),
    ("http-host-non-ascii", VIP + hc(type='"http"', host='"bücher.example"') + BE, "vip[0].health.host",
     "'bücher.example'"),
    ("vip-is-its-own-backend", VIP + be(address='"10.0.0.1"'), "vip[0].backend[0].address", "'10.0.0.1'"),
    ("vip-is-its-own-backend-v6", vip(address='"fd00::1"') + be(address='"fd00:0::1"'), "vip[0].backend[0].address",
     "'fd00::1'"),
    ("v4-mapped-vip", vip(address='"::ffff:10.0.0.1"') + be(address='"fd00::11"'), "vip[0].address",
     "'::ffff:10.0.0.1'"),
    ("v4-mapped-backend", vip(address='"fd00::1"') + be(address='"::ffff:10.0.1.1"'), "vip[0].backend[0].address",
     "'::ffff:10.0.1.1'"),
    ("this-network-vip", vip(address='"0.1.2.3"') + BE, "vip[0].address", "'0.1.2.3'"),
    ("this-network-backend", VIP + be(address='"0.0.0.7"'), "vip[0].backend[0].address", "'0.0.0.7'"),
    ("zone-id-backend", vip(address='"fd00::1"') + be(address='"fe80::1%eth0"'), "vip[0].backend[0].address",
     "'fe80::1%eth0'"),
    ("zone-id-duplicate", vip(address='"fd00::1"') + be(address='"fe80::1"') + be(address='"fe80::1%eth0"'),
     "vip[0].backend[1].address", "zone id"),
    ("zone-id-vip", vip(address='"fe80::1%eth0"') + be(address='"fd00::11"'), "vip[0].address", "'fe80::1%eth0'"),
    ("protocol-named", vip(protocol='"sctp"') + BE, "vip[0].protocol", "'sctp' is not a protocol; use tcp or udp"),
    ("more-backends-than-the-maps-hold",
     "".join(vip(address=f'"10.3.0.{i + 1}"', scheduler='"rr"') + _backends(abi.VIP_BACKENDS_MAX)
             for i in range(-(-(abi.MAX_BACKENDS - 1) // abi.VIP_BACKENDS_MAX))),
     "vip", f"the maps hold at most {abi.MAX_BACKENDS - 1}"),
]


@pytest.mark.parametrize("text,path,value", [pytest.param(t, p, v, id=i) for i, t, p, v in BAD])
def test_bad_config_names_key_path_and_value(text: str, path: str, value: str) -> None:
    with pytest.raises(config.ConfigError) as ei:
        config.parse(text)
    e = ei.value
    assert e.exit_code == 2
    assert e.path == path, f"wrong key path in: {e.message}"
    assert e.message.startswith(f"{path}: "), e.message
    assert value in e.message, f"{value!r} missing from: {e.message}"
    assert "\n" not in e.message, "one line, please"
    assert e.hint


def test_there_are_enough_bad_configs() -> None:
    assert len(BAD) >= 30
    assert len({row[0] for row in BAD}) == len(BAD), "ids must be unique"


def test_unknown_key_suggests_the_known_one() -> None:
    with pytest.raises(config.ConfigError) as ei:
        config.parse(dedent("""
            [[vip]]
            adress = "10.0.0.1"
            port = 80
            protocol = "tcp"
            """))
    assert "did you mean 'address'" in ei.value.message


def test_source_prefixes_the_message() -> None:
    with pytest.raises(config.ConfigError) as ei:
        config.parse(vip(port="65536") + BE, source="lb.toml")
    assert ei.value.message.startswith("lb.toml: vip[0].port: ")
    assert ei.value.path == "vip[0].port"


def test_the_readme_example_is_a_valid_config() -> None:
    """The README's config example stays true to the parser."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [example] = re.findall(r"```toml\n(.*?)```", readme, re.S)
    cfg = config.parse(example)
    assert cfg.metrics_listen and cfg.vips[0].health is not None and cfg.vips[0].health.type == "http"


# --- issue 8: what is accepted reads back; bad files fail fast and in one line ----------------

# Strings chosen to break hand-written TOML: quotes, backslashes, TOML syntax, control
# characters (NUL, ESC, DEL, CR/LF), unicode line separators, BOM, astral plane.
AWKWARD = ['"', "\\", "'", '"""', "'''", "\\n", "#", "=", "[x]", "{}", "\n", "\r\n", "\t", "\x00", "\x01",
           "\x1b[31m", "\x7f", "\u2028", "\ufeff", "é", "☃", "𝄞", "${x}", " "]


def _awkward(rng: random.Random) -> str:
    return "".join(rng.choice(AWKWARD + ["a", "ping", "0"]) for _ in range(rng.randint(1, 6)))


def _http_word(rng: random.Random) -> str:
    return "".join(rng.choice('abcXYZ09-._~%!$&\'()*+,;=:@"\\[]{}#?/') for _ in range(rng.randint(1, 12)))


def _health_doc(rng: random.Random, kind: str | None = None) -> dict:
    kind = kind or rng.choice(["tcp", "http", "udp"])
    interval = rng.choice([0.05, 0.1, 1, 2.5, 3600])
    d: dict = {"type": kind, "interval": interval, "timeout": rng.choice([0.01, interval]),
               "rise": rng.randint(1, 100), "fall": rng.randint(1, 100)}
    if rng.random() < 0.5:
        d["port"] = rng.randint(1, 65535)
    if kind == "http":
        d |= {"method": rng.choice(["GET", "HEAD", "OPTIONS"]), "path": "/" + _http_word(rng),
              "status": rng.sample([200, 204, 301, 404, 599], rng.randint(1, 3))}
        if rng.random() < 0.5:
            d["host"] = _http_word(rng)
    if kind == "udp":
        d["send"] = _awkward(rng)
        if rng.random() < 0.5:
            d["expect"] = _awkward(rng)
    return d


def _random_doc(rng: random.Random) -> dict:
    """A valid config document: v4/v6, any-port, every scheduler, weights, backups, macs,
    VIP health checks and backend overrides (of the same or another type), metrics."""
    doc: dict = {}
    if rng.random() < 0.5:
        doc["metrics"] = {"listen": rng.choice(["127.0.0.1:9842", "[::1]:1", ":65535", "0.0.0.0:80", "::1:9842"])}
    vips = []
    for i in range(rng.randint(0, 4)):
        v6 = rng.random() < 0.5
        port = rng.choice([0, 53, 80, 65535])
        sched = rng.choice(["maglev", "rr", "hash"])
        v: dict = {"address": f"fd00:{i}::1" if v6 else f"10.9.{i}.1", "port": port,
                   "protocol": rng.choice(["tcp", "udp"]), "scheduler": sched}
        if sched == "maglev" and rng.random() < 0.5:
            v["table_size"] = rng.choice([1021, 4099, 65537])
        for k, choices in (("slow_start", [0, 0.5, 3600]), ("on_backend_down", ["keep", "migrate"]),
                           ("on_all_down", ["drop", "pass"]), ("mode", ["dsr"])):
            if rng.random() < 0.5:
                v[k] = rng.choice(choices)
        vip_check = rng.random() < 0.5
        if vip_check:
            v["health"] = _health_doc(rng)
            if port == 0:
                v["health"]["port"] = 8080
        bes = []
        for j in range(rng.randint(1, 5)):
            b: dict = {"address": f"fd01:{i}::{j + 1:x}" if v6 else f"10.8.{i}.{j + 1}"}
            if rng.random() < 0.3:
                b["port"] = port   # dsr: a backend port equals the VIP port
            if rng.random() < 0.5:
                b["mac"] = rng.choice(["02:00:00:00:00:01", "02:AB:cd:00:00:ff", "0a:00:00:00:00:00"])
            if rng.random() < 0.5:
                b["weight"] = rng.randint(0, 1000)
            if rng.random() < 0.3:
                b["backup"] = rng.random() < 0.5
            if rng.random() < 0.3:
                own = _health_doc(rng)
                own.setdefault("port", 8081)
                if vip_check and rng.random() < 0.5:
                    own = {"type": own["type"], "rise": own["rise"]}   # only overrides: merged over the VIP's
                b["health"] = own
            bes.append(b)
        bes[0]["weight"] = rng.randint(1, 1000)
        v["backend"] = bes
        vips.append(v)
    if vips:
        doc["vip"] = vips
    return doc


def test_generated_configs_read_back_identically() -> None:
    """parse(dump(cfg)) == cfg for hundreds of generated valid configs with awkward strings."""
    rng = random.Random(8)
    parsed = 0
    for n in range(600):
        doc = _random_doc(rng)
        try:
            cfg = config.parse(tomli_w.dumps(doc))
        except config.ConfigError as e:
            # Only the one combination the generator does not avoid: an override of an any-port
            # backend check without a port.
            assert "any-port backend has no port" in e.message, (n, e.message, doc)
            continue
        parsed += 1
        text = config.dump(cfg)
        assert config.parse(text) == cfg, (n, text)
        assert config.dump(config.parse(text)) == text
    assert parsed > 500


@pytest.mark.parametrize("key", ["send", "expect"])
@pytest.mark.parametrize("value", AWKWARD + ["".join(AWKWARD), "x" * 5000])
def test_every_udp_string_accepted_survives_the_applied_state(key: str, value: str) -> None:
    """send/expect may hold any text (control characters too): what is accepted reads back."""
    text = VIP + hc(type='"udp"', **{key: tomli_w.dumps({"k": value})[4:].strip()}) + BE
    cfg = config.parse(text)
    check = cfg.vips[0].health
    assert (check.udp_payload if key == "send" else check.udp_expect) == value.encode()
    assert config.parse(config.dump(cfg)) == cfg


@pytest.mark.parametrize("field, value", [(f, v) for f in ("mac", "listen", "path", "host") for v in
                                          ["02:00:00:00:00:01\n", "127.0.0.1:9842\n", "/a\n", "a\n", "/x y",
                                           "/\x00", "/é", '/"\\', "h\\", "[::1]:1", "02:00:00:00:00:01"]])
def test_whatever_string_validation_accepts_reads_back(field: str, value: str) -> None:
    """Each string is either refused with a ConfigError or survives dump/parse unchanged."""
    if field == "mac":
        text = VIP + be(mac=tomli_w.dumps({"k": value})[4:].strip())
    elif field == "listen":
        text = "[metrics]\nlisten = " + tomli_w.dumps({"k": value})[4:].strip() + "\n" + VIP + BE
    else:
        text = VIP + hc(type='"http"', **{field: tomli_w.dumps({"k": value})[4:].strip()}) + BE
    try:
        cfg = config.parse(text)
    except config.ConfigError as e:
        assert "\n" not in e.message
        return
    assert "\n" not in value and not any(ord(c) < 0x20 for c in value)
    assert config.parse(config.dump(cfg)) == cfg


def test_control_characters_in_the_old_dump_would_not_read_back() -> None:
    """The reason for tomli-w: a NUL or DEL written raw is not TOML (the old hand escaping)."""
    cfg = config.parse(VIP + hc(type='"udp"', send='"a\\u0000\\u007fb"') + BE)
    assert "\\u0000" in config.dump(cfg)
    assert config.parse(config.dump(cfg)).vips[0].health.udp_payload == b"a\x00\x7fb"


# --- reading a file ---------------------------------------------------------------------------

def _load_error(path: os.PathLike | str) -> LbxError:
    with pytest.raises(LbxError) as ei:
        config.load(path)
    e = ei.value
    assert e.exit_code == 2 and "\n" not in e.message and e.hint
    return e


def test_non_utf8_config_names_the_byte_offset(tmp_path) -> None:
    f = tmp_path / "lb.toml"
    f.write_bytes(b"# caf\xe9\n" + (VIP + BE).encode())
    e = _load_error(f)
    assert e.message == f"cannot read config {f}: not UTF-8: byte 0xe9 at offset 5 (line 1)"


@pytest.mark.parametrize("doc", ["a = " + "[" * 50000 + "]" * 50000, "a = " + "{b = " * 5000 + "1" + "}" * 5000,
                                 "vip = " + "[" * 900 + "]" * 900])
def test_deeply_nested_toml_is_a_config_error(tmp_path, doc: str) -> None:
    f = tmp_path / "lb.toml"
    f.write_text(doc)
    e = _load_error(f)
    assert str(f) in e.message and ("nested too deeply" in e.message or "vip" in e.message)


@pytest.mark.parametrize("what", ["dev-zero", "fifo", "directory", "socket"])
def test_non_regular_files_are_refused_without_blocking(tmp_path, what: str) -> None:
    import socket
    path = {"dev-zero": "/dev/zero", "fifo": tmp_path / "fifo", "directory": tmp_path,
            "socket": tmp_path / "sock"}[what]
    sock = None
    if what == "fifo":
        os.mkfifo(path)     # no writer: a blocking open would hang here
    if what == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    try:
        t = time.monotonic()
        e = _load_error(path)
        assert time.monotonic() - t < 2
        assert ("not a regular file" in e.message) or ("directory" in e.message) or ("No such device" in e.message)
    finally:
        if sock:
            sock.close()


def test_a_50mb_config_is_refused_before_it_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "big.toml"
    with open(f, "wb") as fh:
        fh.truncate(50 * 1024 * 1024)
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    t = time.monotonic()
    e = _load_error(f)
    assert time.monotonic() - t < 2
    assert "larger than 4 MiB" in e.message
    assert reads == [], "the size check must come before any read"


def test_a_config_just_under_the_limit_is_read(tmp_path) -> None:
    f = tmp_path / "lb.toml"
    text = VIP + BE
    f.write_text(text + "#" * (config.MAX_BYTES - len(text) - 1) + "\n")
    assert len(config.load(f).vips) == 1


# --- meaning ----------------------------------------------------------------------------------

def test_backend_can_override_the_check_type_of_an_http_vip() -> None:
    """VIP health type=http path=/x; a backend's type=tcp drops the HTTP-only keys it inherits."""
    cfg = config.parse(VIP + hc(type='"http"', path='"/x"', host='"h"', status="[204]") + BE
                       + '[vip.backend.health]\ntype = "tcp"\nport = 81\n')
    b = cfg.vips[0].backends[0]
    assert b.health is not None and b.health.type == "tcp" and b.health.port == 81
    assert cfg.vips[0].health.http_path == "/x"
    assert config.parse(config.dump(cfg)) == cfg
    # udp over http, http over udp: the new type's own keys only
    cfg = config.parse(VIP + hc(type='"udp"', send='"hi"', expect='"ok"') + BE
                       + '[vip.backend.health]\ntype = "http"\npath = "/y"\n')
    assert cfg.vips[0].backends[0].health.http_path == "/y"
    assert config.parse(config.dump(cfg)) == cfg


def test_backend_override_of_the_same_type_inherits_and_own_wrong_keys_are_refused() -> None:
    cfg = config.parse(VIP + hc(type='"http"', path='"/x"') + BE + '[vip.backend.health]\nrise = 5\n')
    assert (cfg.vips[0].backends[0].health.http_path, cfg.vips[0].backends[0].health.rise) == ("/x", 5)
    with pytest.raises(config.ConfigError) as ei:
        config.parse(VIP + hc(type='"http"') + BE + '[vip.backend.health]\ntype = "tcp"\npath = "/z"\n')
    assert ei.value.path == "vip[0].backend[0].health.path"


def test_all_backups_is_a_warning_not_an_error() -> None:
    cfg = config.parse(VIP + be(backup="true") + be(address='"10.0.1.2"', backup="true"))
    [w] = config.warnings(cfg)
    assert w.startswith("vip[0].backend: every backend of 10.0.0.1:80/tcp is a backup")
    assert config.warnings(config.parse(VIP + BE + be(address='"10.0.1.2"', backup="true"))) == []


@pytest.mark.parametrize("listen", ["127.0.0.1:9842", "[::1]:9842", ":9842", "::1:9842", "0.0.0.0:1",
                                    "127.0.0.1:9842\n", "127.0.0.1:+80", "127.0.0.1: 80", "[::1:80",
                                    "[127.0.0.1]:80", "localhost:9842", "127.0.0.1:0", "127.0.0.1:65536",
                                    "fe80::1%eth0:80", "[fe80::1%eth0]:80", "127.0.0.1:٨٠", ":", ""])
def test_config_and_daemon_agree_on_listen(listen: str) -> None:
    """One parser: `config check` accepts a [metrics] listen exactly when `lbxdp run` can parse it."""
    try:
        exporter.parse_listen(listen)
        daemon_ok = True
    except LbxError:
        daemon_ok = False
    try:
        config.parse("[metrics]\nlisten = " + tomli_w.dumps({"k": listen})[4:].strip() + "\n")
        config_ok = True
    except config.ConfigError:
        config_ok = False
    assert config_ok == daemon_ok


def test_edit_errors_name_the_verb_and_the_backend() -> None:
    from dataclasses import replace
    cfg = config.parse(VIP + BE)
    bad = replace(cfg, vips=(replace(cfg.vips[0], backends=(replace(cfg.vips[0].backends[0], weight=-1),)),))
    with pytest.raises(LbxError) as ei:
        edits.validated(bad, "backend set-weight")
    assert ei.value.message == ("backend set-weight: VIP 10.0.0.1:80/tcp backend 10.0.1.1:80 weight: "
                                "-1 is out of range (0-1000)")
    assert ei.value.exit_code == 2
    assert "edited config" not in ei.value.message and "applied" not in ei.value.message


def test_the_daemon_logs_each_warning_as_an_event(caplog: pytest.LogCaptureFixture) -> None:
    """`lbxdp run` has no terminal to print `lbxdp: warning:` on: it logs config-warning events."""
    from lbxdp import daemon
    cfg = config.parse(VIP + be(backup="true"))
    with caplog.at_level(logging.INFO, logger="lbxdp.daemon"):
        daemon._warn(cfg)
    [msg] = [r.getMessage() for r in caplog.records]
    assert msg.startswith('config-warning warning="vip[0].backend: every backend of 10.0.0.1:80/tcp is a backup')


def test_errors_name_the_option_the_user_gave() -> None:
    with pytest.raises(LbxError) as ei:
        exporter.parse_listen("localhost:9842", "--metrics")
    assert ei.value.message.startswith("--metrics 'localhost:9842'") and "--metrics" in ei.value.hint
