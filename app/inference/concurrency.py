"""Inference runs under its own concurrency limit, so the control routes stay fast while it is
saturated.

At most ``inference_concurrency`` requests of a process load or run models at once, each in a
worker thread counted by this gate's own limiter (never one of the default pool's 40 threads,
which the control routes and authentication need). The others wait for a slot on the event
loop, holding no thread: at most ``inference_queue_size`` of them, each for at most
``inference_queue_timeout_seconds``; past either bound the answer is a 503 with ``Retry-After``.
A request that holds a slot and whose client goes away has its generation cancelled. A
prediction or an embedding holds its slot, but no thread, while it waits for its batch
(app/inference/batching.py); its client going away cancels its rows not yet run.

torch's thread pools are sized once per process, before the first model is loaded, by
``configure_torch_threads`` (``inference_threads``): each forward pass uses every CPU the process
may run on, and no inter-op pool, since batching keeps the forward passes few and wide; idle
OpenMP threads sleep rather than spin.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.core.errors import ServiceUnavailable, TunehouseError
from app.core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

_torch_configured = False
_torch_lock = threading.Lock()


def configure_torch_threads(settings: Settings) -> None:
    """Size torch's thread pools for this process, once, on its first inference (importing
    torch then); later calls, whatever their settings, change nothing."""
    global _torch_configured
    if _torch_configured:
        return
    with _torch_lock:
        if _torch_configured:
            return
        # Threads that wait at the end of a parallel region sleep instead of spinning (read by
        # OpenMP when torch is first imported, so only if this is that import): they share the
        # cores with the event loop, the tokenizers and whatever else runs on the machine, and
        # spinning ones made a MiniLM forward pass 10 to 40 times slower on 2 busy cores.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        threads = settings.inference_threads or available_cpus()
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # inter-op work already ran in this process (it is set once)
            log.info("torch's inter-op threads were already set; left as they are")
        log.info("torch uses %d threads for each forward pass", threads)
        _torch_configured = True


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class InferenceBusy(ServiceUnavailable):
    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message, code="inference_busy")
        self.headers = {"Retry-After": str(retry_after)}


class ClientGone(TunehouseError):
    """The client went away before its answer was ready (nobody reads this answer)."""

    status_code = 499
    error_type = "client_closed_request"


class InferenceGate:
    def __init__(self, concurrency: int, queue_size: int, queue_timeout: float):
        self._slots = anyio.Semaphore(concurrency)
        self._threads = anyio.CapacityLimiter(concurrency)
        self._queue_size, self._queue_timeout = queue_size, queue_timeout
        self._waiting = 0
        self.retry_after = max(1, math.ceil(queue_timeout))

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceGate:
        return cls(
            settings.inference_concurrency,
            settings.inference_queue_size,
            settings.inference_queue_timeout_seconds,
        )

    async def acquire(self) -> Slot:
        """A slot, once one is free; 503 when the queue is full or the wait too long."""
        if self._slots.value == 0 and self._waiting >= self._queue_size:
            raise self._busy("all inference slots are taken and the queue is full")
        self._waiting += 1
        try:
            with anyio.fail_after(self._queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise self._busy(f"no inference slot came free in {self._queue_timeout:g} s") from None
        finally:
            self._waiting -= 1
        return Slot(self._slots)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        held = await self.acquire()
        try:
            yield
        finally:
            held.release()

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in an inference thread (the caller holds a slot). Cancelling the
        caller waits for ``work`` to return: nothing it holds is let go under it."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self._threads)

    async def run_until_disconnect(
        self, request: Request, cancel: threading.Event, work: Callable[[], T]
    ) -> T:
        """``run(work)``, setting ``cancel`` if the client goes away meanwhile."""
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_on_disconnect, request, cancel.set)
            try:
                result = await self.run(work)
            except Exception as exc:  # raised below, not as a task group's ExceptionGroup
                failure = exc
            finally:
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def wait(self, request: Request, future: Future[T]) -> T:
        """The result of ``future`` (the caller holds a slot, but no thread). If the client
        goes away first, ``future`` is cancelled: work not yet started is dropped, work that
        has started ends (its result is dropped). Cancelling the caller cancels it too."""
        gone = threading.Event()

        def hang_up() -> None:
            gone.set()
            future.cancel()

        failure: BaseException | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_on_disconnect, request, hang_up)
            try:
                result = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if not gone.is_set():  # the caller itself is cancelled
                    raise
                failure = ClientGone("The client closed the request.")
            except Exception as exc:  # raised below, not as a task group's ExceptionGroup
                failure = exc
            finally:
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    def _busy(self, why: str) -> InferenceBusy:
        return InferenceBusy(
            f"The server is busy with other inference requests ({why}); retry after "
            f"{self.retry_after} s.",
            retry_after=self.retry_after,
        )


class Slot:
    def __init__(self, slots: anyio.Semaphore):
        self._slots: anyio.Semaphore | None = slots

    def release(self) -> None:
        """Give the slot back (once, however often this is called)."""
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


def inference_gate(app: FastAPI) -> InferenceGate:
    """The app's gate, made on first use (always on the event loop, so never twice)."""
    gate: InferenceGate | None = getattr(app.state, "inference_gate", None)
    if gate is None:
        gate = app.state.inference_gate = InferenceGate.from_settings(app.state.settings)
    return gate


async def _on_disconnect(request: Request, then: Callable[[], None]) -> None:
    # The body has been read: the next message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        await anyio.sleep(0.1)
    then()


class HeldStream(StreamingResponse):
    """Server-sent events from a blocking iterator that runs in inference threads. However the
    response ends (the last event, a client that hangs up, an error), the generation is cancelled
    and closed, then ``release`` runs (in a thread) and the slot is given back."""

    def __init__(
        self,
        events: Iterator[str],
        cancel: threading.Event,
        gate: InferenceGate,
        slot: Slot,
        release: Callable[[], None],
    ):
        self._events, self._cancel, self._gate = events, cancel, gate
        self._slot, self._release, self._closed = slot, release, False
        self._relaying = self._relay()
        super().__init__(self._relaying, media_type="text/event-stream")

    async def _relay(self) -> AsyncGenerator[str, None]:
        while (event := await self._gate.run(next, self._events, None)) is not None:
            yield event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel.set()
        try:
            await self._relaying.aclose()
            await self._gate.run(self._finish)
        finally:
            self._slot.release()

    def _finish(self) -> None:
        try:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()  # a generator: its generation thread is joined
        finally:
            self._release()
