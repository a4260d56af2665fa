"""Dynamic batching: concurrent requests on one model share its forward passes.

A batched servable (a classifier, a tabular model, an encoder) owns one ``Batcher`` per
precision it serves. A request validates and prepares its inputs in its own inference thread,
then submits them as items (rows) and gets a ``concurrent.futures.Future`` of its results, in its
own order; the route awaits that future on the event loop, holding an inference slot but no
thread (app/inference/router.py).

Each batcher has one batch thread, started by the first submit and stopped by ``close()`` (the
servable's ``release()``, once the cache has let it go and its last request is done). ``close()``
never joins the thread: the thread itself may be closing it, as its last request's lease ends.

The thread takes up to ``max_batch_size`` rows from the head of the queue, whatever requests
they come from. The wait for more rows is adaptive: a batch starts at once when the model was
idle, and waits up to ``max_batch_delay_ms`` for more rows only under observed load (rows
queued while the last batch ran, or a last batch of several requests that has just ended). A
batch is sorted by length and cut into sub-batches where padding would waste much of the work;
each sub-batch is one call of ``run``. A sub-batch that fails is run again one row at a time,
so one bad row fails only its own request. A request cancelled before its first row ran (its
client went away) is dropped from the queue.

Lock: ``_cond`` guards the queue and the thread's state only. It is never held while a batch runs
or a future's callbacks run (they take the model cache's lock, and wake the event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Histogram

from app.core.settings import Quantization, Settings
from app.inference.protocols import Use

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - an item (one row of a request)
R = TypeVar("R")  # one row's result
T = TypeVar("T")  # a request's answer

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LABELS = ["use", "kind", "precision"]
BATCH_ROWS = Histogram(
    "tunehouse_inference_batch_rows", "Rows in one batch", LABELS, buckets=ROW_BUCKETS
)
BATCH_REQUESTS = Histogram(
    "tunehouse_inference_batch_requests", "Requests with rows in one batch", LABELS,
    buckets=ROW_BUCKETS,
)  # fmt: skip
QUEUE_WAIT = Histogram(
    "tunehouse_inference_queue_wait_seconds",
    "Seconds from a request's submit to the start of the batch that runs its first row",
    LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SECONDS = Histogram(
    "tunehouse_inference_batch_seconds", "Seconds one batch's forward passes take", LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
ROWS = Counter("tunehouse_inference_rows", "Rows run in batches", LABELS)

# A sub-batch takes the next (longer) row while its padded size stays within this factor of
# its real tokens, plus a fixed allowance: a forward pass's own cost, in padded tokens.
PADDING_FACTOR = 1.5
CALL_COST_TOKENS = 64


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_delay_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchPolicy:
        return cls(settings.max_batch_size, settings.max_batch_delay_ms / 1000)


class BatcherClosed(RuntimeError):
    """The servable was released; the caller leases it again (never seen by a leaseholder)."""


@dataclass(eq=False)
class _Request(Generic[R, T]):
    future: Future[T]
    results: list[R | None]
    finish: Callable[[list[R]], T]
    submitted: float
    remaining: int
    started: bool = False
    failed: bool = False


@dataclass(eq=False)
class _Item(Generic[I, R]):
    request: _Request[R, Any]
    index: int
    payload: I
    length: int


@dataclass(eq=False)
class Batcher(Generic[I, R]):
    """Runs ``run(payloads) -> results`` (one result per payload, in order) on batches of rows
    from concurrent requests, in its own thread."""

    run: Callable[[list[I]], list[R]]
    policy: BatchPolicy
    labels: dict[str, str]
    length: Callable[[I], int] = field(default=lambda _: 1)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _queue: deque[_Item[I, R]] = field(default_factory=deque, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    _shared: bool = field(default=False, init=False)  # the last batch held several requests

    def submit(self, payloads: Sequence[I], finish: Callable[[list[R]], T]) -> Future[T]:
        """A future of ``finish(results)``, ``results`` in the order of ``payloads`` (which
        must be valid: a row that fails on its own fails its request)."""
        future: Future[T] = Future()
        request: _Request[R, T] = _Request(
            future, [None] * len(payloads), finish, time.monotonic(), len(payloads)
        )
        if not payloads:
            self._finish(request)
            return future
        items = [_Item(request, i, p, self.length(p)) for i, p in enumerate(payloads)]
        with self._cond:
            if self._closed:
                raise BatcherClosed("this model has been released")
            self._queue.extend(items)
            if self._thread is None:
                name = "tunehouse-batch-{use}-{kind}-{precision}".format(**self.labels)
                self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop the batch thread once its current batch ends (without waiting for it)."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in left:  # none while leases are honoured: every queued request holds one
            self._fail(item.request, BatcherClosed("this model has been released"))

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- the batch thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        after_batch = False  # the first rows found the model idle
        while (batch := self._collect(after_batch)) is not None:
            after_batch = True
            try:
                self._run_batch(batch)
            except Exception:  # never lose the thread: every request must get an answer
                log.exception("a batch failed")
                for item in batch:
                    self._fail(item.request, RuntimeError("the batch failed"))

    def _collect(self, after_batch: bool) -> list[_Item[I, R]] | None:
        """The next batch, waiting for its first row (and, under load, for more rows)."""
        limit, delay = self.policy.max_batch_size, self.policy.max_delay_seconds
        with self._cond:
            backlog = after_batch and bool(self._queue)  # rows came while the last batch ran
            idle_since = time.monotonic()
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # Under load (a backlog, or a last batch of several requests that ended just
            # now), wait a little for more rows; an idle model runs the first row at once.
            recent = time.monotonic() - idle_since <= delay
            if delay > 0 and (backlog or (self._shared and recent)):
                deadline = time.monotonic() + delay
                while len(self._queue) < limit and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch: list[_Item[I, R]] = []
            while self._queue and len(batch) < limit:
                item = self._queue.popleft()
                if self._admit(item.request):
                    batch.append(item)
            self._shared = len({id(item.request) for item in batch}) > 1
            return batch

    @staticmethod
    def _admit(request: _Request[R, Any]) -> bool:
        """Whether a row of ``request`` still runs: not once it failed or was cancelled."""
        if request.failed:
            return False
        if not request.started:
            if not request.future.set_running_or_notify_cancel():
                request.failed = True  # cancelled: its client went away
                return False
            request.started = True
        return True

    def _run_batch(self, batch: list[_Item[I, R]]) -> None:
        if not batch:
            return
        started = time.monotonic()
        requests = {id(item.request): item.request for item in batch}
        for request in requests.values():
            if request.remaining == len(request.results):  # its first rows
                QUEUE_WAIT.labels(**self.labels).observe(started - request.submitted)
        for group in _groups(sorted(batch, key=lambda item: item.length)):
            self._run_group(group)
        BATCH_SECONDS.labels(**self.labels).observe(time.monotonic() - started)
        BATCH_ROWS.labels(**self.labels).observe(len(batch))
        BATCH_REQUESTS.labels(**self.labels).observe(len(requests))
        ROWS.labels(**self.labels).inc(len(batch))

    def _run_group(self, group: list[_Item[I, R]]) -> None:
        try:
            results = self.run([item.payload for item in group])
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0].request, exc)
                return
            for item in group:  # find the rows that fail on their own
                self._run_group([item])
            return
        for item, result in zip(group, results, strict=True):
            request = item.request
            if request.failed:
                continue
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                self._finish(request)

    @staticmethod
    def _finish(request: _Request[R, T]) -> None:
        try:
            answer = request.finish(request.results)  # type: ignore[arg-type]
        except Exception as exc:
            request.future.set_exception(exc)
        else:
            request.future.set_result(answer)

    @staticmethod
    def _fail(request: _Request[R, Any], exc: BaseException) -> None:
        if request.failed:
            return
        request.failed = True
        if not request.future.done():
            request.future.set_exception(exc)


class Batchers:
    """A servable's batcher of each precision, each made (with its batch thread) on first use;
    ``close()`` stops them all. Its lock guards the dictionary and is held while a precision's
    model is made (an int8 copy: other precisions are served meanwhile, from the fast path)."""

    def __init__(
        self,
        kind: str,
        use: Use,
        run: Callable[[Quantization, list[Any]], list[Any]],
        prepare: Callable[[Quantization], None] = lambda _: None,
        length: Callable[[Any], int] = lambda _: 1,
    ):
        self._kind, self._use, self._run = kind, use, run
        self._prepare, self._length = prepare, length
        self._lock = threading.Lock()
        self._made: dict[Quantization, Batcher[Any, Any]] = {}
        self._closed = False

    def get(self, quantization: Quantization, policy: BatchPolicy) -> Batcher[Any, Any]:
        batcher = self._made.get(quantization)
        if batcher is not None:
            return batcher
        with self._lock:
            if self._closed:
                raise BatcherClosed("this model has been released")
            if quantization not in self._made:
                self._prepare(quantization)
                labels = {"use": self._use, "kind": self._kind, "precision": quantization}
                run = partial(self._run, quantization)
                self._made[quantization] = Batcher(run, policy, labels, self._length)
            return self._made[quantization]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            made = list(self._made.values())
        for batcher in made:
            batcher.close()


def _groups(rows: list[_Item[I, R]]) -> list[list[_Item[I, R]]]:
    """Rows sorted by length, cut where adding a longer row would pad the sub-batch to more
    than ``PADDING_FACTOR`` times its real tokens (plus the cost of a call)."""
    groups: list[list[_Item[I, R]]] = []
    current: list[_Item[I, R]] = []
    tokens = 0
    for row in rows:
        padded = (len(current) + 1) * row.length
        if current and padded > PADDING_FACTOR * (tokens + row.length) + CALL_COST_TOKENS:
            groups.append(current)
            current, tokens = [], 0
        current.append(row)
        tokens += row.length
    if current:
        groups.append(current)
    return groups
