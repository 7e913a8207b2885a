"""The backends' echo servers (`python -m lbxdp.lab.echo --name beN --port P`), started by the rig
in every backend namespace, one per backend, and stopped by PID and start time.

EchoServers is a mixin of lbxdp.lab.rig.Rig (it uses ns, backends, addr4/addr6, spec.port,
run_dir and the rig's persistence flag).
"""

from __future__ import annotations

import socket

from . import namespaces as nsx
from . import processes
from .processes import Server
from .shapes import RigError


class EchoServers:
    """Start, wait for and stop the backends' echo servers (mixin; see the module docstring)."""

    _servers: dict[str, Server]
    _persistent: bool

    @property
    def servers(self) -> dict[str, Server]:
        """Echo servers running now, by backend role (a copy)."""
        return dict(self._servers)

    def _log(self, role: str):
        return self.run_dir / f"{role}.log"

    def _spawn_server(self, role: str) -> None:
        argv = processes.echo_argv("--name", role, "--port", str(self.spec.port))
        self._servers[role] = processes.start(self.ns(role), argv, self._log(role), self._persistent,
                                              f"echo server for {role}")

    def start_servers(self) -> None:
        """Start the echo server in every backend and wait until each answers TCP and UDP on
        both of its own addresses (probed from inside its namespace)."""
        for role in self.backends:
            if role not in self._servers:
                self._spawn_server(role)
        for role in self.backends:
            self._wait_server(role)

    def start_server(self, role: str) -> Server:
        """Start one backend's echo server (again, e.g. after stop_server) and wait until it
        answers TCP and UDP on both its addresses; returns it (also in `servers`)."""
        if role not in self.backends:
            raise KeyError(f"{role!r} is no backend of rig {self.spec.prefix}")
        if role in self._servers:
            raise RigError(f"the echo server of {role} already runs (pid {self._servers[role].pid})")
        self._spawn_server(role)
        self._wait_server(role)
        return self._servers[role]

    def _answers(self, role: str) -> bool:
        """One probe of the server of `role`: TCP greeting and UDP echo on both its addresses."""
        srv, port = self._servers[role], self.spec.port
        if srv.popen is not None and srv.popen.poll() is not None:
            raise RigError(f"echo server for {role} exited with {srv.popen.returncode}:\n"
                           f"{processes.log_tail(self._log(role))}")
        for family, addr in ((socket.AF_INET, self.addr4(role)), (socket.AF_INET6, self.addr6(role))):
            with nsx.ns_socket(self.ns(role), family, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect((str(addr), port))
                if s.recv(64) != f"{role}\n".encode():
                    return False
            with nsx.ns_socket(self.ns(role), family, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.connect((str(addr), port))
                s.send(b"ready?")
                if s.recv(64) != f"{role} ready?".encode():
                    return False
        return True

    def _wait_server(self, role: str) -> None:
        try:
            nsx.poll(f"the echo server of {role} to answer on port {self.spec.port}", lambda: self._answers(role))
        except RigError as e:
            raise RigError(f"{e}\nserver log:\n{processes.log_tail(self._log(role))}") from None
        processes.check_is(self._servers[role], processes.ECHO_MODULE, f"the echo server of {role}")

    def stop_servers(self, timeout: float = 5.0) -> None:
        """SIGTERM each server this rig started (if its PID still has the recorded start time),
        SIGKILL after `timeout` seconds."""
        errors = []
        for role, srv in list(self._servers.items()):
            try:
                processes.terminate(srv, timeout)
                del self._servers[role]
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                errors.append(f"{role} (pid {srv.pid}): {e}")
        if errors:
            raise RigError("could not stop echo servers: " + "; ".join(errors))

    def stop_server(self, role: str, timeout: float = 5.0) -> None:
        """Stop one backend's echo server (SIGTERM, SIGKILL after `timeout`; by PID and start
        time) and wait until it has exited: its sockets are closed when this returns, so the
        backend answers TCP with RST and UDP with ICMP port unreachable. A no-op if not running."""
        srv = self._servers.get(role)
        if srv is None:
            return
        processes.terminate(srv, timeout)
        del self._servers[role]
