"""Loaded models: a small LRU cache of servables, one factory per (use, model kind).

A servable is what a route needs: a classifier's ``predict``, a causal LM's ``Generator``, an
encoder's ``embed``. LoRA adapters of one base share that base in memory: the base is loaded
once, wrapped by peft, and each adapter is added to it by name (a few MB each), then selected
inside the base's lock for each generation.

torch and transformers are imported lazily, on the first load, so the control plane (which never
serves) never loads them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRequest
from app.services.models import LoadableModel, require_safe_weights

log = logging.getLogger(__name__)

Use = str  # "predict" | "generate" | "embed"
Factory = Callable[["ModelCache", LoadableModel], Any]

FACTORIES: dict[tuple[Use, str], Factory] = {}
USES = {
    "predict": "/v1/predictions",
    "generate": "/v1/chat/completions and /v1/completions",
    "embed": "/v1/embeddings",
}


def factory(use: Use, *kinds: str) -> Callable[[Factory], Factory]:
    def register(build: Factory) -> Factory:
        for kind in kinds:
            FACTORIES[(use, kind)] = build
        return build

    return register


class ModelCache:
    """Keeps up to ``capacity`` servables; the least recently used one goes first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}
        # Shared LoRA bases: base directory -> (peft model, lock, adapter names).
        self._bases: dict[str, tuple[Any, threading.Lock, set[str]]] = {}

    def get(self, model: LoadableModel, use: Use) -> Any:
        build = FACTORIES.get((use, model.task))
        if build is None:
            served = sorted({kind for (u, kind) in FACTORIES if u == use})
            raise InvalidRequest(
                f"Model '{model.id}' is a {model.task} model; {USES[use]} serves "
                f"{', '.join(served)} models.",
                param="model",
                code="wrong_model_kind",
            )
        key = (use, model.id, str(model.path))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per model at a time; other models load in parallel
            with self._lock:
                if key in self._items:
                    return self._items[key]
            log.info("loading %s for %s from %s", model.id, use, model.path)
            servable = build(self, model)
            with self._lock:
                self._items[key] = servable
                self._loading.pop(key, None)
                evicted = [
                    self._items.popitem(last=False) for _ in range(self.capacity, len(self._items))
                ]
            for (use, model_id, _), old in evicted:  # outside the lock: release may take it
                _release(old)
                log.info("evicted %s (%s)", model_id, use)
            return servable

    def forget(self, model_id: str) -> None:
        with self._lock:
            gone = [self._items.pop(key) for key in [k for k in self._items if k[1] == model_id]]
        for servable in gone:
            _release(servable)

    def __len__(self) -> int:
        return len(self._items)

    # -- shared LoRA bases -------------------------------------------------------------------

    def attach_adapter(self, base_path: Path, adapter_path: Path, name: str) -> tuple[Any, Any]:
        """The shared peft model of ``base_path`` with adapter ``name`` loaded; returns it and
        its lock. Loading the same adapter twice is a no-op."""
        from peft import PeftModel

        from app.inference.generation import load_causal_lm

        require_safe_weights(adapter_path)
        with self._lock:
            entry = self._bases.get(str(base_path))
        if entry is None:
            require_safe_weights(base_path)
            base = load_causal_lm(base_path)
            peft_model = PeftModel.from_pretrained(base, adapter_path, adapter_name=name).eval()
            entry = (peft_model, threading.Lock(), {name})
            with self._lock:
                self._bases[str(base_path)] = entry
            return entry[0], entry[1]
        peft_model, lock, names = entry
        with lock:
            if name not in names:
                peft_model.load_adapter(adapter_path, adapter_name=name)
                names.add(name)
        return peft_model, lock

    def detach_adapter(self, base_path: Path, name: str) -> None:
        with self._lock:
            entry = self._bases.get(str(base_path))
        if entry is None:
            return
        peft_model, lock, names = entry
        with lock:
            if name in names and len(names) > 1:
                peft_model.delete_adapter(name)
                names.discard(name)
            elif name in names:  # the last adapter: drop the base with it
                with self._lock:
                    self._bases.pop(str(base_path), None)


def _release(servable: Any) -> None:
    release = getattr(servable, "release", None)
    if release is not None:
        release()


# Register the built-in servables (they import torch only when a model is loaded).
from app.inference import servables as _servables  # noqa: E402,F401
