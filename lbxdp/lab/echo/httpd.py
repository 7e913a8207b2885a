"""HTTP health-check target (tests/netns/test_health.py runs one per backend)::

    python -m lbxdp.lab.echo http --name be1 --port 8081 --status-file /run/x/be1.status

Answers every request (one per connection, head read up to 8 KiB within 2 s) with
``HTTP/1.1 <code>`` and the body ``<name> <code>``, then closes. The code is re-read from the
status file for each request (200 if the file is missing or holds no code), so a test turns
a backend's health check red by writing ``500`` there. It prints ``ready http <name> <port>``.
"""

from __future__ import annotations

import argparse
import http
import socket
import threading

from .common import exit_on_signals, tcp_listener


HTTP_MAX_REQUEST = 8192


def http_status(status_file: str | None) -> int:
    """The status to answer with now: the integer in status_file (re-read per request), 200 if
    there is no file or it holds no code in 100..599."""
    if not status_file:
        return 200
    try:
        with open(status_file) as f:
            code = int(f.read().strip())
    except (OSError, ValueError):
        return 200
    return code if 100 <= code <= 599 else 200


def _serve_http_conn(conn: socket.socket, name: str, status_file: str | None) -> None:
    """Read one request head (bounded in size and time), answer it, close."""
    with conn:
        try:
            conn.settimeout(2.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < HTTP_MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            code = http_status(status_file)
            try:
                phrase = http.HTTPStatus(code).phrase
            except ValueError:
                phrase = "Status"
            body = f"{name} {code}\n".encode()
            conn.sendall(f"HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:
            pass


def serve_http(name: str, port: int, status_file: str | None) -> None:
    """Answer every HTTP request on ``port`` (TCP, both families) with the status in status_file
    (see http_status) and the body ``<name> <code>``, one thread per connection, until SIGTERM/SIGINT."""
    exit_on_signals()
    srv = tcp_listener(port, 128)
    print(f"ready http {name} {port}", flush=True)
    with srv:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_serve_http_conn, args=(conn, name, status_file), daemon=True).start()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lbxdp.lab.echo http",
                                description="A minimal HTTP/1.1 responder (a health-check target): "
                                "every request gets the status code read from --status-file.")
    p.add_argument("--name", required=True, help="put in every response body, e.g. be1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--status-file", help="holds the status code to answer with (re-read per request; "
                   "default and fallback 200)")
    a = p.parse_args(argv)
    serve_http(a.name, a.port, a.status_file)
    return 0
