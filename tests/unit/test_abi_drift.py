"""bpf/abi.h and bpf/maps.h against lbxdp/abi.py: fail as soon as the C and the Python drift.

The header is parsed with regular expressions (no compiler, no kernel): comments are stripped,
then `enum lbx_* {...}` bodies are numbered the way C numbers them (an implicit member is the
previous value + 1) and `#define LBX_* <int>` lines are read. The self-checks at the bottom edit
a copy of the header text (insert, reorder, renumber, remove) and prove that each edit is caught.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from lbxdp import abi

BPF = Path(__file__).resolve().parents[2] / "bpf"
HEADER = BPF / "abi.h"
MAPS_H = BPF / "maps.h"

# C enum -> (prefix of its members in C, the IntEnum that mirrors it without the prefix)
ENUMS: dict[str, tuple[str, type[enum.IntEnum]]] = {
    "lbx_reason": ("LBX_R_", abi.Reason),
    "lbx_sched": ("LBX_SCHED_", abi.Sched),
    "lbx_fwd_mode": ("LBX_MODE_", abi.FwdMode),
    "lbx_acl_action": ("LBX_ACL_", abi.AclAction),
    "lbx_nat_state": ("LBX_NAT_", abi.NatState),
    "lbx_nat_dir": ("LBX_NAT_DIR_", abi.NatDir),
    "lbx_quic_reason": ("LBX_QUIC_", abi.QuicReason),
}

# #define in C -> the abi constant that mirrors it
DEFINES = {
    "LBX_MAX_VIPS": "MAX_VIPS",
    "LBX_MAX_BACKENDS": "MAX_BACKENDS",
    "LBX_FLOW_CAPACITY": "FLOW_CAPACITY",
    "LBX_HALF_OPEN_CAPACITY": "HALF_OPEN_CAPACITY",
    "LBX_HALF_OPEN_WAYS": "HALF_OPEN_WAYS",
    "LBX_TIME_SHIFT": "TIME_SHIFT",
    "LBX_SETTLE_UNITS": "SETTLE_UNITS",
    "LBX_FLOOD_THRESHOLD": "FLOOD_THRESHOLD",
    "LBX_TABLE_MAX": "TABLE_MAX",
    "LBX_TABLE_SLOTS_PER_WORD": "TABLE_SLOTS_PER_WORD",
    "LBX_VIP_BACKENDS_MAX": "VIP_BACKENDS_MAX",
    "LBX_FAMILY_V4": "FAMILY_V4",
    "LBX_FAMILY_V6": "FAMILY_V6",
    "LBX_BE_F_ACTIVE": "BE_F_ACTIVE",
    "LBX_BE_F_IN_TABLE": "BE_F_IN_TABLE",
    "LBX_VIP_F_PASS_NO_BACKEND": "VIP_F_PASS_NO_BACKEND",
    "LBX_VIP_FILTER_BITS": "VIP_FILTER_BITS",
    "LBX_VIP_FILTER_WORDS": "VIP_FILTER_WORDS",
    "LBX_VIP_FILTER_MUL": "VIP_FILTER_MUL",
    "LBX_ACL_MBT_WORDS": "ACL_MBT_WORDS",
    "LBX_ACL_MBT_PAD": "ACL_MBT_PAD",
    "LBX_LC_PEERS": "LC_PEERS",
    "LBX_CTL_F_MAC_SET": "CTL_F_MAC_SET",
    "LBX_PROBE_MARK": "PROBE_MARK",
    "LBX_PROBE_MARK_MASK": "PROBE_MARK_MASK",
    "LBX_ENC_F_FLOW_SOURCE": "ENC_F_FLOW_SOURCE",
    "LBX_ENCAP_TTL": "ENCAP_TTL",
    "LBX_GUE_SPORT_BASE": "GUE_SPORT_BASE",
    "LBX_GUE_SPORT_MASK": "GUE_SPORT_MASK",
    "LBX_ICMP4_QUOTE": "ICMP4_QUOTE",
    "LBX_ICMP6_QUOTE": "ICMP6_QUOTE",
    "LBX_SRC_LIMIT_CAPACITY": "SRC_LIMIT_CAPACITY",
    "LBX_SRC_LIMIT_WAYS": "SRC_LIMIT_WAYS",
    "LBX_SRC_SCOPE_MUL": "SRC_SCOPE_MUL",
    "LBX_ACL_MAX": "ACL_MAX",
    "LBX_ADMIT_F_ACL_V4": "ADMIT_F_ACL_V4",
    "LBX_ADMIT_F_ACL_V6": "ADMIT_F_ACL_V6",
    "LBX_NAT_F_SNAT": "NAT_F_SNAT",
    "LBX_NAT_TIME_SHIFT": "NAT_TIME_SHIFT",
    "LBX_NAT_PORT_TRIES": "NAT_PORT_TRIES",
    "LBX_NAT_CAPACITY": "NAT_CAPACITY",
    "LBX_NAT_NEW_CAPACITY": "NAT_NEW_CAPACITY",
    "LBX_NAT_NEW_WAYS": "NAT_NEW_WAYS",
    "LBX_VIP_F_QUIC": "VIP_F_QUIC",
    "LBX_VIP_F_PASSIVE": "VIP_F_PASSIVE",
    "LBX_VIP_F_ADMIT": "VIP_F_ADMIT",
    "LBX_QUIC_SID_OFF": "QUIC_SID_OFF",
    "LBX_QUIC_SID_END": "QUIC_SID_END",
    "LBX_QUIC_F_DOWN": "QUIC_F_DOWN",
    "LBX_QUIC_V1": "QUIC_V1",
    "LBX_QUIC_V2": "QUIC_V2",
}

# struct -> the abi constant that mirrors its pinned size
SIZES = {"lbx_ctl": "CTL_SIZE", "backend": "BACKEND_SIZE", "lbx_admit": "ADMIT_SIZE",
         "nat_entry": "NAT_ENTRY_SIZE", "nat_new_slot": "NAT_NEW_SLOT", "nat_cfg": "NAT_CFG_SIZE",
         "nat_backend": "NAT_BACKEND_SIZE",
         "src_set4": "SRC_SET4_SIZE", "src_set6": "SRC_SET6_SIZE"}


# --- the parser -------------------------------------------------------------------------------

def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _int(expr: str, known: dict[str, int], where: str) -> int:
    expr = expr.strip()
    expr = re.sub(r"(?<=[0-9a-fA-F])[uUlL]+$", "", expr)  # 1u, 0x01UL
    if expr in known:
        return known[expr]
    try:
        return int(expr, 0)
    except ValueError:
        raise AssertionError(f"{where}: cannot evaluate {expr!r}; teach the parser, don't skip it") from None


def parse_enums(text: str) -> dict[str, list[tuple[str, int]]]:
    """Every `enum NAME { ... };` -> [(member, value)] in declaration order, numbered like C."""
    out: dict[str, list[tuple[str, int]]] = {}
    for m in re.finditer(r"\benum\s+(\w+)\s*\{(.*?)\}\s*;", strip_comments(text), flags=re.S):
        name, body = m.group(1), m.group(2)
        members: list[tuple[str, int]] = []
        known: dict[str, int] = {}
        nxt = 0
        for item in (s.strip() for s in body.split(",")):
            if not item:
                continue
            im = re.fullmatch(r"(\w+)\s*(?:=\s*(.+))?", item, flags=re.S)
            assert im, f"enum {name}: cannot parse member {item!r}"
            member = im.group(1)
            value = _int(im.group(2), known, f"enum {name}.{member}") if im.group(2) else nxt
            members.append((member, value))
            known[member] = value
            nxt = value + 1
        out[name] = members
    return out


def parse_defines(text: str) -> dict[str, int]:
    """`#define LBX_NAME <integer>` lines (including those inside #ifndef guards)."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(LBX_\w+)[ \t]+([^\n]+)$", strip_comments(text), flags=re.M):
        value = m.group(2).strip()
        if re.fullmatch(r"\(?\s*(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\s*\)?", value):
            out[m.group(1)] = _int(value.strip("() "), {}, m.group(1))
    return out


# Map-declaring bcc macros; for the first two the name is the 4th argument, else the 1st.
_TABLE_MACROS = {"BPF_TABLE", "BPF_TABLE_PINNED", "BPF_TABLE_SHARED", "BPF_TABLE_PUBLIC"}
_MAP_MACRO = re.compile(r"\b(BPF_(?:TABLE(?:_PINNED|_SHARED|_PUBLIC)?|HASH|ARRAY|HISTOGRAM|PERCPU_ARRAY|"
                        r"PERCPU_HASH|LRU_HASH|LRU_PERCPU_HASH|DEVMAP|CPUMAP|XSKMAP|PROG_ARRAY|"
                        r"RINGBUF_OUTPUT|PERF_OUTPUT|QUEUE|STACK|STACK_TRACE|ARRAY_OF_MAPS|HASH_OF_MAPS|"
                        r"SK_STORAGE|SOCKMAP|SOCKHASH|CGROUP_ARRAY|LPM_TRIE))\s*\((.*?)\)\s*;", re.S)


def parse_maps(text: str) -> list[dict[str, str]]:
    """Map declarations: macro, name and (for pinned tables) the pin path expression."""
    out = []
    for m in _MAP_MACRO.finditer(strip_comments(text)):
        args = [a.strip() for a in re.split(r",(?![^(]*\))", m.group(2))]
        name = args[3] if m.group(1) in _TABLE_MACROS else args[0]
        pin = args[5] if m.group(1) == "BPF_TABLE_PINNED" and len(args) > 5 else ""
        out.append({"macro": m.group(1), "name": name, "pin": pin})
    return out


def parse_structs(text: str) -> tuple[list[str], dict[str, int]]:
    """(struct names defined, {struct name: size pinned by _Static_assert})."""
    text = strip_comments(text)
    defined = re.findall(r"^\s*struct\s+(\w+)\s*\{", text, flags=re.M)
    pins = {m.group(1): int(m.group(2)) for m in
            re.finditer(r"_Static_assert\s*\(\s*sizeof\s*\(\s*struct\s+(\w+)\s*\)\s*==\s*(\d+)", text)}
    return defined, pins


# --- the comparison, as a list of human-readable problems -------------------------------------

def drift(header_text: str) -> list[str]:
    """Everything in which the header text and lbxdp.abi disagree (empty: in sync)."""
    problems: list[str] = []
    enums = parse_enums(header_text)
    for c_name, (prefix, py_enum) in ENUMS.items():
        if c_name not in enums:
            problems.append(f"enum {c_name} is not in the header")
            continue
        bad_prefix = [m for m, _ in enums[c_name] if not m.startswith(prefix)]
        if bad_prefix:
            problems.append(f"enum {c_name}: members {bad_prefix} lack the prefix {prefix}")
        c_members = [(m.removeprefix(prefix), v) for m, v in enums[c_name]]
        py_members = [(m.name, m.value) for m in py_enum]
        if c_members != py_members:
            problems.append(f"enum {c_name} != abi.{py_enum.__name__}:\n"
                            f"  C:      {c_members}\n  Python: {py_members}")
    defines = parse_defines(header_text)
    for c_name, py_name in DEFINES.items():
        if c_name not in defines:
            problems.append(f"#define {c_name} is not in the header (abi.{py_name} mirrors it)")
        elif defines[c_name] != getattr(abi, py_name):
            problems.append(f"#define {c_name} {defines[c_name]} != abi.{py_name} {getattr(abi, py_name)}")
    _, pins = parse_structs(header_text)
    for s, py_name in SIZES.items():
        if pins.get(s) != getattr(abi, py_name):
            problems.append(f"sizeof(struct {s}) pinned at {pins.get(s)} != abi.{py_name} {getattr(abi, py_name)}")
    return problems


# --- the real files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def header() -> str:
    return HEADER.read_text()


def test_header_and_abi_agree(header: str) -> None:
    problems = drift(header)
    assert not problems, "bpf/abi.h and lbxdp/abi.py drifted:\n" + "\n".join(problems)


@pytest.mark.parametrize("c_name", ENUMS)
def test_enum_members_in_order_with_values(header: str, c_name: str) -> None:
    prefix, py_enum = ENUMS[c_name]
    c_members = [(m.removeprefix(prefix), v) for m, v in parse_enums(header)[c_name]]
    assert c_members == [(m.name, m.value) for m in py_enum]


@pytest.mark.parametrize("c_name,py_name", DEFINES.items())
def test_define_matches_abi_constant(header: str, c_name: str, py_name: str) -> None:
    assert parse_defines(header)[c_name] == getattr(abi, py_name)


def test_reason_max_counts_the_reasons() -> None:
    """lbx_reasons is sized LBX_R_MAX: it must be the last member, one past the others."""
    assert list(abi.Reason)[-1] is abi.Reason.MAX
    assert abi.Reason.MAX == len(abi.Reason) - 1


def test_every_exit_reason_names_its_verdict() -> None:
    for r in abi.Reason.exits():
        assert r.verdict in {"tx", "pass", "drop", "abort"}, r.name
        assert r.label


def test_maps_h_declares_exactly_the_abi_maps() -> None:
    declared = parse_maps(MAPS_H.read_text())
    names = [d["name"] for d in declared]
    assert len(names) == len(set(names)), f"a map is declared twice: {names}"
    assert sorted(names) == sorted(m.value for m in abi.Map), \
        "bpf/maps.h and abi.Map disagree (declared in C, listed in Python)"


def test_map_names_fit_the_kernel() -> None:
    for m in abi.Map:
        assert len(m.value) < 16, f"{m.value!r}: the kernel keeps 15 characters of a map name"
    assert len(abi.PROGRAM) < 16 and len(abi.STUB_PROGRAM) < 16


def test_maps_are_pinned_under_their_own_name() -> None:
    for d in parse_maps(MAPS_H.read_text()):
        assert d["macro"] == "BPF_TABLE_PINNED", f"{d['name']} is not pinned: a restart would lose it"
        assert re.fullmatch(r'LBX_PIN_DIR\s*"/' + re.escape(d["name"]) + '"', d["pin"]), \
            f"{d['name']} is pinned at {d['pin']}"


def test_no_map_is_declared_outside_maps_h() -> None:
    for f in sorted(BPF.glob("*.[ch]")):
        # trace.h: the trace build's own maps (-DLBX_TRACE only, never pinned, not in abi.Map)
        if f.name not in ("maps.h", "decap_maps.h", "probe.c", "trace.h"):
            assert not parse_maps(f.read_text()), f"{f.name} declares a map; maps live in maps.h (decap_maps.h)"


def test_probe_c_opens_only_balancer_maps_as_maps_h_declares_them() -> None:
    """probe.c (tc egress) reads two of the balancer's pinned maps: the same declarations, no map of its own."""
    ours = {d["name"]: d for d in parse_maps(MAPS_H.read_text())}
    probe = parse_maps((BPF / "probe.c").read_text())
    assert probe, "probe.c declares no map"
    for d in probe:
        assert d["name"] in ours and d == ours[d["name"]], f"probe.c's {d['name']} differs from maps.h's: {d}"


def test_every_struct_has_a_size_pin(header: str) -> None:
    defined, pins = parse_structs(header)
    assert defined, "no struct found: the parser is broken"
    assert [s for s in defined if s not in pins] == [], "struct without _Static_assert(sizeof(...) == N)"
    assert [s for s in pins if s not in defined] == [], "_Static_assert for a struct the header lacks"


# --- self-checks: the parser sees drift -------------------------------------------------------

def test_parser_numbers_like_c() -> None:
    text = "enum e { A, B = 5, C, /* D, not a member */ E = 0x10, F = B, G, };"
    assert parse_enums(text)["e"] == [("A", 0), ("B", 5), ("C", 6), ("E", 16), ("F", 5), ("G", 6)]


def _insert_after(text: str, anchor: str, line: str) -> str:
    assert anchor in text, f"self-check anchor {anchor!r} is gone from the header; update the test"
    return text.replace(anchor, anchor + "\n\t" + line, 1)


MUTATIONS = [
    pytest.param(lambda t: _insert_after(t, "LBX_R_PASS_NOT_IP,", "LBX_R_PASS_NEW, /* a, b */"),
                 "lbx_reason", id="reason-inserted-in-the-middle"),
    pytest.param(lambda t: _insert_after(t, "LBX_R_ABORT_REWRITE,", "LBX_R_DROP_NEW,"),
                 "lbx_reason", id="reason-inserted-before-max"),
    pytest.param(lambda t: _insert_after(t, "LBX_R_OK = 0,", "LBX_R_TX_OTHER = 40,"),
                 "lbx_reason", id="reason-with-explicit-value-renumbers-the-rest"),
    pytest.param(lambda t: t.replace("LBX_R_PASS_NOT_VIP,", "LBX_R_PASS_NOT_VIPS,", 1),
                 "lbx_reason", id="reason-renamed"),
    pytest.param(lambda t: re.sub(r"(\tLBX_R_PASS_NOT_IP,[^\n]*\n)(\tLBX_R_PASS_NOT_VIP,[^\n]*\n)", r"\2\1", t),
                 "lbx_reason", id="reasons-swapped"),
    pytest.param(lambda t: re.sub(r"\tLBX_R_PASS_FRAGMENT,[^\n]*\n", "", t),
                 "lbx_reason", id="reason-removed"),
    pytest.param(lambda t: t.replace("LBX_SCHED_HASH = 1", "LBX_SCHED_HASH = 2", 1),
                 "lbx_sched", id="sched-value-changed"),
    pytest.param(lambda t: _insert_after(t, "LBX_SCHED_HASH = 1,", "LBX_SCHED_MAGLEV,"),
                 "lbx_sched", id="sched-member-added"),
    pytest.param(lambda t: re.sub(r"(LBX_MODE_DSR = 0,[^\n]*\n)", r"\1\tLBX_MODE_NAT,\n", t),
                 "lbx_fwd_mode", id="mode-member-added"),
    pytest.param(lambda t: t.replace("#define LBX_VIP_BACKENDS_MAX 1024", "#define LBX_VIP_BACKENDS_MAX 512", 1),
                 "LBX_VIP_BACKENDS_MAX", id="define-changed"),
    pytest.param(lambda t: t.replace("#define LBX_BE_F_ACTIVE 0x01", "#define LBX_BE_F_ACTIVE 0x02", 1),
                 "LBX_BE_F_ACTIVE", id="hex-define-changed"),
    pytest.param(lambda t: re.sub(r"#define LBX_FAMILY_V6 6\n", "", t),
                 "LBX_FAMILY_V6", id="define-removed"),
    pytest.param(lambda t: t.replace("sizeof(struct lbx_ctl) == 64", "sizeof(struct lbx_ctl) == 72", 1),
                 "lbx_ctl", id="ctl-size-changed"),
    pytest.param(lambda t: t.replace("sizeof(struct backend) == 64", "sizeof(struct backend) == 56", 1),
                 "backend", id="backend-size-changed"),
    pytest.param(lambda t: t.replace("LBX_CTL_F_MAC_SET 0x0001", "LBX_CTL_F_MAC_SET 0x0002", 1),
                 "LBX_CTL_F_MAC_SET", id="ctl-flag-changed"),
    pytest.param(lambda t: _insert_after(t, "LBX_R_PASS_NOT_FOR_US,", "LBX_R_PASS_OTHER,"),
                 "lbx_reason", id="guard-reason-inserted"),
]


@pytest.mark.parametrize("mutate,names", MUTATIONS)
def test_self_check_drift_is_detected(header: str, mutate, names: str) -> None:
    mutated = mutate(header)
    assert mutated != header, "the mutation did not apply; the self-check tests nothing"
    problems = drift(mutated)
    assert problems, "drift went unnoticed"
    assert any(names in p for p in problems), problems


# --- lbxdp_decap: bpf/decap_abi.h and bpf/decap_maps.h against abi.Decap* ----------------------

DECAP_HEADER, DECAP_MAPS_H = BPF / "decap_abi.h", BPF / "decap_maps.h"
DECAP_DEFINES = {
    "LBX_DECAP_SLOT_BITS": "DECAP_SLOT_BITS", "LBX_DECAP_SLOTS": "DECAP_SLOTS", "LBX_DECAP_PROBES": "DECAP_PROBES",
    "LBX_DECAP_MAX_ENTRIES": "DECAP_MAX_ENTRIES", "LBX_DECAP_MAX_VIPS": "DECAP_MAX_VIPS",
    "LBX_DECAP_F_HOST": "DECAP_F_HOST", "LBX_DECAP_F_VIP": "DECAP_F_VIP", "LBX_DECAP_CTL_F_LOOSE": "DECAP_CTL_F_LOOSE",
}
DECAP_SIZES = {"decap_slot": "DECAP_SLOT_SIZE", "decap_ctl": "DECAP_CTL_SIZE"}


def decap_drift(text: str) -> list[str]:
    problems = []
    members = parse_enums(text).get("lbx_decap_reason")
    if members is None:
        return ["enum lbx_decap_reason is not in the header"]
    c_members = [(m.removeprefix("LBX_D_"), v) for m, v in members]
    if [m for m, _ in members if not m.startswith("LBX_D_")] or c_members != [(r.name, r.value) for r in abi.DecapReason]:
        problems.append(f"enum lbx_decap_reason != abi.DecapReason: {c_members}")
    defines = parse_defines(text)
    for c_name, py_name in DECAP_DEFINES.items():
        if defines.get(c_name) != getattr(abi, py_name):
            problems.append(f"#define {c_name} {defines.get(c_name)} != abi.{py_name}")
    defined, pins = parse_structs(text)
    for s_name, py_name in DECAP_SIZES.items():
        if pins.get(s_name) != getattr(abi, py_name):
            problems.append(f"sizeof(struct {s_name}) pinned at {pins.get(s_name)} != abi.{py_name}")
    if [s for s in defined if s not in pins]:
        problems.append("struct without a size pin")
    return problems


def test_decap_header_and_abi_agree() -> None:
    problems = decap_drift(DECAP_HEADER.read_text())
    assert not problems, "bpf/decap_abi.h and lbxdp/abi.py drifted:\n" + "\n".join(problems)


def test_decap_reasons_are_all_pass_and_max_last() -> None:
    assert list(abi.DecapReason)[-1] is abi.DecapReason.MAX == len(abi.DecapReason) - 1
    assert all(r.name.startswith("PASS_") for r in abi.DecapReason.exits()), "lbxdp_decap never drops"


def test_decap_maps_h_declares_exactly_the_abi_maps_pinned() -> None:
    declared = parse_maps(DECAP_MAPS_H.read_text())
    assert sorted(d["name"] for d in declared) == sorted(m.value for m in abi.DecapMap)
    for d in declared:
        assert d["macro"] == "BPF_TABLE_PINNED" and len(d["name"]) < 16, d
        assert re.fullmatch(r'LBX_PIN_DIR\s*"/' + re.escape(d["name"]) + '"', d["pin"]), d
    assert len(abi.DECAP_PROGRAM) < 16


@pytest.mark.parametrize("mutate", [
    lambda t: t.replace("LBX_D_PASS_NOT_LOCAL,", "LBX_D_PASS_NOT_LOCAL,\n\tLBX_D_PASS_NEW,", 1),
    lambda t: t.replace("#define LBX_DECAP_PROBES 8", "#define LBX_DECAP_PROBES 4", 1),
    lambda t: t.replace("sizeof(struct decap_slot) == 20", "sizeof(struct decap_slot) == 24", 1),
], ids=["reason-inserted", "define-changed", "size-changed"])
def test_decap_self_check_drift_is_detected(mutate) -> None:
    text = DECAP_HEADER.read_text()
    assert mutate(text) != text and decap_drift(mutate(text))
