"""The FastAPI application. ``create_app`` builds it for one role: the control routes, the
inference routes, or both. The control plane never imports torch; an inference process imports
it in the background at start-up (its lifespan starts the model warmer, app/inference/warm.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, dashboard
from app.api import errors, guard, openapi
from app.api.routes import files, health, jobs, keys, models
from app.core.db import PoolLimits, use_pool_limits
from app.core.settings import Role, Settings, get_settings
from app.core.storage import Storage
from app.inference.adapters import router as adapters_router
from app.inference.completions import router as completions_router
from app.inference.registry import ModelCache
from app.inference.router import router as inference_router
from app.inference.warm import Warmer
from app.services.state_metrics import api_registry

# Labelled by the route's name (its handler), which stays few and stable whatever the URL holds.
REQUESTS = Counter("tunehouse_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("tunehouse_http_request_seconds", "HTTP request latency", ["method", "route"])


def create_app(settings: Settings | None = None, role: Role | None = None) -> FastAPI:
    settings = settings or get_settings()
    role = role or settings.role
    app = FastAPI(
        title="Tunehouse",
        version=__version__,
        description="Self-hosted fine-tuning and inference with OpenAI's API shapes.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.role = role
    pool = PoolLimits(
        settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout_seconds
    )
    use_pool_limits(settings.sqlalchemy_url, pool)
    storage = Storage(settings.storage_root)
    storage.ensure()
    storage.sweep_tmp()  # what dead processes' uploads left behind
    if settings.uses_filesystem_broker:
        settings.ensure_broker_dirs()
    errors.install(app)
    app.state.readiness = health.ReadinessProbe(settings)
    app.state.metrics = api_registry(settings, control=role in ("control", "all"))
    app.include_router(health.router)
    if role in ("control", "all"):
        for router in (files.router, jobs.router, models.router, keys.router):
            app.include_router(router, prefix="/v1")
        dashboard.install(app)  # the page at /, outside the OpenAPI document
    if role in ("inference", "all"):
        app.state.model_cache = cache = ModelCache(
            settings.model_cache_size,
            max_bytes=settings.model_cache_budget,
            adapters_per_base=settings.max_lora_adapters_per_base,
            pinned=settings.pinned_models,
        )
        app.state.warmer = Warmer(cache, settings)  # started by the lifespan
        app.include_router(inference_router, prefix="/v1")
        app.include_router(completions_router, prefix="/v1")
        app.include_router(adapters_router, prefix="/v1")
        if role == "inference":
            app.include_router(models.router, prefix="/v1")

    # Inside Observe (so its refusals are counted), outside the routes.
    guard.install(app, settings, uploads=[("POST", "/v1/files"), ("POST", "/v1/models")])

    # Inside the error boundary (so its answers are counted), outside the guard and the routes.
    app.add_middleware(Observe)

    # Added last, so outermost: it sees every response and every escaped exception.
    app.add_middleware(errors.ErrorBoundary)
    openapi.install(app, settings)
    logging.getLogger("tunehouse").setLevel(settings.log_level)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # An inference process warms its models in the background: start-up does not wait for it.
    warmer: Warmer | None = getattr(app.state, "warmer", None)
    if warmer is not None:
        warmer.start()
    try:
        yield
    finally:
        if warmer is not None:
            await anyio.to_thread.run_sync(warmer.stop)


class Observe:
    """Counts each HTTP request and its latency by method, route and status: a plain ASGI
    middleware (Starlette's ``BaseHTTPMiddleware`` runs every request through a task group and
    memory streams, a sizeable share of a small prediction's time)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before any response start is answered 500 outside

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "name", None) or "unmatched"
            method = scope["method"]
            LATENCY.labels(method, template).observe(time.perf_counter() - started)
            REQUESTS.labels(method, template, str(status)).inc()


app: FastAPI  # declared, not bound: the first `app.main.app` goes through __getattr__


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app from the environment on first access.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
