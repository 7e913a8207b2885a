"""allow/deny and new_flow_limit (issue 11): TOML keys, the model's rules with key paths, the
pure edits behind `lbxdp acl add|del`, the CIDR parameter, and Admission.verdict (the semantics
bpf/acl.h implements; tests/datapath/test_admission.py runs the program)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from click.testing import CliRunner

from lbxdp import abi, config, edits, model
from lbxdp.cli import cli
from lbxdp.errors import LbxError

net = ipaddress.ip_network
VIP = """
[[vip]]
address = "10.0.0.1"
port = 80
protocol = "tcp"
{extra}
[[vip.backend]]
address = "10.0.1.1"
port = 80
mac = "02:00:00:00:00:09"
"""


def parse(extra: str = "", balancer: str = "") -> model.Config:
    return config.parse((f"[balancer]\n{balancer}\n" if balancer else "") + VIP.format(extra=extra))


def test_keys_parse_and_dump_back() -> None:
    cfg = parse('allow = ["192.0.2.0/24"]\ndeny = ["192.0.2.128/25"]\nnew_flow_limit = { rate = 100, burst = 200 }',
                'deny = ["198.51.100.0/24", "2001:db8:bad::/48"]\nnew_flow_limit = { rate = 1000, burst = 50 }')
    a = cfg.vips[0].admission
    assert a == model.Admission((net("192.0.2.0/24"),), (net("192.0.2.128/25"),), model.NewFlowLimit(100, 200))
    assert cfg.balancer.admission.deny == (net("198.51.100.0/24"), net("2001:db8:bad::/48"))
    assert cfg.problems() == []
    assert config.parse(config.dump(cfg)) == cfg


@pytest.mark.parametrize("extra, path, words", [
    ('allow = ["192.0.2.1/24"]', "vip[0].allow[0]", "host bits"),
    ('deny = "192.0.2.0/24"', "vip[0].deny", "array"),
    ('new_flow_limit = 5', "vip[0].new_flow_limit", "table"),
    ('new_flow_limit = { rate = 1, brust = 2 }', "vip[0].new_flow_limit.brust", "did you mean 'burst'"),
])
def test_file_errors_name_the_key(extra: str, path: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        parse(extra)
    assert path in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("extra, path, words", [
    ('allow = ["2001:db8::/32"]', "vip[0].allow[0]", "IPv6 prefix; this VIP is IPv4"),
    ('allow = ["192.0.2.0/24"]\ndeny = ["192.0.2.0/24"]', "vip[0].deny[0]", "allowed or denied, not both"),
    ('deny = ["192.0.2.0/24", "192.0.2.0/24"]', "vip[0].deny[1]", "listed twice"),
    ('new_flow_limit = { rate = 0, burst = 10 }', "vip[0].new_flow_limit.rate", "out of range"),
    ('new_flow_limit = { rate = 10, burst = 0 }', "vip[0].new_flow_limit.burst", "out of range"),
])
def test_model_rules_name_the_key(extra: str, path: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as e:    # parse() reports the model's first problem
        parse(extra)
    assert str(e.value).startswith(path) and words in str(e.value), str(e.value)


def test_global_rules_may_mix_families() -> None:
    assert parse(balancer='allow = ["192.0.2.0/24", "2001:db8::/32"]').problems() == []


def test_verdict_longest_prefix_then_allow_list() -> None:
    a = model.Admission(allow=(net("192.0.2.0/24"),), deny=(net("192.0.2.128/25"),))
    assert a.verdict(ipaddress.ip_address("192.0.2.1")) is abi.AclAction.ALLOW
    assert a.verdict(ipaddress.ip_address("192.0.2.200")) is abi.AclAction.DENY
    assert a.verdict(ipaddress.ip_address("203.0.113.1")) is abi.AclAction.NOT_ALLOWED
    assert a.verdict(ipaddress.ip_address("2001:db8::1")) is abi.AclAction.NOT_ALLOWED
    carve = model.Admission(deny=(net("10.0.0.0/8"),), allow=(net("10.1.0.0/16"),))
    assert carve.verdict(ipaddress.ip_address("10.1.2.3")) is abi.AclAction.ALLOW
    assert model.Admission(deny=(net("10.0.0.0/8"),)).verdict(ipaddress.ip_address("11.0.0.1")) is abi.AclAction.ALLOW


def test_acl_edits() -> None:
    cfg = parse()
    key = cfg.vips[0].key
    cfg = edits.acl_add(cfg, model.AclList.DENY, net("198.51.100.0/24")).cfg
    cfg = edits.acl_add(cfg, model.AclList.ALLOW, net("192.0.2.0/24"), key).cfg
    assert cfg.balancer.admission.deny == (net("198.51.100.0/24"),)
    assert cfg.vips[0].admission.allow == (net("192.0.2.0/24"),)
    with pytest.raises(LbxError, match="already"):
        edits.acl_add(cfg, model.AclList.ALLOW, net("192.0.2.0/24"), key)
    with pytest.raises(LbxError, match="not on the deny list"):
        edits.acl_del(cfg, model.AclList.DENY, net("192.0.2.0/24"), key)
    bad = edits.acl_add(cfg, model.AclList.ALLOW, net("2001:db8::/32"), key).cfg
    with pytest.raises(LbxError, match="acl add: VIP 10.0.0.1:80/tcp allow.*IPv6 prefix") as e:
        edits.validated(bad, "acl add")
    assert e.value.exit_code == 2
    cfg = edits.acl_del(cfg, model.AclList.ALLOW, net("192.0.2.0/24"), key).cfg
    assert cfg.vips[0].admission == model.Admission()


def test_cli_refuses_a_bad_prefix_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    from lbxdp import cli as cli_mod
    monkeypatch.setattr(sys, "argv", ["lbxdp", "acl", "add", "deny", "10.0.0.1/8"])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("lbxdp: error: '10.0.0.1/8' is not a network prefix") and "host bits" in err
    assert "Traceback" not in err


def test_cli_acl_help_has_examples() -> None:
    r = CliRunner().invoke(cli, ["acl", "--help"])
    assert r.exit_code == 0 and "lbxdp acl add deny 198.51.100.0/24" in r.output
