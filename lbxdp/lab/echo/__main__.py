"""`python -m lbxdp.lab.echo [client|hold|http|quic-server] ARGS...`: the program named by the first argument
(none: the echo server). Each module parses its own arguments."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    program = argv[0] if argv[:1] and argv[0] in ("client", "hold", "http", "quic-server") else None
    if program == "client":
        from . import client as mod
    elif program == "hold":
        from . import hold as mod
    elif program == "http":
        from . import httpd as mod
    elif program == "quic-server":
        from . import quic as mod  # needs aioquic (a test extra)
    else:
        from . import server as mod
    return mod.main(argv[1:] if program else argv)


if __name__ == "__main__":
    sys.exit(main())
