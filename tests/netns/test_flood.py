"""Issue 11: a flood of spoofed new flows must not break established connections.

The rig's l2 shape (conftest's module rig: cli, lb, be1..be3 on one bridge, DSR). The balancer
is attached in-process in lb's namespace (control.attach with a BuildConfig, generic mode) with
a deliberately small connection table (FLOW_CAPACITY), so that the rate one Python process
reaches here churns it many times over. Two VIPs: v4 round robin, v6 Maglev in a slow start
(be3 joins after the attach, and the test applies a slow-start step every second meanwhile, as
`lbxdp run` does, so that VIP's table keeps changing). HELD long-lived connections on each,
opened during the slow start
(lbxdp.lab.echo hold: a numbered line echoed every 0.5 s) are opened, then tests/netns/flood.py
in the client namespace writes spoofed segments from random sources to both VIPs through an
AF_PACKET socket for FLOOD_SECONDS: SYNs, bare ACKs, or each SYN twice. Meanwhile a new
connection to each VIP is made every half second and must be served.

Protected (the default build): zero held connections broken, every new connection served, and
the state says why (SYNs went to the half-open table; bare ACKs past the threshold were not
recorded). Unprotected (-DLBX_NO_HANDSHAKE_GATE: every first packet recorded): the same flood
breaks held connections, which proves the test can fail. Each test prints its figures (the
rate reached, what broke, the program's flood state); the file takes under two minutes here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lbxdp import control, loader, model
from lbxdp.lab import namespaces as nsx
from lbxdp.lab import processes
from lbxdp.lab.rig import CLI, HOST_IF, LB, Rig
from lbxdp.paths import Instance

# The connection table. The kernel's LRU is scan-resistant: a looked-up entry moves to its active
# list, which it only demotes from while the inactive list is the smaller one. So a flood of
# never-seen-again tuples evicts held flows only where those fill over half the table. Measured
# without the gate at ~200k spoofed SYNs/s: 1,000 held flows in 4,096 entries all survived, in
# 2,048 only 5 broke; with the gate, 1,024 entries were too few for the held flows themselves
# (each CPU keeps up to 128 free nodes aside). 1,536: without the gate the flood breaks hundreds.
FLOW_CAPACITY = 1536
HELD = 500                  # long-lived connections per VIP: 1,000 in all, as the issue asks
FLOOD_SECONDS = 20.0
FLOOD_MAX_PACKETS = 4_000_000
# Bare ACKs of unknown flows recorded per second per CPU: well below what FLOW_CAPACITY absorbs
# between two echoes of a held connection (README: choosing flood_threshold).
THRESHOLD = 200
SLOW_START = 60.0           # be3's weight then changes (and so the table) at every step
CLOCK = 2 * SLOW_START      # the slow-start steps' clock runs this far ahead (see run_flood)
FLOOD = Path(__file__).with_name("flood.py")


def held_summary(res: dict) -> tuple[list[dict], str]:
    conns = res["conns"]
    bad = [c for c in conns if not c["open"] or c["errors"] or c["sent"] != c["received"] or c["sent"] == 0]
    return bad, f"{len(conns) - len(bad)}/{len(conns)} intact, {res['sweeps']} sweeps, max gap {res['max_gap']}s"


def run_flood(rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
              defines: tuple[str, ...] = ()) -> dict:
    """Attach, hold, flood, probe; returns what happened (the caller asserts)."""
    ns = rig.ns(LB)
    pins = Path("/sys/fs/bpf") / f"lbxdp-test-{rig.spec.prefix}-{kind}"
    monkeypatch.setenv("LBXDP_PIN_ROOT", str(pins))
    monkeypatch.setenv("LBXDP_RUN_ROOT", str(tmp_path / "run"))
    inst = Instance(HOST_IF)
    opts = model.BalancerOptions(flood_threshold=THRESHOLD)
    rr = rig.vip(4, "tcp", scheduler="rr")
    maglev = rig.vip(6, "tcp", ["be1", "be2"], scheduler="maglev")
    flood_proc = None
    out: dict = {"new_ok": 0, "new_failed": [], "steps": 0}
    stop = threading.Event()

    def slow_start_steps() -> None:
        # What `lbxdp run` does each second; the steps' clock is CLOCK ahead, so be1 and be2
        # (joined at the attach) have finished their ramp and only be3 (joined below) ramps.
        while not stop.wait(1.0):
            try:
                with nsx.in_netns(ns):
                    control.apply(inst, now=time.time() + CLOCK)
            except Exception as e:  # noqa: BLE001 - reported by the test
                out["step_error"] = repr(e)
                return
            out["steps"] += 1
    stepper = threading.Thread(target=slow_start_steps, name="slow-start", daemon=True)
    try:
        with nsx.in_netns(ns):
            control.attach(inst, model.Config(vips=(rr, maglev), balancer=opts), model.XdpMode.GENERIC,
                           build=loader.BuildConfig(inst.pin_dir, flow_capacity=FLOW_CAPACITY, defines=defines))
            # be3 joins the Maglev VIP: a slow start, its table changes at every step from now
            # on, before the held connections open (see the README: a settled VIP's handshake
            # is recorded by the client's ACK only under the flood threshold).
            ramp = dataclasses.replace(rig.vip(6, "tcp", scheduler="maglev"), slow_start=SLOW_START)
            control.apply(inst, model.Config(vips=(rr, ramp), balancer=opts), now=time.time() + CLOCK)
        stepper.start()

        def unsettled() -> bool:
            with control.open_maps(inst) as m:
                return next(meta.changed_at for k, meta in m.vips().items() if k.address == rig.spec.vip6) != 0
        nsx.poll("the Maglev VIP's table to change", unsettled, timeout=10, interval=0.2)
        with rig.hold(rig.spec.vip4, conns=HELD, interval=0.5, duration=90, try_timeout=3.0) as h4, \
                rig.hold(rig.spec.vip6, conns=HELD, interval=0.5, duration=90, try_timeout=3.0) as h6:
            for h in (h4, h6):
                ready = h.wait_ready(timeout=60)
                assert ready["open"] == HELD, ready
            argv = [sys.executable, str(FLOOD), "eth0", rig.mac(LB), rig.mac(CLI), str(rig.spec.vip4),
                    str(rig.spec.vip6), str(rig.spec.port), "--kind", kind, "--seconds", str(FLOOD_SECONDS),
                    "--max-packets", str(FLOOD_MAX_PACKETS)]
            flood_proc = subprocess.Popen([*nsx.ns_cmd(rig.ns(CLI)), *argv], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=processes.python_env(),
                                          preexec_fn=processes.set_pdeathsig)
            with control.open_maps(inst) as m:
                seen = sum(p for p, _ in m.reasons().values())
            deadline = time.monotonic() + FLOOD_SECONDS + 60   # the pool is built first
            while flood_proc.poll() is None and time.monotonic() < deadline:
                for vip in (rig.spec.vip4, rig.spec.vip6):
                    try:
                        rig.tcp_hello(vip, timeout=3.0)
                        out["new_ok"] += 1
                    except (OSError, EOFError) as e:
                        out["new_failed"].append(f"{vip}: {e!r} at {time.time():.3f}")
                time.sleep(0.5)
            with control.open_maps(inst) as m:
                out["flows"], out["half_open"], out["flood"] = m.flow_count(), m.half_open_entries(), m.flood()
                out["program_saw"] = sum(p for p, _ in m.reasons().values()) - seen
            if flood_proc.poll() is None:
                flood_proc.kill()
                pytest.fail("the flood did not end within its time bound")
            stdout, stderr = flood_proc.communicate(timeout=10)
            assert flood_proc.returncode == 0, stderr
            out["flood_stats"] = json.loads(stdout)
            out["held"] = [h4.stop(), h6.stop()]
    finally:
        stop.set()
        if stepper.is_alive():
            stepper.join(30)
        if flood_proc is not None and flood_proc.poll() is None:
            flood_proc.kill()
            flood_proc.wait(10)
        with nsx.in_netns(ns):
            control.detach(inst)
        shutil.rmtree(pins, ignore_errors=True)
    return out


def report(kind: str, out: dict, protected: bool) -> str:
    st = out["flood_stats"]
    parts = [f"{kind} flood ({'gate' if protected else 'no gate'}): {st['sent']} spoofed segments in "
             f"{st['seconds']}s = {st['pps']}/s ({st['sent'] / FLOW_CAPACITY:.0f}x the {FLOW_CAPACITY}-entry table; "
             f"{st['refused']} refused by the device; the program saw {out['program_saw']} packets meanwhile)"]
    for vip, res in zip(("rr v4", "maglev v6 (slow start)"), out["held"]):
        parts.append(f"{vip}: {held_summary(res)[1]}")
    parts.append(f"new connections {out['new_ok']} served, {len(out['new_failed'])} failed; "
                 f"{out['steps']} slow-start steps; at the end {out['flows']} flows, {out['half_open']} half-open, "
                 f"{out['flood']}")
    return "; ".join(parts)


@pytest.mark.parametrize("kind", ["syn", "ack", "syn2"])
def test_a_spoofed_flood_breaks_no_established_connection(rig: Rig, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    out = run_flood(rig, tmp_path, monkeypatch, kind)
    figures = report(kind, out, True)
    print(f"\n[flood] {figures}")
    assert "step_error" not in out and out["steps"] >= out["flood_stats"]["seconds"] - 2, figures
    for res in out["held"]:
        bad, _ = held_summary(res)
        assert not bad, f"{len(bad)} held connections broke: {bad[:3]}; {figures}"
        assert res["stopped_by"] == "stop-file", figures
    assert not out["new_failed"], f"new connections failed during the flood: {out['new_failed'][:5]}; {figures}"
    assert out["new_ok"] >= 2 * 10, figures
    assert out["flood_stats"]["sent"] >= 10 * FLOW_CAPACITY, f"the flood did not churn the table: {figures}"
    if kind == "ack":
        assert out["flood"].skipped > 0, f"no bare ACK was refused a record: {figures}"
    else:
        # every first SYN of a tuple on the round-robin VIP (half the flood) is written; with "syn2"
        # its copy follows the entry it wrote (unless a spoofed SYN took the slot meanwhile)
        share = 8 if kind == "syn2" else 4
        assert out["flood"].half_open_written > out["flood_stats"]["sent"] // share, figures


def test_without_the_gate_the_same_flood_breaks_connections(rig: Rig, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_flood(rig, tmp_path, monkeypatch, "syn", defines=("LBX_NO_HANDSHAKE_GATE",))
    figures = report("syn", out, False)
    print(f"\n[flood] {figures}")
    broken = sum(len(held_summary(res)[0]) for res in out["held"])
    assert broken > 0, f"the flood broke nothing without the gate: the test cannot fail; {figures}"
