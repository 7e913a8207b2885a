"""lbxdp.config: TOML text -> model.Config, and every way a config can be wrong.

Each bad config is one table row: id, TOML text, the exact key path the error must name, and a
piece of the message that shows the bad value (or says what is missing). Every error must be a
ConfigError (exit code 2) whose message starts with "<key path>: ".
"""

from __future__ import annotations

import ipaddress
from textwrap import dedent

import pytest

from lbxdp import abi, config, model
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
    ("unknown-mode", vip(mode='"nat"') + BE, "vip[0].mode", "'nat'"),
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
