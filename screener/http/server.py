"""The HTTP server of a running node: uvicorn serving screener.http.app in a background thread.

`HttpServer.start(node)` binds the socket first (so a port in use is a clear error at start, and
port 0 gives a free port), starts the destinations' C-ECHO thread and then uvicorn; `stop()` asks
uvicorn to finish the requests in flight and waits for it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from screener.errors import UserError
from screener.http.app import create_app
from screener.http.auth import Authenticator
from screener.http.status import NodeView
from screener.logs import get_logger

log = get_logger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6 by the host's form); UserError if it fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc} (set [http] port, or enabled = false)"
        ) from None
    return sock


class HttpServer:
    def __init__(self, view: NodeView, app: Any, sock: socket.socket) -> None:
        import uvicorn

        self.view = view
        self.app = app
        self._sock = sock
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5, server_header=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="screener-http", daemon=True)

    @classmethod
    def start(cls, node: Any, timeout_s: float = 10.0) -> HttpServer:
        http = node.settings.http
        auth = Authenticator.from_settings(http)
        view = NodeView.of_node(node)
        sock = bind(http.host, http.port)
        server = cls(view, create_app(view, auth), sock)
        view.echoer.start()
        server._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server._server.started and server._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server._server.started:
            server.stop()
            raise UserError(f"the HTTP server on {http.host}:{http.port} did not start")
        log.info("http_started", url=server.url, actions="enabled" if auth.enabled else "read-only")
        return server

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.view.settings.http.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        self.view.echoer.stop()
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
        log.info("http_stopped")
