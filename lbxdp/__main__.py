"""`python -m lbxdp ...` is the `lbxdp` command (the demo and the tests call it this way)."""

from .cli import main

main()
