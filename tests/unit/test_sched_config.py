"""Issue 13's config keys: scheduler = "source" (source_prefix) and "leastconn", per-backend
max_conns; each bad value is one error naming its key, and a good config dumps back to itself."""

from __future__ import annotations

from collections import Counter

import pytest

from lbxdp import abi, config, model
from lbxdp.balancer import Runtime, lc_peers, sched_of
from lbxdp.errors import LbxError

VIP = '''
[[vip]]
address = "10.0.9.1"
port = 80
protocol = "tcp"
scheduler = "source"
source_prefix = 24
'''
VIP6 = VIP.replace('"10.0.9.1"', '"fd00:9::1"').replace("source_prefix = 24", "source_prefix = 64")
BE = '''
  [[vip.backend]]
  address = "10.1.0.5"
  mac = "02:00:00:00:00:05"
  max_conns = 100
  [[vip.backend]]
  address = "10.1.0.6"
  mac = "02:00:00:00:00:06"
  weight = 3
'''
BE6 = BE.replace('"10.1.0.5"', '"fd00:1::5"').replace('"10.1.0.6"', '"fd00:1::6"')


def test_source_and_caps_parse_and_dump_back() -> None:
    cfg = config.parse(VIP + BE)
    v = cfg.vips[0]
    assert v.scheduler is model.Scheduler.SOURCE and v.source_prefix == 24 and v.src_prefix == 24
    assert v.scheduler.abi == abi.Sched.SOURCE and v.scheduler.maglev
    assert [b.max_conns for b in v.backends] == [100, 0] and v.counted
    assert config.parse(config.dump(cfg)) == cfg
    v6 = config.parse(VIP6 + BE6).vips[0]
    assert v6.src_prefix == 64
    assert config.parse(VIP.replace("source_prefix = 24\n", "") + BE).vips[0].src_prefix == 32
    assert config.parse(VIP6.replace("source_prefix = 64\n", "") + BE6).vips[0].src_prefix == 128


def test_leastconn_weights_scale_to_16_bits() -> None:
    cfg = config.parse(VIP.replace('"source"', '"leastconn"').replace("source_prefix = 24\n", "table_size = 4099\n") + BE)
    v = cfg.vips[0]
    assert v.scheduler.abi == abi.Sched.LEASTCONN and v.counted and v.table_size == 4099
    assert [sched_of(v, b).weight for b in v.backends] == [1, 3]
    assert all(sched_of(v, b).counted for b in v.backends)
    big = v.backends[1].__class__(v.backends[1].address, 80, weight=1_000_000)
    v2 = model.Vip(v.address, 80, v.protocol, scheduler=model.Scheduler.LEASTCONN, backends=(v.backends[0], big))
    assert [sched_of(v2, b).weight for b in v2.backends] == [1, 0xFFFF]
    plain = config.parse(VIP.replace('"source"', '"maglev"').replace("source_prefix = 24\n", "") +
                         BE.replace("max_conns = 100", "max_conns = 0")).vips[0]
    assert not plain.counted and sched_of(plain, plain.backends[0]) == sched_of(plain, plain.backends[1])
    assert not sched_of(plain, plain.backends[0]).counted


@pytest.mark.parametrize("text, key, words", [
    (VIP.replace("= 24", "= 33") + BE, "vip[0].source_prefix", "out of range (1-32"),
    (VIP.replace("= 24", "= 0") + BE, "vip[0].source_prefix", "out of range"),
    (VIP6.replace("= 64", "= 129") + BE6, "vip[0].source_prefix", "out of range (1-128"),
    (VIP.replace("= 24", '= "24"') + BE, "vip[0].source_prefix", "integer"),
    (VIP.replace('"source"', '"maglev"') + BE, "vip[0].source_prefix", "only applies to scheduler \"source\""),
    (VIP.replace('"source"', '"leastcon"') + BE, "vip[0].scheduler", "leastconn"),
    (VIP.replace('"source"', '"rr"').replace("source_prefix = 24", "table_size = 4099") + BE,
     "vip[0].table_size", "only applies"),
    (VIP + BE.replace("max_conns = 100", "max_conns = -1"), "vip[0].backend[0].max_conns", "out of range"),
    (VIP + BE.replace("max_conns = 100", "max_conns = 4294967296"), "vip[0].backend[0].max_conns", "out of range"),
    (VIP + BE.replace("max_conns = 100", 'max_conns = "many"'), "vip[0].backend[0].max_conns", "integer"),
    (VIP + BE.replace("max_conns = 100", "max_conn = 100"), "vip[0].backend[0].max_conn", "unknown key"),
    (VIP.replace('"source"', '"leastconn"').replace("source_prefix = 24", 'mode = "nat"') + BE,
     "vip[0].scheduler", "not available in nat mode"),
    (VIP.replace("source_prefix = 24", 'mode = "nat"') + BE, "vip[0].backend[0].max_conns", "not available in nat mode"),
])
def test_bad_sched_input_is_one_error_naming_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(LbxError) as e:
        config.parse(text)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{key}:") and words in first, first


# --- the verbs (lbxdp vip set-scheduler, backend set-max-conns; lbxdp.edits) -------------------

def test_verbs_edit_scheduler_and_caps_and_refuse_bad_values() -> None:
    from lbxdp import edits
    cfg = config.parse(VIP.replace('"source"', '"maglev"').replace("source_prefix = 24\n", "") + BE)
    v = cfg.vips[0]
    c = edits.validated(edits.vip_set_scheduler(cfg, v.key, model.Scheduler.SOURCE, 16).cfg, "vip set-scheduler")
    assert c.vips[0].scheduler is model.Scheduler.SOURCE and c.vips[0].src_prefix == 16
    c = edits.validated(edits.vip_set_scheduler(c, v.key, model.Scheduler.LEASTCONN).cfg, "vip set-scheduler")
    assert c.vips[0].scheduler is model.Scheduler.LEASTCONN and c.vips[0].source_prefix is None
    bid = v.id_of(v.backends[1])
    c = edits.validated(edits.backend_set_max_conns(c, bid, 250).cfg, "backend set-max-conns")
    assert [b.max_conns for b in c.vips[0].backends] == [100, 250]
    with pytest.raises(LbxError) as e:
        edits.validated(edits.backend_set_max_conns(c, bid, -5).cfg, "backend set-max-conns")
    assert str(e.value).splitlines()[0].startswith("backend set-max-conns: VIP 10.0.9.1:80/tcp backend 10.1.0.6:80 "
                                                   "max_conns: -5 is out of range")
    with pytest.raises(LbxError) as e:
        edits.validated(edits.vip_set_scheduler(c, v.key, model.Scheduler.HASH, 24).cfg, "vip set-scheduler")
    assert "source_prefix" in str(e.value).splitlines()[0]
    c = edits.validated(edits.vip_add(c, model.VipKey.parse("10.0.9.2:80/tcp"), v.backends, model.Scheduler.SOURCE,
                                      4099, 0.0, 24).cfg, "vip add")
    assert c.vips[1].table_size == 4099 and c.vips[1].source_prefix == 24


# --- the daemon's recount (lbxdp.sched.ConnRecountService) ---------------------------------------

def test_recount_service_runs_only_for_counted_vips_and_at_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from lbxdp import sched
    calls = []

    class FakeMaps:
        def recount_conns(self) -> dict:
            calls.append(1)
            return {7: (12, 10)}

        def close(self) -> None:
            pass
    now = [100.0]
    monkeypatch.setattr(sched.time, "monotonic", lambda: now[0])
    svc = sched.ConnRecountService(None, interval=10.0, open_maps=FakeMaps)   # type: ignore[arg-type]
    plain = config.parse(VIP.replace('"source"', '"maglev"').replace("source_prefix = 24\n", "") +
                         BE.replace("max_conns = 100", "max_conns = 0"))
    svc.start(SimpleNamespace(cfg=plain))
    svc.tick()
    assert calls == []
    svc.on_change(SimpleNamespace(cfg=config.parse(VIP + BE)))   # a cap: counted
    svc.tick()
    svc.tick()
    assert calls == [1] and svc.corrections == 1
    now[0] += 10.5
    svc.tick()
    assert calls == [1, 1]


def _lc_vip(weights: tuple[int, ...]) -> model.Vip:
    text = VIP.replace('"source"', '"leastconn"').replace("source_prefix = 24\n", "")
    for n, w in enumerate(weights):
        text += f'  [[vip.backend]]\n  address = "10.1.0.{10 + n}"\n  mac = "02:00:00:00:00:{10 + n:02x}"\n  weight = {w}\n'
    return config.parse(text).vips[0]


def test_leastconn_peers_are_other_backends_drawn_by_weight() -> None:
    """struct backend.lc_peer (bpf/sched.h: a flow's second candidate): other usable backends of
    the VIP, never the backend itself, all different, drawn by weight, the same on every call
    (every node); with few backends, all the others."""
    v = _lc_vip((1, 1, 1, 1, 1, 1, 1, 20))
    ids = list(range(11, 19))
    peers = lc_peers(v, ids, Runtime())
    assert set(peers) == set(ids) and peers == lc_peers(v, ids, Runtime())
    for bid, p in peers.items():
        assert len(p) == abi.LC_PEERS == len(set(p)) and bid not in p and set(p) <= set(ids), (bid, p)
    # weight 20 of 27: the heavy backend is a peer of (nearly) every other one
    assert sum(18 in p for bid, p in peers.items() if bid != 18) >= 6, peers
    # a backend out of service is nobody's peer, and has none written
    down = Runtime(down=frozenset({v.id_of(v.backends[7])}))
    peers = lc_peers(v, ids, down)
    assert 18 not in peers and all(18 not in p for p in peers.values())
    # few backends: all the others (the program reads a third word 0 as "two peers")
    assert lc_peers(_lc_vip((1, 1, 4, 1)), [1, 2, 3, 4], Runtime())[3] == (1, 2, 4)
    assert lc_peers(_lc_vip((1, 1, 4)), [1, 2, 3], Runtime()) == {1: (2, 3, 0), 2: (1, 3, 0), 3: (1, 2, 0)}
    assert lc_peers(_lc_vip((1, 9)), [7, 8], Runtime()) == {7: (8, 8, 0), 8: (7, 7, 0)}
    assert lc_peers(_lc_vip((1,)), [7], Runtime()) == {7: (0, 0, 0)}
