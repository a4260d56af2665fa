"""A worker's ``/metrics`` on a port of its own (``worker_metrics_port``; 0: none).

The worker is one process (Celery's thread pool; its training processes report through the
database, see worker/metrics.py), so prometheus_client's registry of that process is all there
is to serve: no multiprocess mode. The server is prometheus_client's WSGI app behind the same
``metrics_allow`` / ``metrics_token`` check as the API's, on a thread of its own.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from app.core.errors import error_body
from app.core.metrics_access import refusal
from app.core.settings import Settings
from worker import metrics  # noqa: F401 - the worker's metrics, shown from its start

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def guarded_metrics_app(settings: Settings, registry: CollectorRegistry = REGISTRY) -> WsgiApp:
    """prometheus_client's app, answering a refused request with an OpenAI error envelope."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        refused = refusal(settings, environ.get("REMOTE_ADDR"), environ.get("HTTP_AUTHORIZATION"))
        if refused is None:
            return exposition(environ, start_response)
        body = json.dumps(
            error_body(refused.message, type=refused.error_type, code=refused.code)
        ).encode()
        status = {401: "401 Unauthorized", 403: "403 Forbidden"}[refused.status_code]
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


def start_metrics_server(settings: Settings) -> ThreadingWSGIServer:
    """Serve the metrics on ``worker_metrics_host``:``worker_metrics_port`` until the process
    ends (a daemon thread). Raises OSError when the port cannot be bound."""
    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    # The address family of the host (an IPv6 address such as "::" needs its own).
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server: ThreadingWSGIServer = make_server(
        host, port, guarded_metrics_app(settings), server_class, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="tunehouse-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
