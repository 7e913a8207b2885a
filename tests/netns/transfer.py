"""Bulk TCP transfers between the client and the backends of a rig, for the path-MTU tests:
enough bytes per connection that full-sized segments meet the smaller MTU on the way
(test_pmtu: downloads from the backends through rt's 1280-byte hop; test_routed: uploads to the
backends through a tunnel's overhead).

    with servers(rig, Direction.DOWNLOAD, size, port): ...
        SERVER in every backend namespace (dual-stack, a thread per connection), each waited for
        ("ready") before the body runs and killed by PID when it ends, also when it fails
    run(rig, Direction.DOWNLOAD, family, port, size, n, deadline) -> [{"bytes", "seconds"}, ...]
    run(rig, Direction.UPLOAD, ...)                                -> [{"reply", "seconds"}, ...]
        n transfers one after the other from cli to the rig's VIP of `family`, each bounded by
        `deadline` seconds: bytes received (a download is complete at `size`), or the server's
        reply to an upload ("ok N", N the bytes it received)
    forget_pmtu(rig, *roles)
        flush the route caches (what the sender learnt of the path MTU) of the roles that send
        the large segments, so that no run passes on what an earlier one learnt
"""

from __future__ import annotations

import contextlib
import enum
import json
import subprocess
import sys
from typing import Iterator

from lbxdp.lab.rig import CLI, Rig


class Direction(enum.Enum):
    DOWNLOAD = "download"   # the client sends "get", the backend sends `size` bytes
    UPLOAD = "upload"       # the client sends `size` bytes, the backend answers "ok N"


SERVER = r"""
import socket, sys, threading
direction, size = sys.argv[1], int(sys.argv[2])
data = b"z" * size
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[3]))); s.listen(64)
print("ready", flush=True)
def serve(c):
    try:
        if direction == "download":
            c.recv(16); c.sendall(data)
            return
        got = 0
        while got < size:
            b = c.recv(65536)
            if not b:
                break
            got += len(b)
        c.sendall(b"ok %d\n" % got)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, sys, time
direction, host, port, n, size, deadline = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                            int(sys.argv[5]), float(sys.argv[6]))
data, out = b"u" * size, []
for i in range(n):
    t0 = time.monotonic(); got = 0; reply = b""
    try:
        c = socket.create_connection((host, port), timeout=deadline)
        if direction == "download":
            c.sendall(b"get")
            while got < size and time.monotonic() - t0 < deadline:
                c.settimeout(max(0.05, deadline - (time.monotonic() - t0)))
                b = c.recv(65536)
                if not b:
                    break
                got += len(b)
        else:
            c.settimeout(deadline)
            c.sendall(data)
            while b"\n" not in reply and time.monotonic() - t0 < deadline:
                b = c.recv(64)
                if not b:
                    break
                reply += b
        c.close()
    except OSError:
        pass
    seconds = round(time.monotonic() - t0, 3)
    out.append({"bytes": got, "seconds": seconds} if direction == "download" else
               {"reply": reply.decode(errors="replace").strip(), "seconds": seconds})
print(json.dumps(out))
"""


@contextlib.contextmanager
def servers(rig: Rig, direction: Direction, size: int, port: int) -> Iterator[None]:
    """SERVER on `port` in every backend of `rig` while the block runs (see the module docstring)."""
    procs: list[subprocess.Popen] = []
    try:
        for be in rig.backends:
            p = subprocess.Popen([*rig.ns_cmd(be), sys.executable, "-c", SERVER, direction.value, str(size), str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready", f"the transfer server in {be} did not start"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def run(rig: Rig, direction: Direction, family: int, port: int, size: int, n: int, deadline: float) -> list[dict]:
    """n transfers from cli to the VIP of `family`, one after the other (see the module docstring)."""
    vip = str(rig.spec.vip4 if family == 4 else rig.spec.vip6)
    proc = rig.run(CLI, sys.executable, "-c", CLIENT, direction.value, vip, str(port), str(n), str(size),
                   str(deadline), timeout=n * deadline + 30)
    return json.loads(proc.stdout)


def forget_pmtu(rig: Rig, *roles: str) -> None:
    """Flush the IPv4 and IPv6 route caches of `roles` (the path MTUs they learnt)."""
    for role in roles:
        rig.run(role, "ip", "-4", "route", "flush", "cache")
        rig.run(role, "ip", "-6", "route", "flush", "cache")
