"""What each kind of model serves. Every loader reads safetensors only; no remote code. The cache
checks a model's weights once, before its factory runs (``ModelCache._build``)."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future
from functools import partial
from typing import Any

from app.core.kinds import KIND_CAUSAL_LM, KIND_CLASSIFICATION, KIND_ENCODER, KIND_TABULAR
from app.core.settings import Quantization
from app.inference.batching import Batchers, BatchPolicy
from app.inference.loading import load_pretrained
from app.inference.protocols import TextGenerator, Use
from app.inference.registry import ModelCache, factory
from app.services.models import LoadableModel


class _BatchedTexts:
    """A transformers model of tokenized texts, served in dynamic batches in full precision and,
    from the first request that asks, in int8 (a quantized copy beside the full one). Texts are
    tokenized by their request, unpadded; each sub-batch is padded to its longest row."""

    use: Use

    def __init__(self, model_class: Any, model: LoadableModel):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        # A fast tokenizer is not safe to call from several threads at once (its Rust side
        # may raise "Already borrowed"); a request holds this only while it tokenizes.
        self._tokenizing = threading.Lock()
        self.models: dict[Quantization, Any] = {"none": load_pretrained(model_class, model.path)}
        self.batchers = Batchers(model.kind, self.use, self._run, self._quantize, _length)

    def forward(self, model: Any, batch: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def _submit(
        self, texts: list[str], policy: BatchPolicy, quantization: Quantization
    ) -> Future[tuple[list[Any], int]]:
        batcher = self.batchers.get(quantization, policy)
        with self._tokenizing:
            encoded = self.tokenizer(texts, truncation=True, max_length=512)
        rows = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
        tokens = sum(len(row["input_ids"]) for row in rows)
        return batcher.submit(rows, lambda results: (results, tokens))

    def _quantize(self, quantization: Quantization) -> None:
        if quantization == "int8" and "int8" not in self.models:
            self.models["int8"] = quantize_int8(self.models["none"])

    def _run(self, quantization: Quantization, rows: list[dict[str, list[int]]]) -> list[Any]:
        import torch

        with torch.inference_mode():
            return self.forward(self.models[quantization], self._pad(rows))

    def _pad(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        left = self.tokenizer.padding_side == "left"
        batch = {}
        for key in rows[0]:
            fill = (self.tokenizer.pad_token_id or 0) if key == "input_ids" else 0
            padded = []
            for row in rows:
                pad = [fill] * (width - len(row[key]))
                padded.append(pad + row[key] if left else row[key] + pad)
            batch[key] = torch.tensor(padded)
        return batch

    def release(self) -> None:
        self.batchers.close()
        # The weights go now, not when the garbage collector finds the cycle between this
        # servable and its batchers (no request is left to use them).
        self.models.clear()


def quantize_int8(model: Any) -> Any:
    """A copy of ``model`` whose linear layers compute in int8: weights quantized once, per
    output channel, activations quantized per batch as they come (dynamic quantization). Through
    ``torch.ao.quantization.quantize_dynamic``: deprecated in favour of torchao, but torchao's
    int8 (0.18, ``Int8DynamicActivationInt8WeightConfig``) measured about half as fast on this
    CPU without ``torch.compile``; its deprecation warnings are silenced here only."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        quantization = torch.ao.quantization
        # Per-channel weights: on a MiniLM classifier, SST-2 dev accuracy moves 0.3 points
        # from full precision (per-tensor weights: 1.0).
        quantized = quantization.quantize_dynamic(
            model, {torch.nn.Linear: quantization.per_channel_dynamic_qconfig}
        )
    return quantized.eval()


@factory("predict", KIND_CLASSIFICATION)
class ClassifierPredictor(_BatchedTexts):
    """A label and its scores for each text, from a fine-tuned sequence classifier."""

    use = "predict"

    def __init__(self, cache: ModelCache, model: LoadableModel):
        from transformers import AutoModelForSequenceClassification

        super().__init__(AutoModelForSequenceClassification, model)
        config = self.models["none"].config
        self.id2label = {int(k): str(v) for k, v in config.id2label.items()}

    def submit(
        self, inputs: list[Any], policy: BatchPolicy, quantization: Quantization = "none"
    ) -> Future[tuple[list[dict[str, Any]], int]]:
        return self._submit(_texts(inputs), policy, quantization)

    def forward(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        import torch

        probs = torch.softmax(model(**batch).logits.float(), dim=-1)
        return [_scored(row, self.id2label) for row in probs.tolist()]


@factory("predict", KIND_TABULAR)
class TabularPredictor:
    """A label and its scores for each row of numbers, from a ``tunehouse/mlp`` model."""

    def __init__(self, cache: ModelCache, model: LoadableModel):
        import torch

        from app.inference.architectures import load_mlp

        self.model, self.config = load_mlp(model.path)
        self.model.eval()
        self.id2label = dict(enumerate(str(label) for label in self.config["labels"]))
        self.size = int(self.config["input_size"])
        self.mean = torch.tensor(self.config["feature_mean"], dtype=torch.float32)
        self.std = torch.tensor(self.config["feature_std"], dtype=torch.float32)
        self.batchers = Batchers(model.kind, "predict", self._run)

    def submit(
        self, inputs: list[Any], policy: BatchPolicy, quantization: Quantization = "none"
    ) -> Future[tuple[list[dict[str, Any]], int]]:
        rows = []
        for index, row in enumerate(inputs):  # every row checked before any is queued
            if not isinstance(row, list) or len(row) != self.size:
                raise _bad_input(f"input[{index}] must be a list of {self.size} numbers")
            rows.append([float(x) for x in row])
        return self.batchers.get("none", policy).submit(rows, lambda results: (results, 0))

    def _run(self, quantization: Quantization, rows: list[list[float]]) -> list[dict[str, Any]]:
        import torch

        features = torch.tensor(rows, dtype=torch.float32)
        with torch.inference_mode():
            probs = torch.softmax(self.model((features - self.mean) / self.std), dim=-1)
        return [_scored(row, self.id2label) for row in probs.tolist()]

    def release(self) -> None:
        self.batchers.close()


@factory("generate", KIND_CAUSAL_LM)
def load_generator(cache: ModelCache, model: LoadableModel) -> TextGenerator:
    from app.inference.engine import DecodeEngine
    from app.inference.generation import Generator, load_causal_lm, load_tokenizer

    if model.base_path is None:
        lm = load_causal_lm(model.path)
        engine = DecodeEngine(lm, threading.Lock())
        return Generator(lm, load_tokenizer(model.path), engine, on_release=engine.close)
    # A LoRA adapter: it shares its base, the base's decode engine and (when its files are the
    # same) its tokenizer with the other adapters of that base.
    shared = cache.attach_adapter(model.base_path, model.path, model.id)
    try:
        tokenizer = shared.tokenizer(model.path)
    except BaseException:
        cache.detach_adapter(model.base_path, model.id)
        raise
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
class SentenceEmbedder(_BatchedTexts):
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for
    all-MiniLM-L6-v2); a fine-tuned classifier embeds with its fine-tuned encoder."""

    use = "embed"

    def __init__(self, cache: ModelCache, model: LoadableModel):
        from transformers import AutoModel

        super().__init__(AutoModel, model)

    def submit(
        self, texts: list[str], policy: BatchPolicy, quantization: Quantization = "none"
    ) -> Future[tuple[list[list[float]], int]]:
        return self._submit(texts, policy, quantization)

    def forward(self, model: Any, batch: dict[str, Any]) -> list[list[float]]:
        import torch

        hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        vectors: list[list[float]] = torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()
        return vectors


def _length(row: dict[str, list[int]]) -> int:
    return len(row["input_ids"])


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
