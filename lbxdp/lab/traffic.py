"""Client drivers: what a test or the demo sends through a rig, and what came back.

    ping        one ICMP echo from this process (raw socket in a host's namespace)
    tcp_hello   one TCP connection from this process: the echo server's greeting (a backend name)
    client      `python -m lbxdp.lab.echo client` in a host's namespace: many TCP connections or
                UDP datagrams, counted by the backend that answered (tcp_names, udp_names, udp_flows)
    hold        `python -m lbxdp.lab.echo hold`: long-lived TCP connections (HeldConns)

Traffic is a mixin of lbxdp.lab.rig.Rig: it uses the rig's ns(role), spec.port and run_dir.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

from . import namespaces as nsx
from . import processes
from .shapes import CLI, RigError

FAILED = "!failed"        # key under which tcp_names/udp_names count failed attempts


def inet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum (ICMPv4 here; IP/TCP/UDP headers in the benchmark)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(ns: str, dst, timeout: float = 2.0) -> bool:
    """One ICMP echo from namespace `ns` to address `dst`; True if answered in time.

    Raw sockets from this process (root), because Debian's minimal image has no ping.
    """
    dst = ipaddress.ip_address(dst)
    v6 = dst.version == 6
    ident, seq = os.getpid() & 0xFFFF, secrets.randbelow(0xFFFF)
    if v6:  # the kernel fills in ICMPv6 checksums on raw sockets itself
        family, proto, req, rep = socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129
    else:
        family, proto, req, rep = socket.AF_INET, socket.IPPROTO_ICMP, 8, 0
    msg = struct.pack("!BBHHH", req, 0, 0, ident, seq) + b"lbxdp-rig"
    if not v6:
        msg = msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]
    deadline = time.monotonic() + timeout
    with nsx.ns_socket(ns, family, socket.SOCK_RAW, proto) as s:
        s.sendto(msg, (str(dst), 0))
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, peer = s.recvfrom(2048)
            except socket.timeout:
                break
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets include the IP header
            if len(data) < 8 or ipaddress.ip_address(peer[0].split("%")[0]) != dst:
                continue
            rtype, _code, _csum, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if (rtype, rid, rseq) == (rep, ident, seq):
                return True
    return False


def tcp_hello(ns: str, host, port: int, timeout: float = 1.0) -> str:
    """One TCP connection to host:port from namespace `ns`: the first line the server sends."""
    host = ipaddress.ip_address(host)
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    deadline = time.monotonic() + timeout
    with nsx.ns_socket(ns, family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((str(host), port))
        buf = b""
        while b"\n" not in buf and len(buf) < 256:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(256)
            if not chunk:
                raise EOFError(f"EOF before the greeting (got {buf!r})")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def _names(result: dict) -> Counter[str]:
    names = Counter(result["names"])
    if result["failed"]:
        names[FAILED] = result["failed"]
    return names


class Traffic:
    """Client drivers as methods of a rig (mixin; see the module docstring)."""

    def ping(self, src: str, dst, timeout: float = 2.0) -> bool:
        """One ICMP echo from `src`'s namespace to address `dst`; True if answered in time."""
        return ping(self.ns(src), dst, timeout)

    def tcp_hello(self, host, port: int | None = None, *, src: str = CLI, timeout: float = 1.0) -> str:
        """One TCP connection to host:port made by this process from `src`'s namespace: the name
        in the echo server's greeting. Raises OSError (refused, reset, timed out) or EOFError.

        Cheap enough (no process per attempt) for a test that times every connection, e.g. to see
        when new connections stop reaching a failed backend. Thread-safe."""
        return tcp_hello(self.ns(src), host, port or self.spec.port, timeout)

    def client(self, proto: str, host, port: int | None = None, count: int = 10,
               timeout: float = 30.0, *, src: str = CLI, try_timeout: float = 1.0,
               same_flow: bool = False, payload: str | None = None,
               payload_size: int | None = None, sport_base: int | None = None) -> dict:
        """Run `python -m lbxdp.lab.echo client` in `src`'s namespace; return its JSON summary
        ({"names": {...}, "failed": n, "attempts": n, "errors": [...], "elapsed": s}).
        At most `count` attempts within `timeout` seconds. TCP with payload/payload_size: each
        connection also sends that many bytes and checks they are echoed back whole. UDP with
        sport_base: attempt i sends from port sport_base + i, and the summary has "flows"."""
        argv = processes.echo_argv("client", proto, str(host), str(port or self.spec.port),
                                   "--count", str(count), "--timeout", str(timeout),
                                   "--try-timeout", str(try_timeout))
        argv += ["--same-flow"] if same_flow else []
        argv += ["--payload", payload] if payload is not None else []
        argv += ["--payload-size", str(payload_size)] if payload_size is not None else []
        argv += ["--sport-base", str(sport_base)] if sport_base is not None else []
        cmd = [*nsx.ns_cmd(self.ns(src)), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15,
                              env=processes.python_env())
        if proc.returncode != 0:
            raise nsx.CommandFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    def tcp_names(self, host, port: int | None = None, count: int = 10, timeout: float = 30.0,
                  **kw) -> Counter[str]:
        """Backend names that answered `count` sequential TCP connections to host:port from
        the client; failed attempts are counted under FAILED. Attempts not made because
        `timeout` ran out are not counted (the total is then below `count`)."""
        return _names(self.client("tcp", host, port, count, timeout, **kw))

    def udp_names(self, host, port: int | None = None, count: int = 10, timeout: float = 30.0,
                  same_flow: bool = False, **kw) -> Counter[str]:
        """Like tcp_names, one datagram per attempt, each from a fresh socket (a new source port,
        so a new flow) unless same_flow."""
        return _names(self.client("udp", host, port, count, timeout, same_flow=same_flow, **kw))

    def udp_flows(self, host, count: int, sport_base: int, port: int | None = None,
                  timeout: float = 60.0, **kw) -> dict[int, str | None]:
        """Which backend answered each of `count` UDP flows from source ports sport_base,
        sport_base + 1, ... (one datagram each; None if unanswered). The same arguments make the
        same 5-tuples, so a second call maps the same flows again."""
        res = self.client("udp", host, port, count, timeout, sport_base=sport_base, **kw)
        return {int(p): name for p, name in res["flows"].items()}

    def hold(self, host, port: int | None = None, conns: int = 10, *, interval: float = 0.05,
             duration: float = 60.0, try_timeout: float = 2.0, src: str = CLI) -> "HeldConns":
        """Start `python -m lbxdp.lab.echo hold tcp` in `src`'s namespace: `conns` long-lived
        connections to host:port, each exchanging a numbered line every sweep until stopped.
        Use it as a context manager (it kills the client by PID on exit if it still runs), call
        wait_ready() before relying on the connections and stop() for the JSON summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        base = self.run_dir / f"hold-{secrets.token_hex(4)}"
        files = {k: base.with_suffix(f".{k}") for k in ("stop", "ready", "out", "err")}
        argv = processes.echo_argv(
            "hold", "tcp", str(host), str(port or self.spec.port), "--conns", str(conns),
            "--interval", str(interval), "--duration", str(duration), "--try-timeout", str(try_timeout),
            "--stop-file", str(files["stop"]), "--ready-file", str(files["ready"]))
        with open(files["out"], "wb") as out, open(files["err"], "wb") as err:
            popen = subprocess.Popen([*nsx.ns_cmd(self.ns(src)), *argv], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=err, env=processes.python_env(), close_fds=True,
                                     preexec_fn=processes.set_pdeathsig)
        return HeldConns(popen, files)


class HeldConns:
    """A running `python -m lbxdp.lab.echo hold` (see Traffic.hold): its process and its files.

    The process is ours (a Popen not yet reaped, so its PID cannot name anyone else); on exit
    from the `with` block it is killed by that PID if it still runs, and its files are removed.
    """

    def __init__(self, popen: subprocess.Popen, files: dict[str, Path]) -> None:
        self.popen, self.files = popen, files
        self.stop_file, self.ready_file, self.out_file = files["stop"], files["ready"], files["out"]

    def __enter__(self) -> "HeldConns":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for f in self.files.values():
            f.unlink(missing_ok=True)

    def _failed(self, what: str) -> RigError:
        try:
            err = self.files["err"].read_text(errors="replace")
        except OSError:
            err = ""
        return RigError(f"hold client (pid {self.popen.pid}) {what}" + (f":\n{err[-2000:]}" if err else ""))

    def wait_ready(self, timeout: float = 30.0) -> dict:
        """Wait until every connection is open (or failed); returns {"open": n, "backends": {...}}."""
        def ready():
            if self.popen.poll() is not None:
                raise self._failed(f"exited with {self.popen.returncode} before it was ready")
            return json.loads(self.ready_file.read_text()) if self.ready_file.exists() else None
        return nsx.poll("the hold client to open its connections", ready, timeout=timeout, interval=0.05)

    def stop(self, timeout: float = 30.0) -> dict:
        """Ask it to stop (the stop file), wait for it, return its JSON summary."""
        self.stop_file.touch()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RigError(f"hold client (pid {self.popen.pid}) did not stop within {timeout:.0f}s") from None
        if self.popen.returncode != 0:
            raise self._failed(f"exited with {self.popen.returncode}")
        return json.loads(self.out_file.read_text())

    def kill(self) -> None:
        """SIGKILL by PID, if it still runs, and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
