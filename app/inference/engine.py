"""Continuous batching of text generation: one decode engine per loaded causal LM, shared by the
base model and every LoRA adapter loaded on it.

A request submits its sequences (one per choice) at once; the sequences of one prompt form a
group, prefilled once (``n`` > 1 shares the prompt's prefill: its cache is copied into a row per
choice). One engine thread runs *steps*: a step drops the rows that were stopped (a stop sequence
seen by the caller, a cancelled request), prefills the groups that arrived since the last step
(each alone, a batch of one, so a prompt's first token is what it would be alone), then runs one
decode forward pass over every row, which gives each row its next token. A row leaves the batch
when it is finished (end of sequence, ``max_new`` tokens) or stopped; new rows join between steps.

The batch's KV cache is one transformers ``DynamicCache`` whose layers hold ``(rows, heads,
length, head_dim)`` tensors, left-padded to the longest row: an attention mask marks the padding,
and each row's position ids count its own tokens only, so a row's attention sees exactly what it
would see alone. The cache is rebuilt only when rows join (padding) or leave (selection, and the
columns of padding nobody needs any more are trimmed).

LoRA adapters of one base decode in one batch: each row names its adapter and peft's
``adapter_names`` forward argument applies each row's adapter (``"__base__"`` for the base).

Locks: ``lock`` (the ``SharedBase`` lock for a LoRA base) is held for one step at a time, never
for a whole generation; loading or deleting an adapter goes through ``paused()``, which keeps the
next step from starting and so waits at most for the running one. ``_wake`` guards the pending
groups, the pause count and the closed flag only and is never held during a step, nor while
taking ``lock``. The rows and
the cache belong to the engine thread alone. Callers read their tokens from a ``Submission``'s
queue, holding nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.inference.generation_metrics import (
    ACTIVE,
    BATCH_SIZE,
    FIRST_TOKEN_SECONDS,
    PREFILLS,
    STEP_SECONDS,
    TOKENS,
)
from app.inference.sampling import GenerationParams

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
# Prompts prefilled in one step at most, so a crowd of new requests delays the tokens of the
# running ones by a few prefills at a time, not by all of theirs.
PREFILLS_PER_STEP = 8


# What a submission's queue carries: (index, a token), or (index, None) when that sequence has
# left the engine, or (index, an exception) when it failed.
Event = tuple[int, "int | BaseException | None"]


class EngineClosed(RuntimeError):
    """The model was released while a sequence still waited on it."""


@dataclass(frozen=True)
class Run:
    """One sequence to generate: its prompt, parameters and token budget (at least 1)."""

    prompt: list[int]
    params: GenerationParams
    max_new: int


@dataclass(eq=False)
class _Sequence:
    index: int
    params: GenerationParams
    max_new: int
    adapter: str
    eos: int | None
    events: queue.Queue[Event]
    stops: tuple[threading.Event, ...]
    rng: torch.Generator | None
    submitted: float = field(default_factory=time.perf_counter)
    produced: int = 0
    last: int = 0  # the newest token, the input of the next decode step
    length: int = 0  # tokens in this row's cache (its padding aside)
    ended: bool = False

    def stopped(self) -> bool:
        return any(event.is_set() for event in self.stops)

    def emit(self, token: int) -> bool:
        """Hand ``token`` to the caller; whether this sequence is now finished."""
        self.produced += 1
        self.last = token
        if self.produced == 1:
            FIRST_TOKEN_SECONDS.observe(time.perf_counter() - self.submitted)
        TOKENS.inc()
        self.events.put((self.index, token))
        return token == self.eos or self.produced >= self.max_new or self.stopped()

    def end(self, outcome: BaseException | None = None) -> None:
        if not self.ended:
            self.ended = True
            ACTIVE.dec()
            self.events.put((self.index, outcome))


@dataclass(eq=False)
class _Group:
    """Sequences of one prompt (and one adapter): prefilled once."""

    prompt: list[int]
    sequences: list[_Sequence]


class Submission:
    """A caller's hold on the sequences it submitted: their events, and a stop for each."""

    def __init__(self, count: int):
        self.events: queue.Queue[Event] = queue.Queue()
        self.stops = [threading.Event() for _ in range(count)]
        self._open = set(range(count))

    def next(self) -> Event:
        """The next event of any of the sequences (blocks until there is one)."""
        index, item = self.events.get()
        if not isinstance(item, int):
            self._open.discard(index)
        return index, item

    def close(self) -> None:
        """Stop every sequence and wait until each has left the engine (nothing of this
        submission runs after this returns: its adapter may then be deleted)."""
        for stop in self.stops:
            stop.set()
        while self._open:
            self.next()


class DecodeEngine:
    """Decodes the sequences of every request on ``model`` together (see the module's doc)."""

    def __init__(self, model: Any, lock: threading.Lock, *, adapters: bool = False):
        self.model, self.lock, self.adapters = model, lock, adapters
        self._wake = threading.Condition()
        self._pending: list[_Group] = []
        self._closed = False
        self._pauses = 0  # callers waiting to change the model between steps
        self._thread: threading.Thread | None = None
        # The batch: the engine thread's alone.
        self._rows: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache length): 1 = a token, 0 = padding
        # Counters for tests and logs (engine thread writes, anyone reads).
        self.submitted = 0  # sequences
        self.prefills = 0
        self.steps = 0
        self.largest_batch = 0

    # -- callers ---------------------------------------------------------------------------------

    def submit(
        self,
        runs: list[Run],
        *,
        adapter: str | None = None,
        eos: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Submission:
        """Queue ``runs`` to join the batch at the next step; runs with the same prompt share
        one prefill. Events name each run by its index in ``runs``."""
        submission = Submission(len(runs))
        groups: dict[tuple[int, ...], _Group] = {}
        for index, run in enumerate(runs):
            stops = (submission.stops[index],) if cancel is None else (
                submission.stops[index], cancel
            )  # fmt: skip
            sequence = _Sequence(
                index, run.params, run.max_new, adapter or BASE_ADAPTER, eos,
                submission.events, stops, _rng(run.params),
            )  # fmt: skip
            group = groups.setdefault(tuple(run.prompt), _Group(run.prompt, []))
            group.sequences.append(sequence)
        with self._wake:
            if self._closed:
                raise EngineClosed("the model has been unloaded")
            ACTIVE.inc(len(runs))
            self.submitted += len(runs)
            self._pending += groups.values()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="tunehouse-decode", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return submission

    def close(self) -> None:
        """Stop the engine thread (the model is being released); sequences still in it end
        with ``EngineClosed``."""
        with self._wake:
            self._closed = True
            thread = self._thread
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine between two steps (the running one ends first, no new one starts)
        and its model's lock: for loading or deleting an adapter. ``lock`` alone would not do:
        the engine thread takes it again at once after each step."""
        with self._wake:
            self._pauses += 1
        try:
            with self.lock:
                yield
        finally:
            with self._wake:
                self._pauses -= 1
                self._wake.notify()

    @property
    def pausing(self) -> int:
        """How many callers wait in ``paused()``."""
        return self._pauses

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        joining: list[_Group] = []
        try:
            while True:
                with self._wake:
                    while not self._closed and (self._pauses or not (self._pending or self._rows)):
                        self._wake.wait()
                    if self._closed:
                        break
                    joining = self._pending[:PREFILLS_PER_STEP]
                    del self._pending[:PREFILLS_PER_STEP]
                try:
                    self._step(joining)
                except Exception as exc:
                    log.exception("a decode step failed")
                    for sequence in [*self._rows, *_members(joining)]:
                        sequence.end(exc)
                    self._reset()
                joining = []
        finally:
            with self._wake:
                self._closed = True
                left, self._pending = self._pending, []
            for sequence in [*self._rows, *_members(joining), *_members(left)]:
                sequence.end(EngineClosed("the model has been unloaded"))
            self._reset()

    def _step(self, joining: list[_Group]) -> None:
        started = time.perf_counter()
        with self.lock, torch.inference_mode():
            self._leave([row for row in self._rows if row.stopped()])
            for group in joining:
                self._join(group)
            if self._rows:
                self._decode()
        self.steps += 1
        STEP_SECONDS.observe(time.perf_counter() - started)

    def _forward(self, adapters: list[str], **inputs: Any) -> torch.Tensor:
        if self.adapters:
            inputs["adapter_names"] = adapters
        out = self.model(use_cache=True, return_dict=True, **inputs)
        return out.logits[:, -1, :]

    def _join(self, group: _Group) -> None:
        """Prefill ``group``'s prompt once, give each of its sequences its first token, and add
        the unfinished ones to the batch."""
        live = []
        for sequence in group.sequences:
            if sequence.stopped():
                sequence.end()
            else:
                live.append(sequence)
        if not live:
            return
        ids = torch.tensor([group.prompt], dtype=torch.long)
        cache = DynamicCache()
        logits = self._forward(
            [live[0].adapter],
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            logits_to_keep=1,
        )
        self.prefills += 1
        PREFILLS.inc()
        staying = []
        for sequence in live:
            sequence.length = len(group.prompt)
            if sequence.emit(_choose(logits[0], sequence)):
                sequence.end()
            else:
                staying.append(sequence)
        if staying:
            self._merge(cache, len(group.prompt), len(staying))
            self._rows += staying

    def _decode(self) -> None:
        rows, cache, mask = self._rows, self._cache, self._mask
        assert cache is not None and mask is not None
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(
            [row.adapter for row in rows],
            input_ids=torch.tensor([[row.last] for row in rows], dtype=torch.long),
            attention_mask=mask,
            position_ids=torch.tensor([[row.length] for row in rows], dtype=torch.long),
            cache=cache,
        )
        self._mask = mask
        BATCH_SIZE.observe(len(rows))
        self.largest_batch = max(self.largest_batch, len(rows))
        finished = []
        for index, row in enumerate(rows):
            row.length += 1
            if row.emit(_choose(logits[index], row)):
                finished.append(row)
        self._leave(finished)

    # -- the batch's cache -----------------------------------------------------------------------

    def _merge(self, cache: DynamicCache, length: int, copies: int) -> None:
        """Add ``copies`` rows holding the one-row ``cache`` to the batch, left-padding the
        shorter side to the longer."""
        if self._cache is None or self._mask is None:
            for layer in _layers(cache):
                keys, values = _states(layer)
                layer.keys, layer.values = (
                    keys.repeat(copies, 1, 1, 1),
                    values.repeat(copies, 1, 1, 1),
                )
            self._cache = cache
            self._mask = torch.ones(copies, length, dtype=torch.long)
            return
        width = max(self._mask.shape[1], length)
        for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
            (old_keys, old_values), (new_keys, new_values) = _states(old), _states(new)
            old.keys = torch.cat(
                [_pad(old_keys, width), _pad(new_keys, width).expand(copies, -1, -1, -1)]
            )
            old.values = torch.cat(
                [_pad(old_values, width), _pad(new_values, width).expand(copies, -1, -1, -1)]
            )
        added = F.pad(torch.ones(copies, length, dtype=torch.long), (width - length, 0))
        self._mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)), added])

    def _leave(self, leaving: list[_Sequence]) -> None:
        """End ``leaving``'s sequences and take their rows out of the batch."""
        if not leaving:
            return
        for sequence in leaving:
            sequence.end()
        keep = [index for index, row in enumerate(self._rows) if not row.ended]
        if not keep:
            self._reset()
            return
        assert self._cache is not None and self._mask is not None
        self._rows = [self._rows[index] for index in keep]
        selected = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[selected]
        # Columns that are padding in every row left are no longer needed.
        first = int(mask.argmax(dim=1).min())
        for layer in _layers(self._cache):
            keys, values = _states(layer)
            layer.keys = keys[selected, :, first:, :]
            layer.values = values[selected, :, first:, :]
        self._mask = mask[:, first:]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask = [], None, None


def _members(groups: list[_Group]) -> list[_Sequence]:
    return [sequence for group in groups for sequence in group.sequences]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """``cache``'s layers, each a plain ``DynamicLayer`` (rows, heads, length, head_dim)."""
    layers = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or type(layer) is not DynamicLayer:
            raise TypeError(f"batched generation needs DynamicLayer caches, not {type(layer)}")
        layers.append(layer)
    return layers


def _states(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    if keys is None or values is None:
        raise RuntimeError("an empty cache layer after a forward pass")
    return keys, values


def _pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """``states`` (rows, heads, length, dim) left-padded with zeros to ``width`` positions."""
    return F.pad(states, (0, 0, width - states.shape[2], 0))


def _rng(params: GenerationParams) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    rng = torch.Generator()
    if params.seed is None:
        rng.seed()
    else:
        rng.manual_seed(params.seed)
    return rng


def _choose(logits: torch.Tensor, sequence: _Sequence) -> int:
    """The next token from one row's logits: the most likely (temperature 0) or sampled with
    the sequence's temperature, nucleus (top_p) and own random generator."""
    params = sequence.params
    if params.temperature <= 0 or sequence.rng is None:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_p < 1:
        ordered, order = torch.sort(scores)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=sequence.rng))
