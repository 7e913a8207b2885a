"""Health probes through the tunnel: bpf/probe.c on the balancer interface's tc egress.

A check of an ipip/gue backend (`[vip.health] via = "tunnel"`, their default) connects to
VIP:port from a socket marked abi.PROBE_MARK | the backend entry's id (lbxdp.health, Target.mark);
lbxdp_probe encapsulates exactly those packets towards that backend, so the check passes only if
the VIP service answers through the tunnel, as clients' traffic does.

Attached by the daemon's health service when some target needs it (attach()), removed by
`lbxdp detach` and by the daemon's own detach (detach()). Failure model (docs/design.md): attach
makes the clsact qdisc only if the interface has none and removes it again when adding the
filter fails; detach deletes lbxdp's filter, then the qdisc if no filter is left on it; both
are idempotent, so an interrupted one is finished by the next.
"""

from __future__ import annotations

import errno
import logging

from . import abi, loader
from .errors import LbxError
from .paths import Instance

log = logging.getLogger(__name__)

EGRESS = 0xFFFFFFF3      # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS): clsact's egress hook
INGRESS = 0xFFFFFFF2
PRIO = 0xC1              # our filter's priority (and how we find it again)


def mark(entry_id: int) -> int:
    """SO_MARK of a probe for backend entry entry_id."""
    if not 0 < entry_id <= 0xFFFF:
        raise ValueError(f"backend entry id {entry_id} does not fit a probe mark")
    return abi.PROBE_MARK | entry_id


def _filters(ipr, idx: int, parent: int) -> list:
    try:
        return list(ipr.get_filters(index=idx, parent=parent))
    except Exception:   # noqa: BLE001 - no clsact qdisc: no filters
        return []


def _ours(f) -> bool:
    opts = f.get_attr("TCA_OPTIONS")
    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
    return f.get_attr("TCA_KIND") == "bpf" and bool(name) and name.startswith(abi.PROBE_PROGRAM)


def attached(ifname: str) -> bool:
    """lbxdp_probe is on ifname's egress (in this thread's netns)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return any(_ours(f) for f in _filters(ipr, loader.ifindex(ifname), EGRESS))


def attach(inst: Instance) -> None:
    """Compile probe.c against inst's pins and put it on inst's interface's egress (replacing
    ours if there). LbxError if it cannot be; the interface is then left as it was."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    if not all((inst.pin_dir / m).exists() for m in loader.PROBE.maps):
        # compiling would make new, empty maps there: the probes would find no backend
        raise LbxError(f"lbxdp is not attached to {inst.label}: no health probes through the tunnel",
                       f"attach it first: lbxdp attach {inst.ifname} --config FILE")
    prog = loader.compile_program(loader.BuildConfig(pin_dir=inst.pin_dir), loader.PROBE)
    try:
        with IPRoute() as ipr:
            idx = loader.ifindex(inst.ifname)
            made = False
            try:
                ipr.tc("add", "clsact", idx)
                made = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise LbxError(f"cannot add a clsact qdisc to {inst.ifname} for the health probes: {e}",
                                   "check `tc qdisc show dev " + inst.ifname + "`") from None
            try:
                for f in _filters(ipr, idx, EGRESS):
                    if _ours(f):
                        ipr.tc("del-filter", "bpf", idx, f["handle"], parent=EGRESS, prio=PRIO)
                ipr.tc("add-filter", "bpf", idx, ":1", fd=prog.fd, name=abi.PROBE_PROGRAM, parent=EGRESS,
                       classid=1, direct_action=True, prio=PRIO)
            except NetlinkError as e:
                if made:
                    ipr.tc("del", "clsact", idx)
                raise LbxError(f"cannot attach the health probe program to {inst.ifname}'s egress: {e}",
                               "run `lbxdp doctor`; set [vip.health] via = \"direct\" to probe without it") from None
    finally:
        prog.close()   # the filter holds the program


def detach(ifname: str) -> bool:
    """Remove lbxdp_probe from ifname's egress, and the clsact qdisc if nothing else is on it.
    False if it was not there. Idempotent."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        idx = loader.ifindex(ifname)
        ours = [f for f in _filters(ipr, idx, EGRESS) if _ours(f)]
        for f in ours:
            ipr.tc("del-filter", "bpf", idx, f["handle"], parent=EGRESS, prio=f["info"] >> 16)
        if ours and not _filters(ipr, idx, EGRESS) and not _filters(ipr, idx, INGRESS):
            try:
                ipr.tc("del", "clsact", idx)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
        return bool(ours)
