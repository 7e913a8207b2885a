"""The balancer program leaves room under the verifier's bound. The verifier walks a program once
per distinct state that reaches each instruction and refuses it past 1,000,000 instructions walked
(E2BIG: `lbxdp attach` fails). Other kernels' verifiers prune differently, and every feature adds
states, so the program keeps a fifth of the bound free on this one (docs/design.md "Verifier
budget"; scripts/verifier_budget.py prints the figure). The NAT pipeline apart from forward()
brought it from 874,690 to 492,876; the handshake table as an array took it to 730,455
(720,403 since: the assuring packet's slot found once, a second lbx_nat read for a concurrent move;
719,263 with a SYN that deletes a closed counted flow's record; 737,875 with the handshake table's
bucket chosen by the client side of a key, which the lookups' direction decides; 750,865 with a
NAT VIP's address classified before the connection table)."""

from __future__ import annotations

from .harness import Lb

BOUND = 1_000_000   # BPF_COMPLEXITY_LIMIT_INSNS
HEADROOM = 0.2


def test_the_program_leaves_a_fifth_of_the_verifiers_bound(compiled_lb: Lb) -> None:
    walked = compiled_lb.prog.info.verified_insns
    assert walked > 0, "the kernel reports no verified_insns (Linux < 5.16?)"
    assert walked <= BOUND * (1 - HEADROOM), \
        f"the verifier walked {walked:,} instructions of its {BOUND:,}: see docs/design.md 'Verifier budget'"


def test_lbxdp_traces_build_leaves_a_fifth_of_the_bound_too() -> None:
    """`lbxdp trace` swaps in the program compiled with -DLBX_TRACE (an event at every stage):
    more states than the plain build, so it would reach the bound first."""
    from lbxdp import trace

    from .conftest import compiled
    with compiled(defines=(trace.DEFINE,)) as prog:
        walked = prog.info.verified_insns
    assert walked <= BOUND * (1 - HEADROOM), \
        f"the trace build: the verifier walked {walked:,} instructions of its {BOUND:,}"
