"""Loaded models: an LRU cache of servables under a memory budget, one factory per (use, model
kind).

A servable is what a route needs (``app/inference/protocols.py``): a classifier's ``predict``, a
causal LM's generator, an encoder's ``embed``. A request holds a ``Lease`` on its servable while
it runs: nothing in use is evicted, and a servable taken out of the cache (unloaded, deleted) is
released only when its last lease is closed, so a running request never loses its model. LoRA
adapters of one base share that base in memory: it is loaded once, wrapped by peft, and each
adapter is added to it by name (a few MB each), counted by the servables that use it, and
deleted when none does.

The limits (``ModelCache``): bytes of weights (measured, app/inference/memory.py), servables,
and adapters per base; models named as pinned never go for them. Evicted memory is given back
to the operating system (``memory.return_memory_soon``). Metrics: app/inference/cache_metrics.py.

Locks: the cache's ``_lock`` guards its dictionaries only and is never held while loading,
releasing or waiting. A base's ``SharedBase`` lock comes after its attach lock, never before.

torch and transformers are imported lazily, on the first load, so the control plane (which never
serves) never loads them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

from app.core.errors import InvalidRequest, NotFound
from app.inference import cache_metrics as metrics
from app.inference import memory
from app.inference.loading import import_runtime
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
    inner: int = 0  # users that are wrappers of the same model (a predictor over a generator)
    cached: bool = False  # in the LRU order, counted against the limits
    findable: bool = True  # a lookup may hand it out (False once its model is forgotten)
    on_released: list[Callable[[], None]] = field(default_factory=list)
    bytes: int = 0  # its weights (a LoRA adapter: the adapter's own; see app/inference/memory)
    base: str | None = None  # a LoRA adapter's shared base directory
    pinned: bool = False  # named in TUNEHOUSE_PINNED_MODELS: never evicted for a limit


@dataclass(frozen=True)
class CacheStats:
    bytes: int  # weights held by the models cached or in use
    budget: int
    servables: int
    models: int
    adapters: int  # LoRA adapters cached, on every base
    bases: int  # LoRA bases held


@dataclass(eq=False)
class _Load:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    on_released: list[Callable[[], None]] = field(default_factory=list)


class Lease(Generic[S]):
    """One user's hold on a servable; closing it (once) lets the cache release the servable."""

    def __init__(self, cache: ModelCache, entry: _Entry, inner: bool = False):
        self._cache, self._entry, self._open, self._inner = cache, entry, True, inner
        self.servable: S = entry.servable

    def close(self) -> None:
        if self._open:
            self._open = False
            self._cache._close(self._entry, self._inner)

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

    # The tokenizers of its adapters by the digest of their files: adapters trained from one
    # base carry the same tokenizer, loaded once (each would otherwise hold a copy, more than
    # the adapter's own weights for a small rank).
    tokenizers: dict[str, Any] = field(default_factory=dict)
    _tokenizers_lock: threading.Lock = field(default_factory=threading.Lock)

    def tokenizer(self, adapter_path: Path) -> Any:
        """The tokenizer saved with the adapter at ``adapter_path``, shared with the other
        adapters of this base whose tokenizer files are the same."""
        from app.inference.generation import load_tokenizer

        digest = tokenizer_digest(adapter_path)
        with self._tokenizers_lock:
            found = self.tokenizers.get(digest)
        if found is None:
            loaded = load_tokenizer(adapter_path)  # outside the lock: it reads files
            with self._tokenizers_lock:
                found = self.tokenizers.setdefault(digest, loaded)
        return found

    def close(self) -> None:
        """The base leaves memory: its engine thread stops."""
        self.engine.close()


# The files a saved tokenizer may consist of (those present are hashed, names included).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip


def tokenizer_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


class ModelCache:
    """Servables kept under a memory budget and a count cap, least recently used out first.

    ``max_bytes`` budgets the weights of every model held (cached or in use; see
    app/inference/memory.py for what is counted), ``capacity`` the servables cached, and
    ``adapters_per_base`` the LoRA adapters cached on one base. Past a limit the least recently
    used idle model goes (all its servables at once: a predictor built over a generator shares
    its weights); a model in use, a pinned one and the one just used never go for a limit.
    So a burst of requests on different models may hold more than the budget: the cache comes
    back under it as they end. A model bigger than the whole budget is served alone. At most
    ``capacity`` models load at once."""

    def __init__(
        self,
        capacity: int,
        *,
        max_bytes: int | None = None,
        adapters_per_base: int = 64,
        pinned: Iterable[str] = (),
    ):
        self.capacity = capacity
        self.max_bytes = max_bytes if max_bytes is not None else 2**62
        self.adapters_per_base = adapters_per_base
        self.pinned = frozenset(pinned)
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}  # every servable a lookup may hand out
        self._lru: OrderedDict[Key, _Entry] = OrderedDict()  # the cached ones, oldest first
        self._live: set[_Entry] = set()  # every servable not yet released
        self._loading: dict[Key, _Load] = {}  # one load per key; others wait for it
        self._forgotten: set[str] = set()  # deleted models: never loaded again
        self._loads = threading.BoundedSemaphore(capacity)
        self._bases: dict[str, SharedBase] = {}
        self._base_bytes: dict[str, int] = {}  # a LoRA base's directory -> its measured bytes
        self._attach_locks: dict[str, threading.Lock] = {}
        self._local = threading.local()  # .wrapping: this thread builds a wrapping servable
        metrics.BUDGET.set(self.max_bytes)

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
        return self._lease(model, use, counted=True)

    def _lease(self, model: LoadableModel, use: Use, counted: bool) -> Lease[Any]:
        spec = _factory(model, use)
        key: Key = (use, model.id, str(model.path))
        inner = getattr(self._local, "wrapping", 0) > 0  # a wrapper's hold, not a request's
        counted = counted and not inner
        waited = False
        while True:
            found = self._find(model, key, inner)
            if isinstance(found, Lease):
                if counted:
                    (metrics.MISSES if waited else metrics.HITS).labels(use).inc()
                return found
            load, mine = found
            waited = True
            if mine:
                lease = self._load(spec, model, key, load, inner)
                if counted:
                    metrics.MISSES.labels(use).inc()
                return lease
            load.done.wait()  # holding nothing: another request is loading this model
            if load.error is not None:
                raise load.error
            # Loaded: look it up again (it may even have been evicted and released since).

    def _find(self, model: LoadableModel, key: Key, inner: bool) -> Lease[Any] | tuple[_Load, bool]:
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
            entry.inner += inner
            evicted = self._remember(entry)
        self._release(evicted)
        return Lease(self, entry, inner)

    def lease_if_loaded(self, model: LoadableModel, use: Use) -> Lease[Any] | None:
        """A lease on ``model``'s servable for ``use`` if it is in the cache now, else None: it
        never loads, waits or releases anything, so the event loop may call it."""
        key: Key = (use, model.id, str(model.path))
        with self._lock:
            if _matches(model.id, self._forgotten):
                raise _deleted(model.id)
            entry = self._entries.get(key)
            if entry is None or not entry.cached:
                return None
            entry.users += 1
            self._lru.move_to_end(key)
        metrics.HITS.labels(use).inc()
        return Lease(self, entry)

    def warm(self, model: LoadableModel, use: Use) -> bool:
        """Load ``model`` for ``use`` now, as the most recently used, unless it is loaded already
        or the cache has no room that an idle model could give (everything held is in use or
        pinned). Whether it loaded; a failure to load is raised."""
        key: Key = (use, model.id, str(model.path))
        with self._lock:
            if key in self._entries or not self._has_room():
                return False
        with self._lease(model, use, counted=False):
            pass
        metrics.WARMED.inc()
        return True

    def unload(self, model_id: str) -> bool:
        """Take every servable of ``model_id`` out of the cache (each is released when its last
        request ends); False when none was cached. It loads again when next asked for."""
        with self._lock:
            cached = [e for e in self._lru.values() if e.key[1] == model_id]
            released: list[_Entry] = []
            for entry in cached:
                if entry.cached:  # not dropped with an earlier one of its group
                    released += self._drop_group(entry, "unload")
            self._publish()
        self._release(released)
        return bool(cached)

    def loaded(self, model_id: str) -> bool:
        """Whether a servable of ``model_id`` is in the cache."""
        with self._lock:
            return any(e.key[1] == model_id for e in self._lru.values())

    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats()

    def forget(self, model_id: str, then: Callable[[], None] | None = None) -> None:
        """Drop every servable of ``model_id`` and its checkpoints (a deleted model): each is
        released when its last request ends, and ``then`` runs when all of them are."""
        with self._lock:
            self._forgotten.add(model_id)
            doomed = [e for e in self._entries.values() if _matches(e.key[1], {model_id})]
            loads = [load for k, load in self._loading.items() if _matches(k[1], {model_id})]
            groups = {e.key[1:] for e in doomed if e.cached}
            for entry in doomed:
                del self._entries[entry.key]
                entry.findable = False
                if entry.cached:
                    del self._lru[entry.key]
                    entry.cached = False
            idle = [entry for entry in doomed if entry.users == 0]
            self._live.difference_update(idle)
            if groups:
                metrics.EVICTIONS.labels("delete").inc(len(groups))
            self._publish()
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

    def _load(
        self, spec: Factory, model: LoadableModel, key: Key, load: _Load, inner: bool
    ) -> Lease[Any]:
        started = time.perf_counter()
        try:
            servable = self._build(spec, model)
            size, base = self._measure(spec, model, servable)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
                load.error = exc
            load.done.set()
            for callback in load.on_released:  # a forget() waiting for this load
                _run(callback)
            raise
        if spec.wraps is None:  # a wrapper's time is its inner servable's load
            metrics.LOAD_SECONDS.observe(time.perf_counter() - started)
        entry = _Entry(
            key, servable, users=1, inner=int(inner), on_released=load.on_released,
            bytes=size, base=base, pinned=model.id in self.pinned,
        )  # fmt: skip
        with self._lock:
            del self._loading[key]
            self._live.add(entry)
            evicted = []
            if _matches(model.id, self._forgotten):  # deleted while it loaded: this use only
                entry.findable = False
            else:
                self._entries[key] = entry
                evicted = self._remember(entry)
        load.done.set()
        self._release(evicted)
        return Lease(self, entry, inner)

    def _build(self, spec: Factory, model: LoadableModel) -> Any:
        import_runtime()  # whole, before a factory imports from it (app/inference/loading.py)
        if spec.wraps is not None:  # its inner servable loads (and checks) the weights
            self._local.wrapping = getattr(self._local, "wrapping", 0) + 1
            try:
                return spec.build(self, model)
            finally:
                self._local.wrapping -= 1
        with self._loads:
            # The one weights check, before anything in the directories is read.
            require_safe_weights(model.path)
            if model.base_path is not None:
                require_safe_weights(model.base_path, "Its base model")
            log.info("loading %s from %s", model.id, model.path)
            return spec.build(self, model)

    def _measure(
        self, spec: Factory, model: LoadableModel, servable: Any
    ) -> tuple[int, str | None]:
        """The bytes a new servable adds, and the shared base it sits on (whose bytes are
        measured once, with its first adapter)."""
        if spec.wraps is not None:  # its inner servable holds the weights
            return 0, None
        if model.base_path is None:
            return memory.servable_bytes(servable), None
        base = str(model.base_path)
        with self._lock:
            known = base in self._base_bytes
        if not known:
            measured = memory.base_bytes(servable)
            with self._lock:
                self._base_bytes.setdefault(base, measured)
        return memory.adapter_bytes(model.path), base

    def _remember(self, entry: _Entry) -> list[_Entry]:
        """Under the lock: mark ``entry`` most recently used, caching it if it is not; returns
        the idle servables this pushed out, to release once the lock is let go."""
        if entry.cached:
            self._lru.move_to_end(entry.key)
            return []
        entry.cached = True
        self._lru[entry.key] = entry
        evicted = self._evict_over_limits(protect=entry)
        self._publish()
        return evicted

    def _evict_over_limits(self, protect: _Entry | None) -> list[_Entry]:
        """Under the lock: drop the least recently used idle models (never ``protect``'s) until
        each limit holds or nothing more may go; returns the servables to release."""
        released: list[_Entry] = []
        for reason in ("adapter-lru", "count", "bytes"):
            while (eligible := self._over(reason)) is not None:
                victim = self._victim(eligible, protect)
                if victim is None:  # all in use or pinned: over the limit until they end
                    break
                released += self._drop_group(victim, reason)
        return released

    def _over(self, reason: str) -> Callable[[_Entry], bool] | None:
        """Which servables may go to bring ``reason``'s limit back; None when it holds."""
        if reason == "count":
            return (lambda entry: True) if len(self._lru) > self.capacity else None
        if reason == "bytes":
            return (lambda entry: True) if self._held_bytes() > self.max_bytes else None
        adapters: dict[str, set[tuple[str, str]]] = {}
        for entry in self._lru.values():
            if entry.base is not None:
                adapters.setdefault(entry.base, set()).add(entry.key[1:])
        for base, models in adapters.items():
            if len(models) > self.adapters_per_base:
                return lambda entry, base=base: entry.base == base  # type: ignore[misc]
        return None

    def _victim(self, eligible: Callable[[_Entry], bool], protect: _Entry | None) -> _Entry | None:
        """The least recently used cached servable ``eligible`` accepts whose model is idle,
        unpinned and not ``protect``'s."""
        busy = {e.key[1:] for e in self._live if e.users > e.inner or e.pinned}
        if protect is not None:
            busy.add(protect.key[1:])
        return next((e for e in self._lru.values() if e.key[1:] not in busy and eligible(e)), None)

    def _drop_group(self, victim: _Entry, reason: str) -> list[_Entry]:
        """Under the lock: take every cached servable of ``victim``'s model out of the cache;
        returns those to release now (the others go with their last user)."""
        released = []
        for entry in [e for e in self._lru.values() if e.key[1:] == victim.key[1:]]:
            del self._lru[entry.key]
            entry.cached = False
            if entry.users == 0:
                self._entries.pop(entry.key, None)
                entry.findable = False
                self._live.discard(entry)
                released.append(entry)
        metrics.EVICTIONS.labels(reason).inc()
        log.info("evicted %s (%s)", victim.key[1], reason)
        return released

    def _held_bytes(self) -> int:
        """Bytes held by the models that are cached or in use, a shared base once. A servable
        held only by a wrapper of its own model counts while that model is cached or in use."""
        active = {e.key[1:] for e in self._live if e.cached or e.users > e.inner}
        held = [e for e in self._live if e.key[1:] in active and (e.cached or e.users)]
        bases = {e.base for e in held if e.base is not None}
        return sum(e.bytes for e in held) + sum(self._base_bytes.get(b, 0) for b in bases)

    def _has_room(self) -> bool:
        """Whether idle models could make room for one more (under the lock)."""
        kept = [e for e in self._live if e.users > e.inner or e.pinned]
        models = {e.key[1:] for e in kept}
        bases = {e.base for e in kept if e.base is not None}
        kept_bytes = sum(e.bytes for e in kept) + sum(self._base_bytes.get(b, 0) for b in bases)
        return len(models) < self.capacity and kept_bytes < self.max_bytes

    def _stats(self) -> CacheStats:
        models = {e.key[1:] for e in self._lru.values()}
        adapters = {e.key[1:] for e in self._lru.values() if e.base is not None}
        bases = {e.base for e in self._live if e.base is not None}
        return CacheStats(
            bytes=self._held_bytes(), budget=self.max_bytes, servables=len(self._lru),
            models=len(models), adapters=len(adapters), bases=len(bases),
        )  # fmt: skip

    def _publish(self) -> None:
        stats = self._stats()
        metrics.BYTES.set(stats.bytes)
        metrics.MODELS.set(stats.models)
        metrics.ADAPTERS.set(stats.adapters)
        metrics.BASES.set(stats.bases)

    def _close(self, entry: _Entry, inner: bool) -> None:
        with self._lock:
            entry.users -= 1
            entry.inner -= inner
            if entry.users == 0 and not entry.cached:  # out of the cache, its last user done
                if entry.findable:
                    del self._entries[entry.key]
                    entry.findable = False
                self._live.discard(entry)
                released = [entry]
            elif entry.cached and entry.users == entry.inner:
                # Idle now: a burst that held the cache over its limits gives back what it can,
                # keeping the most recently used model (one bigger than the budget stays).
                released = self._evict_over_limits(protect=next(reversed(self._lru.values())))
            else:
                return
            self._publish()
        self._release(released)

    def _release(self, entries: list[_Entry]) -> None:
        for entry in entries:
            release = getattr(entry.servable, "release", None)
            if release is not None:
                _run(release)
            for callback in entry.on_released:
                _run(callback)
        if any(entry.bytes for entry in entries):
            memory.return_memory_soon()

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
