"""`lbxdp doctor`: can this machine run lbxdp? Every failed check prints its exact fix."""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .paths import BPFFS, Instance

# Capability bits (linux/capability.h) that loading and attaching XDP programs needs.
_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}


class Check:
    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.ok = echo, True

    def __call__(self, name: str, passed: bool, detail: str = "", fix: str = "") -> bool:
        self.echo(f"{'ok  ' if passed else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
        if not passed:
            self.ok = False
            if fix:
                self.echo(f"      fix: {fix}")
        return passed


def _cap_eff() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def run(inst: Instance | None, echo: Callable[[str], None]) -> bool:
    check = Check(echo)
    caps = _cap_eff()
    missing = [n for n, bit in _CAPS.items() if not caps >> bit & 1]
    check("privileges", not missing, "root" if not missing else f"missing {', '.join(missing)}",
          "run as root: sudo lbxdp ...")
    from .loader import _is_bpffs
    check("bpffs", _is_bpffs(BPFFS), f"{BPFFS}", f"mount -t bpf bpf {BPFFS}")
    build = Path(f"/lib/modules/{platform.release()}/build")
    check("kernel headers", (build / "include").is_dir(), str(build.resolve()) if build.exists() else "none",
          "sudo scripts/install.sh (installs Debian's linux-headers-amd64 and links it as "
          f"{build} and .../source)")
    from .errors import LbxError
    from .loader import _import_bcc
    try:
        _import_bcc()
        bcc_ok = True
    except LbxError:
        bcc_ok = False
    check("bcc imports", bcc_ok, "", "apt-get install python3-bpfcc, and use a venv made with "
          "/usr/bin/python3 -m venv --system-site-packages (scripts/install.sh)")
    try:
        from . import bpfsys
        bpfsys.lib()
        lib_ok = True
    except OSError:
        lib_ok = False
    check("libbpf", lib_ok, "libbpf.so.1", "apt-get install libbpf1")
    from . import ring
    helper = ring.accelerator()
    check("Maglev table builder", True, f"C helper {helper}" if helper else
          "pure Python (about 15x slower per table; `sudo scripts/install.sh` builds the C helper)")
    if bcc_ok and check.ok:
        _compile(check)
    if inst is not None:
        _interface(check, inst)
    return check.ok


def _compile(check: Check) -> None:
    from . import loader
    pin_dir = Path(tempfile.mkdtemp(prefix="lbxdp-doctor-", dir=BPFFS))
    try:
        t = time.monotonic()
        prog = loader.compile_program(loader.BuildConfig(pin_dir))
        prog.close()
        check("compile and verify", True, f"lbxdp_ingress loaded in {time.monotonic() - t:.1f} s")
    except Exception as e:  # report, do not crash: this is the doctor
        check("compile and verify", False, str(e).splitlines()[0],
              "check the kernel headers above; the full compiler output: lbxdp -vv doctor")
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def _interface(check: Check, inst: Instance) -> None:
    from . import bpfsys, loader
    from .errors import LbxError
    try:
        idx = loader.ifindex(inst.ifname)
    except LbxError as e:
        check(f"interface {inst.ifname}", False, e.message, e.hint or "")
        return
    state = bpfsys.xdp_query(idx)
    from . import veth
    trap = veth.native_warning(inst.ifname)
    if trap is not None:
        fine = state.mode == "generic"
        check(f"veth peer of {inst.ifname}", fine,
              trap + ("; lbxdp is attached in generic mode, which is not affected" if fine else ""), veth.FIX)
    if state.prog_id:
        check(f"XDP on {inst.ifname}", True, f"a program is attached (id {state.prog_id}, {state.mode}); "
              "native support not probed")
        return
    try:
        stub, fd = loader.compile_stub()
    except Exception as e:
        check(f"XDP on {inst.ifname}", False, str(e).splitlines()[0])
        return
    errors: dict[str, str | None] = {}
    try:
        for mode, flag in (("native", bpfsys.XDP_FLAGS_DRV_MODE), ("generic", bpfsys.XDP_FLAGS_SKB_MODE)):
            try:
                bpfsys.xdp_attach(idx, fd, flag | bpfsys.XDP_FLAGS_UPDATE_IF_NOEXIST)
                bpfsys.xdp_detach(idx, flag)
                errors[mode] = None
            except OSError as e:
                errors[mode] = e.strerror or str(e)
    finally:
        stub.cleanup()
    name = f"XDP on {inst.ifname}"
    if errors["native"] is None:
        check(name, True, "native and generic modes work (a test program attached and detached)")
    elif errors["generic"] is None:
        check(name, True, f"generic mode only (native: {errors['native']}); attach with --mode generic or auto")
    else:
        check(name, False, f"native: {errors['native']}; generic: {errors['generic']}",
              "this interface cannot run XDP programs")
