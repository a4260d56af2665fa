"""What each kind of model serves. Every loader reads safetensors only; no remote code. The cache
checks a model's weights once, before its factory runs (``ModelCache._build``)."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from app.core.kinds import KIND_CAUSAL_LM, KIND_CLASSIFICATION, KIND_ENCODER, KIND_TABULAR
from app.inference.loading import load_pretrained
from app.inference.protocols import TextGenerator
from app.inference.registry import ModelCache, factory
from app.services.models import LoadableModel


@factory("predict", KIND_CLASSIFICATION)
class ClassifierPredictor:
    batch_size = 32

    def __init__(self, cache: ModelCache, model: LoadableModel):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.model = load_pretrained(AutoModelForSequenceClassification, model.path)
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}

    def predict(self, inputs: list[Any]) -> tuple[list[dict[str, Any]], int]:
        import torch

        texts = _texts(inputs)
        results: list[dict[str, Any]] = []
        tokens = 0
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            tokens += int(batch["attention_mask"].sum())
            with torch.inference_mode():
                probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
            results += [_scored(row, self.id2label) for row in probs.tolist()]
        return results, tokens


@factory("predict", KIND_TABULAR)
class TabularPredictor:
    def __init__(self, cache: ModelCache, model: LoadableModel):
        from app.inference.architectures import load_mlp

        self.model, self.config = load_mlp(model.path)
        self.model.eval()
        self.id2label = dict(enumerate(str(label) for label in self.config["labels"]))

    def predict(self, inputs: list[Any]) -> tuple[list[dict[str, Any]], int]:
        import torch

        size = int(self.config["input_size"])
        rows = []
        for index, row in enumerate(inputs):
            if not isinstance(row, list) or len(row) != size:
                raise _bad_input(f"input[{index}] must be a list of {size} numbers")
            rows.append([float(x) for x in row])
        features = torch.tensor(rows, dtype=torch.float32)
        mean = torch.tensor(self.config["feature_mean"], dtype=torch.float32)
        std = torch.tensor(self.config["feature_std"], dtype=torch.float32)
        with torch.inference_mode():
            probs = torch.softmax(self.model((features - mean) / std), dim=-1)
        return [_scored(row, self.id2label) for row in probs.tolist()], 0


@factory("generate", KIND_CAUSAL_LM)
def load_generator(cache: ModelCache, model: LoadableModel) -> TextGenerator:
    from app.inference.engine import DecodeEngine
    from app.inference.generation import Generator, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model.path)
    if model.base_path is None:
        lm = load_causal_lm(model.path)
        engine = DecodeEngine(lm, threading.Lock())
        return Generator(lm, tokenizer, engine, on_release=engine.close)
    # A LoRA adapter: it shares its base, and the base's decode engine, with the other adapters
    # of that base.
    shared = cache.attach_adapter(model.base_path, model.path, model.id)
    return Generator(
        shared.model,
        tokenizer,
        shared.engine,
        adapter=model.id,
        on_release=partial(cache.detach_adapter, model.base_path, model.id),
    )


@factory("predict", KIND_CAUSAL_LM, wraps="generate")
class TextPredictor:
    """/v1/predictions for a generative model: the greedy continuation of each input, all
    inputs generated at once. It holds a lease on the model's generate servable, which stays
    loaded while this one is."""

    max_tokens = 128

    def __init__(self, cache: ModelCache, model: LoadableModel):
        self._generator = cache.lease(model, "generate")

    def predict(self, inputs: list[Any]) -> tuple[list[dict[str, Any]], int]:
        from app.inference.sampling import GenerationParams

        generator = self._generator.servable
        params = GenerationParams(max_tokens=self.max_tokens, temperature=0.0)
        prompts = [generator.encode(text) for text in _texts(inputs)]
        results = generator.complete_all([(prompt, params) for prompt in prompts])
        return [{"text": result.text} for result in results], sum(map(len, prompts))

    def release(self) -> None:
        self._generator.close()


@factory("embed", KIND_ENCODER, KIND_CLASSIFICATION)
class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for
    all-MiniLM-L6-v2); a fine-tuned classifier embeds with its fine-tuned encoder."""

    batch_size = 32

    def __init__(self, cache: ModelCache, model: LoadableModel):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.model = load_pretrained(AutoModel, model.path)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        import torch

        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            mask = batch["attention_mask"]
            tokens += int(mask.sum())
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            vectors += torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()
        return vectors, tokens


def _texts(inputs: list[Any]) -> list[str]:
    for index, item in enumerate(inputs):
        if not isinstance(item, str):
            raise _bad_input(f"input[{index}] must be a string for this model")
    return list(inputs)


def _scored(row: list[float], id2label: dict[int, str]) -> dict[str, Any]:
    best = max(range(len(row)), key=row.__getitem__)
    return {
        "label": id2label[best],
        "score": row[best],
        "scores": {id2label[i]: round(p, 6) for i, p in enumerate(row)},
    }


def _bad_input(message: str) -> Exception:
    from app.core.errors import InvalidRequest

    return InvalidRequest(message, param="input")
