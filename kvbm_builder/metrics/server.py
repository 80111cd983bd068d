"""``MetricsServer``: prometheus_client's own WSGI app and threading server, on one address, until ``close()``.

What :func:`prometheus_client.start_http_server` does, with three differences: 127.0.0.1 by default (upstream
binds 0.0.0.0), a bind failure is a :class:`~kvbm_builder.errors.MetricsServerError` naming the variable, and it
can be shut down. It always answers in the Prometheus text format 0.0.4, whatever the scraper's ``Accept`` header
asks for: the one format in which upstream's counter names (no ``_total``) and the conventional ``*_total`` names
can be served side by side (see :mod:`kvbm_builder.metrics`).
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from ..config.env import DEFAULT_METRICS_PORT, DYN_KVBM_METRICS_PORT
from ..errors import MetricsError, MetricsServerError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["MetricsServer"]

_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _text_format_only(app: _WsgiApp) -> _WsgiApp:
    def text_format_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ.pop("HTTP_ACCEPT", None)  # prometheus_client then picks the text format 0.0.4
        return app(environ, start_response)

    return text_format_app


class MetricsServer:
    """``http://host:port/metrics`` serving ``registry`` from a daemon thread; ``port=0`` takes one the OS picks.

    ``port`` is the bound port, ``url`` the address to scrape. :meth:`close` stops serving and frees the port
    (idempotent); a context manager closes it too.
    """

    def __init__(self, registry: Collector, *, port: int = DEFAULT_METRICS_PORT, host: str = "127.0.0.1") -> None:
        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise MetricsError(f"port must be 0..65535 ({DYN_KVBM_METRICS_PORT}, default 6880), got {port!r}")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except (socket.gaierror, UnicodeError) as err:
            raise MetricsServerError(
                f"cannot serve /metrics on {host!r}: not an address of this machine ({err}); "
                "leave host at 127.0.0.1, or pass an address of one of this machine's interfaces",
                host=host,
                port=port,
            ) from err

        class Server(ThreadingWSGIServer):
            address_family = family

        app = _text_format_only(make_wsgi_app(registry))
        try:
            # TCPServer closes its socket when bind or listen fails: nothing is left open on any error
            self._httpd = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise MetricsServerError(
                    f"cannot serve /metrics on {host}:{port}: the port is already in use. Set {DYN_KVBM_METRICS_PORT} "
                    "(KvbmSettings.metrics_port) to a free port, or stop what listens there",
                    host=host,
                    port=port,
                ) from err
            raise MetricsServerError(
                f"cannot serve /metrics on {host}:{port}: {err.strerror or err}. Choose another address or port "
                f"({DYN_KVBM_METRICS_PORT} sets the port)",
                host=host,
                port=port,
            ) from err
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="kvbm-metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop serving and release the port; a scrape in progress finishes on its own thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsServer({self.url}{', closed' if self._closed else ''})"
