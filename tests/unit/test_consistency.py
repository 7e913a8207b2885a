"""Cross-node consistency (issue 14): every node builds the same tables from the same config.

A node's tables hold its own backend entry ids (allocated in the order its history gave them), so
what must agree is the backend each slot names: etcdsrc.table_tag digests exactly that. The table
builders take no per-node input (ring.py: BLAKE2b of the backend's key with a fixed person, no
seed; flow_hash in bpf/select.h: MurmurHash3's mixer over the flow key, no seed); these tests
build the same config in separate Python processes, with different hash seeds, different entry
numbering, with and without the C helper, and compare.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lbxdp import config, etcdsrc, ring
from lbxdp.balancer import Runtime, plan_table

REPO = Path(__file__).resolve().parents[2]

CONFIG = """
[[vip]]
address = "10.0.0.1"
port = 80
protocol = "tcp"
scheduler = "maglev"
[[vip.backend]]
address = "10.0.1.1"
port = 80
weight = 1
[[vip.backend]]
address = "10.0.1.2"
port = 80
weight = 3
[[vip.backend]]
address = "10.0.1.3"
port = 80
weight = 2
[[vip.backend]]
address = "10.0.1.4"
port = 80

[[vip]]
address = "fd00::1"
port = 443
protocol = "tcp"
scheduler = "maglev"
table_size = 4099
[[vip.backend]]
address = "fd00:1::1"
port = 443
[[vip.backend]]
address = "fd00:1::2"
port = 443
[[vip.backend]]
address = "fd00:1::3"
port = 443
weight = 5

[[vip]]
address = "10.0.0.2"
port = 53
protocol = "udp"
scheduler = "rr"
[[vip.backend]]
address = "10.0.2.1"
port = 53
weight = 2
[[vip.backend]]
address = "10.0.2.2"
port = 53
"""

# What one node does with the config: parse it, number its entries its own way (`offset` and
# `reverse` stand for a node whose entries were allocated in another order), build each VIP's
# table, and digest it as backends (entry id -> ADDR:PORT), as `lbxdp cluster status` does.
NODE = r"""
import json, sys
from lbxdp import config, etcdsrc
from lbxdp.balancer import Runtime, plan_table
offset, reverse = int(sys.argv[1]), sys.argv[2] == "1"
cfg = config.parse(sys.stdin.read())
out = {}
for v in cfg.vips:
    n = len(v.backends)
    ids = [offset + (n - i if reverse else i + 1) for i in range(n)]
    name = dict(zip(ids, (b.name for b in v.backends)))
    table = plan_table(v, ids, Runtime()).build()
    out[v.key.name] = etcdsrc.table_tag([name[i] for i in table])
print(json.dumps(out, sort_keys=True))
"""


def node(text: str, offset: int, reverse: bool, env: dict[str, str]) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", NODE, str(offset), "1" if reverse else "0"], input=text,
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_same_config_gives_the_same_tables_in_independent_processes() -> None:
    runs = [node(CONFIG, 0, False, {"PYTHONHASHSEED": "1"}),
            node(CONFIG, 1000, True, {"PYTHONHASHSEED": "2"}),                        # other entry ids
            node(CONFIG, 7, True, {"PYTHONHASHSEED": "3", ring.ACCEL_ENV: "1"})]      # pure Python Maglev
    assert len(runs[0]) == 3 and all(t != "empty" for t in runs[0].values()), runs[0]
    assert runs[1] == runs[0] and runs[2] == runs[0], runs


def test_a_different_config_gives_different_tags() -> None:
    """The tag tells configs apart (so equal tags mean something): one weight changed."""
    a = node(CONFIG, 0, False, {})
    b = node(CONFIG.replace("weight = 3", "weight = 4", 1), 0, False, {})
    assert a["10.0.0.1:80/tcp"] != b["10.0.0.1:80/tcp"]
    assert {k: v for k, v in a.items() if k != "10.0.0.1:80/tcp"} == \
        {k: v for k, v in b.items() if k != "10.0.0.1:80/tcp"}


def test_backend_order_in_the_config_does_not_change_a_maglev_table() -> None:
    cfg = config.parse(CONFIG)
    v = cfg.vips[0]
    shuffled = v.__class__(**{**v.__dict__, "backends": tuple(reversed(v.backends))})

    def tag(vip) -> str:
        ids = list(range(1, len(vip.backends) + 1))
        name = dict(zip(ids, (b.name for b in vip.backends)))
        return etcdsrc.table_tag([name[i] for i in plan_table(vip, ids, Runtime()).build()])
    assert tag(shuffled) == tag(v)


def test_no_seed_in_the_table_builders_or_the_flow_hash() -> None:
    """The inputs are the key and the table size only: no random, time or host in ring.py's
    permutation, and flow_hash() in bpf/select.h reads nothing but the flow key."""
    src = (REPO / "lbxdp" / "ring.py").read_text() + (REPO / "lbxdp" / "_ring.c").read_text()
    assert not re.search(r"\b(random|secrets|urandom|getrandom|gethostname|time\.time|uuid)\b", src)
    sel = (REPO / "bpf" / "select.h").read_text()
    body = re.search(r"static __always_inline __u32 flow_hash\(const struct flow_key \*f\)\n\{(.*?)\n\}", sel, re.S)
    assert body, "flow_hash() not found in bpf/select.h"
    assert re.findall(r"\b[a-z_][a-z0-9_]*\(", body[1]) == ["mix32("] * 3, body[1]   # no map lookup, no helper
    assert "lookup" not in body[1] and "bpf_" not in body[1]


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 2, 3), (5, 1, 1, 1)])
def test_maglev_is_a_function_of_keys_weights_and_size(weights: tuple[int, ...]) -> None:
    keyed = [(f"10.0.0.{i + 1}:80", w) for i, w in enumerate(weights)]
    a = ring.maglev(keyed, 4099)
    b = ring.maglev(list(reversed(keyed)), 4099)
    order = [k for k, _ in keyed]
    rev = list(reversed(order))
    assert [order[i] for i in a] == [rev[i] for i in b]
