"""The BGP variant of the multi shape (RigSpec(shape="multi", bgp=True)): rt runs BIRD 2 as the
upstream router of K balancer nodes, each running `lbxdp run` with a [bgp] section (lbxdp.bgp).

    rt   BIRD 2, AS ROUTER_AS: one eBGP session per balancer and family (lb1..lbK's core
         addresses, AS NODE_AS), BFD on each (interval 100 ms x 3), routes imported from all of
         them, and a kernel protocol per family with `merge paths on`: the VIP's route in rt's
         kernel is ECMP over every balancer that announces it (fib_multipath_hash_policy=1 spreads
         flows by their 5-tuple; shapes._ECMP_SYSCTLS). There is no static VIP route: the client
         reaches a VIP only while some balancer announces it.

RouterBird starts rt's BIRD as a rig server (rig._servers["rt-bird"]: PID and start time
recorded, stopped by Rig.down() like the echo servers, even after a failure), with its config,
socket, pid file and log in the rig's run directory (removed by down()). node_config() is the
[bgp] every balancer gets (the same text on every node: router id and sources are BIRD's picks).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from typing import Any

from .. import bgp as lbxbgp
from .. import config, model
from . import namespaces as nsx
from . import processes
from .shapes import RT, RigError

ROUTER_AS, NODE_AS = 65000, 65001
BIRD_ROLE = "rt-bird"          # its key among the rig's servers


def router_config(rig: Any, bfd: bool = True, hold_time: int = 3, families: tuple[int, ...] = (4, 6)) -> str:
    """rt's BIRD config: a session per balancer and family, ECMP into the kernel."""
    lines = [f"# lbxdp.lab.bgp: rt of rig {rig.spec.prefix}", "log stderr all;",
             f"router id {rig.addr4(RT, 'core')};", "", "protocol device { scan time 1; }"]
    for fam in families:
        lines += ["", f"protocol kernel rt_k{fam} {{", f"\tipv{fam} {{ import none; export all; }};",
                  "\tmerge paths on;", "}"]
    if bfd:
        lines += ["", "protocol bfd rt_bfd {", "\tinterface \"*\" { interval 100 ms; multiplier 3; };", "}"]
    for lb in rig.balancers:
        for fam in families:
            addr = rig.addr4(lb, "core") if fam == 4 else rig.addr6(lb, "core")
            lines += ["", f"protocol bgp {lb}_v{fam} {{", f"\tlocal as {ROUTER_AS};",
                      f"\tneighbor {addr} as {NODE_AS};", f"\thold time {hold_time};",
                      f"\tkeepalive time {max(1, hold_time // 3)};", "\tconnect retry time 1;",
                      "\terror wait time 1, 5;", *(["\tbfd on;"] if bfd else []),
                      f"\tipv{fam} {{ import all; export none; }};", "}"]
    return "\n".join(lines) + "\n"


def node_bgp(rig: Any, families: tuple[int, ...] = (4, 6), **kw: Any) -> model.BgpOptions:
    """The [bgp] of every balancer: rt as the neighbour of each family, BFD on."""
    ns = tuple(model.BgpNeighbor(rig.addr4(RT, "core") if f == 4 else rig.addr6(RT, "core"), ROUTER_AS, True)
               for f in families)
    return model.BgpOptions(NODE_AS, ns, **kw)


def node_config(rig: Any, vips: tuple[model.Vip, ...], families: tuple[int, ...] = (4, 6), **kw: Any) -> str:
    """A balancer's config file: these VIPs and node_bgp()."""
    return config.dump(model.Config(vips=vips, bgp=node_bgp(rig, families, **kw)))


class RouterBird:
    """rt's BIRD, a server of the rig (see the module docstring). Use as a context manager or
    call start()/stop(); Rig.down() stops it too."""

    def __init__(self, rig: Any, bfd: bool = True, hold_time: int = 3, families: tuple[int, ...] = (4, 6)):
        self.rig = rig
        self.text = router_config(rig, bfd, hold_time, families)
        d = rig.run_dir
        self.conf, self.ctl, self.pid_file, self.log = (d / "rt-bird.conf", d / "rt-bird.ctl",
                                                        d / "rt-bird.pid", d / "rt-bird.log")

    def __enter__(self) -> "RouterBird":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "RouterBird":
        if BIRD_ROLE in self.rig._servers:
            raise RigError(f"rt's bird already runs (pid {self.rig._servers[BIRD_ROLE].pid})")
        self.rig.run_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.text)
        argv = ["bird", "-f", "-c", str(self.conf), "-s", str(self.ctl), "-P", str(self.pid_file)]
        srv = processes.start(self.rig.ns(RT), argv, self.log, self.rig._persistent, "rt's bird")
        self.rig._servers[BIRD_ROLE] = srv
        if self.rig._persistent:
            self.rig.save_state()     # so that `lbxdp rig down` stops it too
        try:
            nsx.poll("rt's bird to answer on its control socket", lambda: self.command("show", "status"), timeout=10)
            processes.check_is(srv, "bird", "rt's bird")
        except RigError as e:
            self.stop()
            raise RigError(f"{e}\nlog:\n{processes.log_tail(self.log)}") from None
        return self

    def stop(self) -> None:
        srv = self.rig._servers.get(BIRD_ROLE)
        if srv is not None:
            processes.terminate(srv, 5.0)
            del self.rig._servers[BIRD_ROLE]
            if self.rig._persistent:
                self.rig.save_state()

    def command(self, *args: str) -> str | None:
        """birdc's output (the socket is a file: birdc runs outside the namespace), None if down."""
        try:
            p = subprocess.run(["birdc", "-s", str(self.ctl), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout if p.returncode == 0 and "Unable to connect" not in p.stdout + p.stderr else None

    def sessions(self) -> dict[str, dict[str, str]]:
        """BGP protocols by name (lb1_v4, ...): {"state", "info", ...}."""
        return {k: v for k, v in lbxbgp.parse_protocols(self.command("show", "protocols") or "").items()
                if v["proto"] == "BGP"}

    def established(self) -> set[str]:
        return {k for k, v in self.sessions().items() if v["info"].startswith("Established")}

    def nexthops(self, addr: Any) -> set[str]:
        """The gateways of rt's kernel route to this address's /32 (/128): one per balancer that
        announces it (empty: no route)."""
        a = ipaddress.ip_address(addr)
        out = nsx.run(self.rig.ns(RT), "ip", "-j", f"-{a.version}", "route", "show", "exact",
                      lbxbgp.prefix_of(a), check=False).stdout
        try:
            routes = json.loads(out or "[]")
        except ValueError:
            return set()
        hops: set[str] = set()
        for r in routes:
            if r.get("gateway"):
                hops.add(r["gateway"])
            hops |= {h["gateway"] for h in r.get("nexthops", []) if h.get("gateway")}
        return hops

    def balancers_announcing(self, addr: Any) -> set[str]:
        """The balancer roles whose core address is a next hop of the VIP's route on rt."""
        a = ipaddress.ip_address(addr)
        by_addr = {str(self.rig.addr4(lb, "core") if a.version == 4 else self.rig.addr6(lb, "core")): lb
                   for lb in self.rig.balancers}
        return {by_addr.get(h, h) for h in self.nexthops(a)}
