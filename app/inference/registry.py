"""Loaded models: a small LRU cache of servables, one factory per (use, model kind).

A servable is what a route needs (``app/inference/protocols.py``): a classifier's ``predict``, a
causal LM's generator, an encoder's ``embed``. A request holds a ``Lease`` on its servable while
it runs: eviction takes a servable out of the cache at once, but releases it only when its last
lease is closed, so a running request never loses its model. LoRA adapters of one base share that
base in memory: it is loaded once, wrapped by peft, and each adapter is added to it by name (a few
MB each), counted by the servables that use it, and deleted when none does.

Locks: the cache's ``_lock`` guards its dictionaries only and is never held while loading,
releasing or waiting. A base's ``SharedBase`` lock comes after its attach lock, never before.

torch and transformers are imported lazily, on the first load, so the control plane (which never
serves) never loads them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

from app.core.errors import InvalidRequest, NotFound
from app.inference.protocols import USES, Embedder, Predictor, TextGenerator, Use
from app.services.models import LoadableModel, require_safe_weights

log = logging.getLogger(__name__)

Build = Callable[["ModelCache", LoadableModel], Any]
Key = tuple[str, str, str]  # (use, model id, model directory)
S = TypeVar("S")


@dataclass(frozen=True)
class Factory:
    build: Build
    # A servable built over another use's servable of the same model (it leases that one and
    # reads no weights itself).
    wraps: Use | None = None


FACTORIES: dict[tuple[Use, str], Factory] = {}


def factory(use: Use, *kinds: str, wraps: Use | None = None) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        for kind in kinds:
            FACTORIES[(use, kind)] = Factory(build, wraps)
        return build

    return register


@dataclass(eq=False)
class _Entry:
    key: Key
    servable: Any
    users: int = 0
    cached: bool = False  # in the LRU order, counted against the capacity
    findable: bool = True  # a lookup may hand it out (False once its model is forgotten)
    on_released: list[Callable[[], None]] = field(default_factory=list)


@dataclass(eq=False)
class _Load:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    on_released: list[Callable[[], None]] = field(default_factory=list)


class Lease(Generic[S]):
    """One user's hold on a servable; closing it (once) lets the cache release the servable."""

    def __init__(self, cache: ModelCache, entry: _Entry):
        self._cache, self._entry, self._open = cache, entry, True
        self.servable: S = entry.servable

    def close(self) -> None:
        if self._open:
            self._open = False
            self._cache._close(self._entry)

    def __enter__(self) -> S:
        return self.servable

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(eq=False)
class SharedBase:
    """A base model wrapped by peft, shared by the servables of its LoRA adapters."""

    model: Any
    # One decode step or adapter change at a time (the engine holds it per step, not per
    # generation, so an adapter change waits at most one step).
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Adapter name -> the servables using it; an adapter is deleted when its count reaches 0.
    adapters: Counter[str] = field(default_factory=Counter)
    # The decode engine every adapter of this base generates in (app/inference/engine.py).
    engine: Any = field(init=False)

    def __post_init__(self) -> None:
        from app.inference.engine import DecodeEngine

        self.engine = DecodeEngine(self.model, self.lock, adapters=True)

    def close(self) -> None:
        """The base leaves memory: its engine thread stops."""
        self.engine.close()


class ModelCache:
    """Keeps up to ``capacity`` servables, least recently used out first, and loads at most
    ``capacity`` models at once (each load holds a whole model in memory)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}  # every servable a lookup may hand out
        self._lru: OrderedDict[Key, _Entry] = OrderedDict()  # the cached ones, oldest first
        self._loading: dict[Key, _Load] = {}  # one load per key; others wait for it
        self._forgotten: set[str] = set()  # deleted models: never loaded again
        self._loads = threading.BoundedSemaphore(capacity)
        self._bases: dict[str, SharedBase] = {}
        self._attach_locks: dict[str, threading.Lock] = {}

    @overload
    def lease(self, model: LoadableModel, use: Literal["predict"]) -> Lease[Predictor]: ...
    @overload
    def lease(self, model: LoadableModel, use: Literal["generate"]) -> Lease[TextGenerator]: ...
    @overload
    def lease(self, model: LoadableModel, use: Literal["embed"]) -> Lease[Embedder]: ...
    @overload
    def lease(self, model: LoadableModel, use: Use) -> Lease[Any]: ...

    def lease(self, model: LoadableModel, use: Use) -> Lease[Any]:
        """``model`` loaded for ``use``, held until the lease is closed (``with`` closes it)."""
        spec = _factory(model, use)
        key: Key = (use, model.id, str(model.path))
        while True:
            found = self._find(model, key)
            if isinstance(found, Lease):
                return found
            load, mine = found
            if mine:
                return self._load(spec, model, key, load)
            load.done.wait()  # holding nothing: another request is loading this model
            if load.error is not None:
                raise load.error
            # Loaded: look it up again (it may even have been evicted and released since).

    def _find(self, model: LoadableModel, key: Key) -> Lease[Any] | tuple[_Load, bool]:
        """A lease on the live servable of ``key``; else its load in progress, and whether this
        caller has just claimed it (and must load)."""
        with self._lock:
            if _matches(model.id, self._forgotten):
                raise _deleted(model.id)
            entry = self._entries.get(key)
            if entry is None:
                load = self._loading.get(key)
                if load is not None:
                    return load, False
                load = self._loading[key] = _Load()
                return load, True
            entry.users += 1
            evicted = self._remember(entry)
        self._release(evicted)
        return Lease(self, entry)

    def forget(self, model_id: str, then: Callable[[], None] | None = None) -> None:
        """Drop every servable of ``model_id`` and its checkpoints (a deleted model): each is
        released when its last request ends, and ``then`` runs when all of them are."""
        with self._lock:
            self._forgotten.add(model_id)
            doomed = [e for e in self._entries.values() if _matches(e.key[1], {model_id})]
            loads = [load for k, load in self._loading.items() if _matches(k[1], {model_id})]
            for entry in doomed:
                del self._entries[entry.key]
                entry.findable = False
                if entry.cached:
                    del self._lru[entry.key]
                    entry.cached = False
            idle = [entry for entry in doomed if entry.users == 0]
            if then is not None:
                countdown = _Countdown(len(doomed) + len(loads), then)
                for entry in doomed:
                    entry.on_released.append(countdown.step)
                for load in loads:
                    load.on_released.append(countdown.step)
        self._release(idle)
        if then is not None and not doomed and not loads:
            _run(then)

    def __len__(self) -> int:
        return len(self._lru)

    # -- loading and releasing -------------------------------------------------------------------

    def _load(self, spec: Factory, model: LoadableModel, key: Key, load: _Load) -> Lease[Any]:
        try:
            servable = self._build(spec, model)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
                load.error = exc
            load.done.set()
            for callback in load.on_released:  # a forget() waiting for this load
                _run(callback)
            raise
        entry = _Entry(key, servable, users=1, on_released=load.on_released)
        with self._lock:
            del self._loading[key]
            evicted = []
            if _matches(model.id, self._forgotten):  # deleted while it loaded: this use only
                entry.findable = False
            else:
                self._entries[key] = entry
                evicted = self._remember(entry)
        load.done.set()
        self._release(evicted)
        return Lease(self, entry)

    def _build(self, spec: Factory, model: LoadableModel) -> Any:
        if spec.wraps is not None:  # its inner servable loads (and checks) the weights
            return spec.build(self, model)
        with self._loads:
            # The one weights check, before anything in the directories is read.
            require_safe_weights(model.path)
            if model.base_path is not None:
                require_safe_weights(model.base_path, "Its base model")
            log.info("loading %s from %s", model.id, model.path)
            return spec.build(self, model)

    def _remember(self, entry: _Entry) -> list[_Entry]:
        """Under the lock: mark ``entry`` most recently used, caching it if it is not; returns
        the idle servables this pushed out, to release once the lock is let go."""
        if entry.cached:
            self._lru.move_to_end(entry.key)
            return []
        entry.cached = True
        self._lru[entry.key] = entry
        evicted = []
        while len(self._lru) > self.capacity:
            # The least recently used idle servable; if every one is in use, the least recently
            # used of all (it leaves the cache now and is released by its last user).
            victim = next((e for e in self._lru.values() if e.users == 0), None)
            if victim is None:
                victim = next(e for e in self._lru.values() if e is not entry)
            del self._lru[victim.key]
            victim.cached = False
            if victim.users == 0:
                del self._entries[victim.key]
                victim.findable = False
                evicted.append(victim)
            log.info("evicted %s (%s)", victim.key[1], victim.key[0])
        return evicted

    def _close(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users or entry.cached:
                return
            if entry.findable:  # out of the cache, and its last user is done
                del self._entries[entry.key]
                entry.findable = False
        self._release([entry])

    def _release(self, entries: list[_Entry]) -> None:
        for entry in entries:
            release = getattr(entry.servable, "release", None)
            if release is not None:
                _run(release)
            for callback in entry.on_released:
                _run(callback)

    # -- shared LoRA bases -----------------------------------------------------------------------

    def attach_adapter(self, base_path: Path, adapter_path: Path, name: str) -> SharedBase:
        """The shared peft model of ``base_path`` with adapter ``name`` loaded in it, counted
        once more; the base is loaded once however many adapters of it load at once."""
        from peft import PeftModel

        from app.inference.generation import load_causal_lm

        with self._attach_lock(base_path):
            shared = self._bases.get(str(base_path))
            if shared is None:
                base = load_causal_lm(base_path)
                peft_model = PeftModel.from_pretrained(base, adapter_path, adapter_name=name)
                shared = self._bases[str(base_path)] = SharedBase(peft_model.eval())
            elif not shared.adapters[name]:
                with shared.engine.paused():  # between decode steps, never during one
                    shared.model.load_adapter(adapter_path, adapter_name=name)
            shared.adapters[name] += 1
        return shared

    def detach_adapter(self, base_path: Path, name: str) -> None:
        """One servable of adapter ``name`` is gone; the last one deletes the adapter, and the
        base's last adapter takes the base with it."""
        with self._attach_lock(base_path):
            shared = self._bases.get(str(base_path))
            if shared is None or not shared.adapters[name]:
                log.warning("adapter %s detached from %s more often than attached", name, base_path)
                return
            shared.adapters[name] -= 1
            if shared.adapters[name]:
                return
            del shared.adapters[name]
            if shared.adapters:
                with shared.engine.paused():
                    shared.model.delete_adapter(name)
                return
            del self._bases[str(base_path)]
        shared.close()  # outside the attach lock: it waits for the engine thread to end

    def _attach_lock(self, base_path: Path) -> threading.Lock:
        with self._lock:
            return self._attach_locks.setdefault(str(base_path), threading.Lock())


@dataclass(eq=False)
class _Countdown:
    remaining: int
    then: Callable[[], None]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self) -> None:
        with self.lock:
            self.remaining -= 1
            done = self.remaining == 0
        if done:
            self.then()


def _factory(model: LoadableModel, use: Use) -> Factory:
    spec = FACTORIES.get((use, model.task))
    if spec is None:
        served = sorted({kind for (u, kind) in FACTORIES if u == use})
        raise InvalidRequest(
            f"Model '{model.id}' is a {model.task} model; {USES[use]} serves "
            f"{', '.join(served)} models.",
            param="model",
            code="wrong_model_kind",
        )
    return spec


def _matches(model_id: str, forgotten: set[str]) -> bool:
    """Whether ``model_id`` is one of ``forgotten`` or a checkpoint of one."""
    return model_id in forgotten or model_id.partition(":ckpt-step-")[0] in forgotten


def _deleted(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' has been deleted.", param="model", code="model_not_found"
    )


def _run(callback: Callable[[], None]) -> None:
    """Run a release step; its failure is logged, never raised into the request that ran it."""
    try:
        callback()
    except Exception:
        log.exception("releasing a model failed")


# Register the built-in servables (they import torch only when a model is loaded).
from app.inference import servables as _servables  # noqa: E402,F401
