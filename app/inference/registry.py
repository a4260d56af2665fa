"""Loaded models: a small LRU cache, and one predictor class per task kind.

torch and transformers are imported here lazily, on the first prediction, so the control plane
(which never predicts) never loads them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from app.core.errors import InvalidRequest
from app.services.models import LoadableModel

log = logging.getLogger(__name__)


class Predictor(Protocol):
    def predict(self, inputs: list[str]) -> tuple[list[dict[str, Any]], int]:
        """One result per input, and the number of prompt tokens used."""
        ...


PREDICTORS: dict[str, Callable[[LoadableModel], Predictor]] = {}


def predictor(task: str) -> Callable[[Callable[[LoadableModel], Predictor]], Any]:
    def register(factory: Callable[[LoadableModel], Predictor]) -> Any:
        PREDICTORS[task] = factory
        return factory

    return register


def _refuse_pickles(path: Path) -> None:
    # Weights load from safetensors only (design rule 4).
    if not any(path.glob("*.safetensors")):
        raise InvalidRequest("Model directory for this model holds no safetensors weights.")


@predictor("classification")
class ClassifierPredictor:
    batch_size = 32

    def __init__(self, model: LoadableModel):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _refuse_pickles(model.path)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model.path, use_safetensors=True
        ).eval()
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}

    def predict(self, inputs: list[str]) -> tuple[list[dict[str, Any]], int]:
        torch = self._torch
        results: list[dict[str, Any]] = []
        tokens = 0
        for start in range(0, len(inputs), self.batch_size):
            batch = self.tokenizer(
                inputs[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            tokens += int(batch["attention_mask"].sum())
            with torch.inference_mode():
                probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
            for row in probs.tolist():
                scores = {self.id2label[i]: round(p, 6) for i, p in enumerate(row)}
                best = max(range(len(row)), key=row.__getitem__)
                results.append({"label": self.id2label[best], "score": row[best], "scores": scores})
        return results, tokens


class ModelCache:
    """Keeps up to ``capacity`` models loaded; the least recently used one goes first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, str], Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def get(self, model: LoadableModel) -> Predictor:
        key = (model.id, str(model.path))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        # One load per model at a time; other models load in parallel.
        with load_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            factory = PREDICTORS.get(model.task)
            if factory is None:
                raise InvalidRequest(
                    f"Model '{model.id}' is a {model.task} model; /v1/predictions serves "
                    f"{', '.join(sorted(PREDICTORS))} models.",
                    param="model",
                )
            log.info("loading model %s from %s", model.id, model.path)
            loaded = factory(model)
            with self._lock:
                self._models[key] = loaded
                self._loading.pop(key, None)
                while len(self._models) > self.capacity:
                    self.evict_lru()
            return loaded

    def evict_lru(self) -> None:
        evicted, _ = self._models.popitem(last=False)
        log.info("evicted model %s", evicted[0])

    def forget(self, model_id: str) -> None:
        with self._lock:
            for key in [k for k in self._models if k[0] == model_id]:
                del self._models[key]

    def __len__(self) -> int:
        return len(self._models)
