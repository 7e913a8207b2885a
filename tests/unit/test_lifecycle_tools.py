"""The pure parts of the lifecycle tooling, without root, kernel or network.

- `lbxdp flows`: which connection-table entries a --vip/--backend filter picks, and the counts.
- lbxdp.lab.echo's hold client: how it names failures, its numbered lines, and one connection's
  round against a socketpair (AF_UNIX: no network); argument bounds of `hold` and --sport-base.
- lbxdp.lab's config helpers: the TOML they write (model + config.dump) parses to the VIP they describe.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading

import pytest
from click.testing import CliRunner

from lbxdp import cli, config, model
from lbxdp.cli.edit import flow_counts, flow_matcher
from lbxdp.cli.params import parse_endpoint, parse_vip
from lbxdp.maps import FlowEntry
from lbxdp.lab.echo import hold
from lbxdp.lab.echo.__main__ import main as echo_main
from lbxdp.lab.rig import Rig, RigSpec

A = ipaddress.ip_address
VIP = "10.112.0.10:8080/tcp"


def entry(dport: int = 8080, proto: model.Protocol = model.Protocol.TCP, live: bool = True,
          backend: str = "10.111.0.11:8080", vip: str = VIP, dst: str = "10.112.0.10") -> FlowEntry:
    return FlowEntry(A("10.111.0.2"), 40000, A(dst), dport, proto, 7, 1, live,
                     backend if live else None, vip if live else None)


# --- lbxdp flows -----------------------------------------------------------------------------

@pytest.mark.parametrize("vip,be,e,hit", [
    (None, None, entry(), True),
    (None, None, entry(live=False), True),                       # no filter: everything
    (VIP, None, entry(), True),
    ("10.112.0.10:8080/udp", None, entry(), False),              # a live entry knows its VIP
    (VIP, None, entry(vip="10.112.0.10:*/tcp", dport=9000), False),
    (None, "10.111.0.11:8080", entry(), True),
    (None, "10.111.0.12:8080", entry(), False),
    (None, "10.111.0.11:8080", entry(live=False), False),        # a stale entry has no backend
    (VIP, "10.111.0.11:8080", entry(), True),
    (VIP, None, entry(live=False), True),                        # stale: matched by destination
    (VIP, None, entry(live=False, dport=9000), False),
    (VIP, None, entry(live=False, proto=model.Protocol.UDP), False),
    (VIP, None, entry(live=False, dst="10.112.0.11"), False),
    ("10.112.0.10:*/tcp", None, entry(live=False, dport=9000), True),   # any-port VIP
])
def test_flow_filter(vip: str | None, be: str | None, e: FlowEntry, hit: bool) -> None:
    match = flow_matcher(parse_vip(vip) if vip else None, parse_endpoint(be, "backend") if be else None)
    assert match(e) is hit


def test_flow_counts_group_live_entries_by_backend() -> None:
    es = [entry(), entry(), entry(backend="10.111.0.12:8080"), entry(live=False)]
    assert flow_counts(es) == {"entries": 4, "live": 3, "stale": 1, "by_backend": [
        {"vip": VIP, "backend": "10.111.0.11:8080", "flows": 2},
        {"vip": VIP, "backend": "10.111.0.12:8080", "flows": 1}]}


def test_flow_entry_name() -> None:
    assert entry().name == "10.111.0.2:40000 -> 10.112.0.10:8080/tcp"


def test_flows_commands_are_listed() -> None:
    out = CliRunner().invoke(cli.cli, ["flows", "--help"]).output
    assert all(c in out for c in ("ls", "count", "flush"))


# --- the hold client -------------------------------------------------------------------------

@pytest.mark.parametrize("exc,name", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), "ECONNRESET"),
    (BrokenPipeError(errno.EPIPE, "pipe"), "EPIPE"),
    (socket.timeout("timed out"), "timeout"),
    (EOFError("eof"), "EOF"),
    (ValueError("sent x"), "mismatch"),
])
def test_error_names(exc: BaseException, name: str) -> None:
    assert hold.error_name(exc) == name


def test_hold_messages_are_numbered_lines() -> None:
    assert hold.hold_message(3, 17) == b"3 17\n"


def _held_pair(reply) -> tuple[hold.Held, socket.socket, threading.Thread]:
    """A Held whose socket's peer answers each line with reply(line) (None: close)."""
    ours, peer = socket.socketpair()
    h = hold.Held(3)
    h.sock, h.backend = ours, "be1"

    def serve() -> None:
        with peer:
            while data := peer.recv(64):
                out = reply(data)
                if out is None:
                    return
                peer.sendall(out)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return h, peer, t


def test_held_round_counts_exact_echoes() -> None:
    h, _, t = _held_pair(lambda d: d)
    for _ in range(3):
        h.round(2.0)
    h.close()
    t.join(5)
    s = h.summary()
    assert (s["rounds"], s["sent"], s["received"], s["errors"]) == (3, 12, 12, [])  # "3 0\n" .. "3 2\n"


@pytest.mark.parametrize("reply,error", [
    (lambda d: b"9 9\n", "mismatch"),
    (lambda d: None, "EOF"),
])
def test_held_round_fails_and_closes_on_a_bad_echo(reply, error: str) -> None:
    h, _, t = _held_pair(reply)
    h.round(2.0)
    t.join(5)
    s = h.summary()
    assert not s["open"] and s["rounds"] == 0 and [e["error"] for e in s["errors"]] == [error]
    assert h.sock is None


def test_held_round_times_out() -> None:
    h, peer, _ = _held_pair(lambda d: b"")          # never answers (sends nothing)
    h.round(0.05)
    assert [e["error"] for e in h.summary()["errors"]] == ["timeout"]
    peer.close()


@pytest.mark.parametrize("argv", [
    ["client", "tcp", "10.0.0.1", "80", "--sport-base", "20000"],             # udp only
    ["client", "udp", "10.0.0.1", "80", "--sport-base", "65500", "--count", "100"],
    ["client", "udp", "10.0.0.1", "80", "--sport-base", "80"],
    ["hold", "tcp", "10.0.0.1", "80", "--conns", "0"],
    ["hold", "tcp", "10.0.0.1", "80", "--conns", str(hold.MAX_CONNS + 1)],
    ["hold", "tcp", "10.0.0.1", "80", "--duration", "0"],
    ["hold", "tcp", "10.0.0.1", "80", "--duration", "1e9"],
    ["hold", "udp", "10.0.0.1", "80"],
])
def test_client_arguments_are_bounded(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        echo_main(argv)
    assert e.value.code == 2


# --- rig config helpers ----------------------------------------------------------------------

RIG = Rig(RigSpec(prefix="lbxunit", backends=8))


def test_rig_names_match_lbxdp_names() -> None:
    assert RIG.endpoint("be2") == "10.111.0.12:8080"
    assert RIG.endpoint("be2", 6) == "[fd00:111::12]:8080"
    assert RIG.role_of("[fd00:111::12]:8080") == RIG.role_of("10.111.0.12:8080") == "be2"
    assert RIG.vip_name(4, "udp") == "10.112.0.10:8080/udp"
    assert RIG.vip_name(6, "tcp") == "[fd00:112::10]:8080/tcp"
    with pytest.raises(KeyError):
        RIG.role_of("10.111.0.99:8080")


def test_rig_vip_toml_parses_to_the_vip_it_describes() -> None:
    text = RIG.vip_toml(4, "tcp", ["be1", "be2", "be3"], weights={"be1": 2}, backup=("be3",)) \
        + RIG.vip_toml(6, "udp", ["be4"], scheduler="rr")
    v4, v6 = config.parse(text).vips
    assert v4.name == RIG.vip_name(4, "tcp") and v4.scheduler is model.Scheduler.MAGLEV
    assert [(b.name, b.weight, b.backup) for b in v4.backends] == [
        ("10.111.0.11:8080", 2, False), ("10.111.0.12:8080", 1, False), ("10.111.0.13:8080", 1, True)]
    assert v6.name == RIG.vip_name(6, "udp") and v6.scheduler is model.Scheduler.RR
    assert [b.name for b in v6.backends] == ["[fd00:111::14]:8080"]
