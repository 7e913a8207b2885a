"""The control plane's view of the NAT conntrack (lbxdp.conntrack, issue 12) over the real
program's lbx_nat: connections opened by real SYNs through BPF_PROG_TEST_RUN, then
summarize() (entries by direction and state, SNAT ports in use), Gc (removes exactly the
entries past their state's timeout, in bounded chunks) and the handshake-timeout count of
passive health. Set up through the real control plane (Balancer.apply)."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from lbxdp import abi, conntrack, model
from lbxdp.maps import HandshakeTable, nat_now

from .frames import BASE, CLIENT_MAC, LB_MAC, TCP_, XDP_TX, ip
from .harness import Lb

pytestmark = pytest.mark.root

SNAT4 = "10.31.255.1"
POOL = (41000, 41099)
BE_S, BE_D = model.Backend(ip("10.31.2.1"), 8080, mac="02:be:31:00:00:01"), \
    model.Backend(ip("10.31.1.1"), 8080, mac="02:be:31:00:00:02")
SVIP = model.Vip(ip("10.31.0.2"), 80, TCP_, model.Mode.NAT, model.Scheduler.RR, (BE_S,), snat=True)
DVIP = model.Vip(ip("10.31.0.1"), 80, TCP_, model.Mode.NAT, model.Scheduler.RR, (BE_D,))
OPTS = model.BalancerOptions(snat_v4=ip(SNAT4), snat_ports=POOL,  # type: ignore[arg-type]
                             nat_timeouts=model.NatTimeouts(tcp_syn=10, tcp_established=600, tcp_close=1, udp=30))
CFG = model.Config(vips=BASE.vips + (SVIP, DVIP), balancer=OPTS)


def clear_nat(lb: Lb) -> None:
    for m in lb.maps.nat_tables():
        if isinstance(m, HandshakeTable):   # lbx_nat_new: every slot's check word zeroed, torn ones too
            m.clear()
            continue
        for k in list(m.keys()):
            m.delete(k)


@pytest.fixture
def nlb(lb: Lb):
    assert not model.Config(vips=(SVIP, DVIP), balancer=OPTS).problems()
    lb.apply(CFG)
    clear_nat(lb)
    yield lb
    clear_nat(lb)


class Borrowed:
    """The session's maps lent to a Gc, which closes what it opened at the end of a pass."""

    def __init__(self, maps):
        self.m = maps.m

    def close(self) -> None:
        pass


def syn(vip: model.Vip, sport: int, flags: str = "S") -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="192.0.2.10", dst=str(vip.address)) /
                 TCP(sport=sport, dport=80, flags=flags, seq=1000))


def open_conns(lb: Lb, vip: model.Vip, ports: range) -> None:
    for p in ports:
        assert lb.run(syn(vip, p)).retval == XDP_TX


def establish(lb: Lb, vip: model.Vip, sport: int) -> None:
    """The backend's SYN-ACK and the client's ACK of the handshake open_conns began from sport."""
    [e] = [e for e in lb.maps.nat_entries() if e.dir is abi.NatDir.FWD and (e.sport, e.dst) == (sport, vip.address)]
    synack = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(e.new_dst), dst=str(e.new_src)) / \
        TCP(sport=e.new_dport, dport=e.new_sport, flags="SA", seq=5000, ack=1001)
    assert lb.run(bytes(synack)).retval == XDP_TX
    assert lb.run(syn(vip, sport, "A")).retval == XDP_TX


def test_summary_counts_entries_by_direction_and_state_and_snat_ports_in_use(nlb: Lb):
    open_conns(nlb, SVIP, range(30000, 30020))
    open_conns(nlb, DVIP, range(31000, 31005))
    st = conntrack.summarize(nlb.maps)
    assert st is not None
    # handshakes (SYNs only): lbx_nat_new's, counted apart from the conntrack's entries
    assert st.entries == {} and st.handshakes == 50 and st.handshake_capacity == abi.NAT_NEW_CAPACITY
    assert st.expired == 0 and st.capacity == abi.NAT_CAPACITY
    assert st.pool == POOL and st.pool_size == 100 and st.sources == (SNAT4,)
    # only the SNAT connections hold pool ports (the DNAT replies' key is the client's address)
    assert st.ports == (conntrack.PortUse(SNAT4, "tcp", 20),)
    doc = st.to_json()
    assert doc["snat_pool"]["in_use"] == [{"address": SNAT4, "protocol": "tcp", "ports": 20}]
    assert "SNAT pool: ports 41000-41099 (100 per address and protocol)" in "\n".join(st.text())
    for p in range(31000, 31005):   # the DNAT handshakes complete: their entries move to the conntrack
        establish(nlb, DVIP, p)
    st = conntrack.summarize(nlb.maps)
    assert st.entries == {("forward", "established"): 5, ("reply", "established"): 5} and st.handshakes == 40
    assert st.ports == (conntrack.PortUse(SNAT4, "tcp", 20),)


def test_nat_ls_lists_each_connection_once_with_its_snat_address(nlb: Lb):
    open_conns(nlb, SVIP, range(30000, 30003))
    conns = conntrack.connections(nlb.maps)
    assert sorted(c.client for c in conns) == [f"192.0.2.10:{p}" for p in range(30000, 30003)]
    assert {c.vip for c in conns} == {"10.31.0.2:80"} and {c.backend for c in conns} == {"10.31.2.1:8080"}
    assert all(c.snat and c.snat.startswith(SNAT4 + ":") and POOL[0] <= int(c.snat.split(":")[1]) <= POOL[1]
               for c in conns)
    assert {c.state for c in conns} == {"syn_sent"}


def test_gc_removes_exactly_the_expired_entries_in_bounded_chunks(nlb: Lb):
    open_conns(nlb, SVIP, range(30000, 30040))
    for p in range(30000, 30010):        # the client resets 10 of them: closing, 1 s timeout
        nlb.run(syn(SVIP, p, "R"))
    assert sum(e.dir is abi.NatDir.FWD and e.state == abi.NatState.CLOSING for e in nlb.maps.nat_entries()) == 10
    deadline = time.monotonic() + 5
    while conntrack.summarize(nlb.maps).expired < 20:
        assert time.monotonic() < deadline, "closing entries never expired"
        time.sleep(0.1)
    time.sleep(0.3)                      # and past the GC's grace (conntrack.GC_GRACE, ~250 ms)
    gc = conntrack.Gc(chunk=16)          # 80 entries: 5 ticks of 16 or more (16 slots a tick in lbx_nat_new), then the end
    removed, ticks = 0, 0
    while True:
        r = gc.tick(lambda: Borrowed(nlb.maps))
        ticks += 1
        assert r.scanned <= 16
        removed += sum(r.removed.values())
        if r.pass_done:
            break
    assert removed == 20 and ticks >= 5
    st = conntrack.summarize(nlb.maps)
    assert st.expired == 0 and st.entries == {} and st.handshakes == 60   # 30 handshakes left, in lbx_nat_new
    assert st.ports == (conntrack.PortUse(SNAT4, "tcp", 30),)   # the closed ones' ports are free


def test_gc_counts_each_handshake_past_the_passive_timeout_once(nlb: Lb):
    open_conns(nlb, DVIP, range(31000, 31004))
    be = nlb.backend_id(DVIP, BE_D)
    gc = conntrack.Gc()
    gc.syn_timeout = {be: 0}             # every SYN_SENT forward entry is already late
    time.sleep(0.01)
    counted = 0
    for _ in range(2):                   # two passes: counted in the first only
        while True:
            r = gc.tick(lambda: Borrowed(nlb.maps), now=nat_now() + 2)
            counted += r.syn_timeouts.get(be, 0)
            if r.pass_done:
                break
    assert counted == 4
