"""The encap keys (mode ipip/gue, gue_port, ipip_source, mtu, mss_clamp, [balancer]) in the model
and the config file: what is accepted reads back, and each bad input is one error with its key path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lbxdp import config, model

GOOD = """
[balancer]
ipv4_source = "10.0.0.3"
flow_source_v4 = "172.16.0.0/16"
flow_source_v6 = "fd00:ffff::/64"
mtu = 1500

[[vip]]
address = "10.112.0.10"
port = 80
protocol = "tcp"
mode = "ipip"
ipip_source = "flow"
mss_clamp = true
  [[vip.backend]]
  address = "10.111.5.10"
  [[vip.backend]]
  address = "fd00:5::10"

[[vip]]
address = "fd00:112::10"
port = 80
protocol = "tcp"
mode = "gue"
gue_port = 7777
mtu = 1400
  [[vip.backend]]
  address = "fd00:5::11"
"""


def test_encap_config_reads_back() -> None:
    cfg = config.parse(GOOD)
    assert cfg.vips[0].mode is model.Mode.IPIP and cfg.vips[0].ipip_source is model.EncapSource.FLOW
    assert cfg.vips[1].gue_port == 7777 and cfg.vips[1].mtu == 1400
    assert str(cfg.balancer.flow_source_v4) == "172.16.0.0/16" and cfg.balancer.mtu == 1500
    assert config.parse(config.dump(cfg)) == cfg


def _vip(mode: str, vip: str, backend: str, extra: str = "", port: int = 80, proto: str = "tcp",
         bport: int | None = None) -> str:
    return (f'[[vip]]\naddress = "{vip}"\nport = {port}\nprotocol = "{proto}"\nmode = "{mode}"\n{extra}\n'
            f'  [[vip.backend]]\n  address = "{backend}"\n' + (f"  port = {bport}\n" if bport else ""))


BAD = [
    ("v6 backend on a v4 VIP in dsr mode", _vip("dsr", "10.0.0.1", "fd00::1"),
     "vip[0].backend[0].address: 'fd00::1' is IPv6 but the VIP is IPv4; dsr mode cannot cross address families"),
    ("v4 backend on a v6 VIP in ipip mode", _vip("ipip", "fd00::1", "10.0.0.2"),
     "vip[0].backend[0].address: '10.0.0.2' is IPv4 but the VIP is IPv6; an IPv6 VIP cannot be carried"),
    ("backend port differs in gue mode", _vip("gue", "10.0.0.1", "10.0.0.2", bport=8080),
     "vip[0].backend[0].port: 8080 differs from the VIP port 80; gue mode cannot rewrite ports"),
    ("GUE port clash with a UDP VIP", _vip("gue", "10.0.0.1", "10.0.0.2", "gue_port = 53")
     + _vip("dsr", "10.0.0.5", "10.0.0.6", port=53, proto="udp"),
     "vip[0].gue_port: 53 is also the port of the UDP VIP vip[1]"),
    ("flow source without a prefix", _vip("ipip", "10.0.0.1", "10.0.0.2", 'ipip_source = "flow"'),
     "vip[0].ipip_source: \"flow\" needs [balancer] flow_source_v4"),
    ("ipip_source on gue", '[balancer]\nflow_source_v4 = "172.16.0.0/16"\n'
     + _vip("gue", "10.0.0.1", "10.0.0.2", 'ipip_source = "flow"'), "vip[0].ipip_source: applies to mode ipip only"),
    ("mtu below 1280", _vip("ipip", "10.0.0.1", "10.0.0.2", "mtu = 1000"), "vip[0].mtu: 1000 is out of range (1280-65535)"),
    ("v6 VIP mtu leaves less than 1280", _vip("gue", "fd00::1", "fd00::2", "mtu = 1300"),
     "vip[0].mtu: 1300 leaves 1252 bytes for the inner packet; an IPv6 VIP needs 1280 (mtu >= 1328)"),
    ("encap key on a dsr VIP", _vip("dsr", "10.0.0.1", "10.0.0.2", "gue_port = 7000"),
     "vip[0].gue_port: applies to modes ipip and gue only"),
    ("unknown [balancer] key", '[balancer]\nipv4_src = "10.0.0.3"\n' + _vip("ipip", "10.0.0.1", "10.0.0.2"),
     "balancer.ipv4_src: unknown key 'ipv4_src'; did you mean 'ipv4_source'?"),
    ("ipv6_source not IPv6", '[balancer]\nipv6_source = "10.0.0.3"\n' + _vip("ipip", "10.0.0.1", "10.0.0.2"),
     "balancer.ipv6_source: '10.0.0.3' is not an IPv6 address"),
    ("flow_source_v4 with host bits", '[balancer]\nflow_source_v4 = "172.16.0.1/16"\n' + _vip("ipip", "10.0.0.1", "10.0.0.2"),
     "balancer.flow_source_v4: '172.16.0.1/16' is not a network prefix"),
]


@pytest.mark.parametrize("text,want", [(t, w) for _, t, w in BAD], ids=[d for d, _, _ in BAD])
def test_bad_encap_config_is_one_error(text: str, want: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(text)
    assert want in str(e.value).splitlines()[0], str(e.value)


def test_config_check_cli_prints_one_line_and_exits_2(tmp_path) -> None:
    """Through lbxdp's real entry point (a subprocess: CliRunner reports an LbxError as exit 1)."""
    f = tmp_path / "lb.toml"
    f.write_text(BAD[0][1])
    r = subprocess.run([sys.executable, "-m", "lbxdp", "config", "check", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.startswith("lbxdp: error: ") and "dsr mode cannot cross address families" in r.stderr
    assert "Traceback" not in r.stderr


def test_health_via_reads_back_and_refuses_other_values() -> None:
    text = _vip("ipip", "10.0.0.1", "10.0.0.2") + '[vip.health]\ntype = "tcp"\nvia = "direct"\n'
    cfg = config.parse(text)
    assert cfg.vips[0].health.via == "direct" and config.parse(config.dump(cfg)) == cfg
    assert config.parse(_vip("ipip", "10.0.0.1", "10.0.0.2") + '[vip.health]\ntype = "tcp"\n').vips[0].health.via is None
    with pytest.raises(config.ConfigError) as e:
        config.parse(_vip("ipip", "10.0.0.1", "10.0.0.2") + '[vip.health]\ntype = "tcp"\nvia = "wire"\n')
    assert "vip[0].health.via" in str(e.value) and "tunnel" in str(e.value)
