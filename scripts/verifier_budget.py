#!/usr/bin/env python3
"""How much of the kernel verifier's budget lbxdp's programs take: instructions the verifier walked
to accept each (bpf_prog_info.verified_insns) against its bound of 1,000,000 (past it the program
does not load: E2BIG), and each program's size: the balancer, the balancer as `lbxdp trace` builds
it (an event at every stage: more states), and the backends' decap program. docs/design.md
"Verifier budget" says why it is watched: the verifier walks the program once per distinct state
that reaches an instruction, so a few instructions on a path many states reach can cost tens of
thousands.

    sudo .venv/bin/python scripts/verifier_budget.py [--bpf-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_datapath as bd  # noqa: E402

from lbxdp import loader, trace  # noqa: E402

BOUND = 1_000_000   # BPF_COMPLEXITY_LIMIT_INSNS
TRACE = object()    # the balancer as `lbxdp trace` builds it (-DLBX_TRACE)


def measure(src_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """program -> (instructions the verifier walked, instructions after verification)."""
    out = {}
    for source in (loader.BALANCER, TRACE, loader.DECAP):
        pin = Path(f"/sys/fs/bpf/lbxdp-vb-{uuid.uuid4().hex[:12]}")
        try:
            if source is loader.DECAP:   # as `lbxdp decap attach` compiles it (its settings compiled in)
                prog = bd.compile_decap(pin, src_dir)
            elif source is TRACE:        # as `lbxdp trace` compiles it: an event at every stage
                prog = loader.compile_program(loader.BuildConfig(pin_dir=pin, src_dir=src_dir, defines=(trace.DEFINE,)))
            else:
                prog = loader.compile_program(loader.BuildConfig(pin_dir=pin, src_dir=src_dir), source)
            try:
                name = f"{loader.BALANCER.function} (`lbxdp trace`'s build)" if source is TRACE else source.function
                out[name] = (prog.info.verified_insns, prog.info.xlated_len // 8)
            finally:
                prog.close()
        finally:
            shutil.rmtree(pin, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bpf-dir", type=Path, default=None, help="the C sources (default: bpf/)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("loading a program needs root")
    got = measure(args.bpf_dir)
    print("| program | instructions walked | of the bound | instructions |")
    print("|---|---:|---:|---:|")
    for name, (walked, size) in got.items():
        print(f"| {name} | {walked:,} | {walked / BOUND:.0%} | {size:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
