"""Open-connection counts of leastconn and capped VIPs (issue 13; bpf/sched.h): the daemon's recount.

The program counts +1 when it records a flow of a counted backend entry and -1 at the client's
first FIN or RST. What it cannot see drifts: connections that end by timeout or by the server's
FIN alone (DSR: replies never pass the balancer), LRU evictions, `lbxdp flows flush`. The
ConnRecountService sets every counted entry's count to what the connection table holds
(lbxdp.maps.Maps.recount_conns) every RECOUNT_SECONDS, and right after every change of what the
instance was told; it does nothing while no VIP is counted.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from . import applied
from .paths import Instance

log = logging.getLogger(__name__)

RECOUNT_SECONDS = 10.0
"""How often the counts are recounted: a full connection table (65,536 entries) takes ~50 ms to
read; a closed connection the program did not see weighs on its backend for at most this long
after its entry left the table."""


class ConnRecountService:
    """A daemon service (lbxdp.daemon.Service): the periodic recount."""

    name = "conn-recount"

    def __init__(self, inst: Instance, interval: float = RECOUNT_SECONDS,
                 open_maps: Callable[[], Any] | None = None):
        self.inst, self.interval = inst, interval
        self._open_maps = open_maps or self._pinned
        self.active = False
        self.next_at = 0.0
        self.corrections = 0   # counts changed by recounts, ever
        self.runs = 0

    def _pinned(self) -> Any:
        from . import loader
        from .maps import Maps
        return Maps(loader.open_pinned_maps(self.inst))

    def start(self, state: applied.State) -> None:
        self.on_change(state)

    def on_change(self, state: applied.State) -> None:
        self.active = any(v.counted for v in state.cfg.vips)
        self.next_at = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if not self.active or now < self.next_at:
            return
        self.next_at = now + self.interval
        self.recount()

    def recount(self) -> dict[int, tuple[int, int]]:
        maps = self._open_maps()
        try:
            changed = maps.recount_conns()
        finally:
            maps.close()
        self.runs += 1
        self.corrections += len(changed)
        if changed:
            log.info("recount: open connections corrected on %d backend entries: %s", len(changed),
                     ", ".join(f"id {bid} {a} -> {b}" for bid, (a, b) in sorted(changed.items())[:8]))
        return changed

    def stop(self) -> None:
        pass
