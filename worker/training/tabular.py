"""The "tabular" kind: rows of {"features": [numbers], "label"} train `tunehouse/mlp`, a
multilayer perceptron designed from scratch (app/inference/architectures.py), with its layers
set in the job's method.supervised.architecture.

Features are standardised with the mean and standard deviation of the training rows; both are
saved in the model's config.json (and in every checkpoint), so inference scales its inputs
exactly as training did. There is no tokenizer: the kind's "preprocessor" is that scaling, and
trained_tokens counts rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.core.defaults import default_architecture
from app.core.kinds import FORMAT_TABULAR, KIND_TABULAR
from app.inference.architectures import (
    ACTIVATIONS,
    MLP,
    MLP_ARCHITECTURE,
    build_mlp,
    load_mlp,
    save_mlp,
)
from worker.training.labels import carry_label_rows
from worker.training.registry import (
    Batch,
    Collate,
    Example,
    Features,
    TaskKind,
    Warn,
    label_list,
    no_warning,
    register,
)
from worker.training.spec import TrainingHyperparameters, TrainingSpec


def architecture(spec: TrainingSpec) -> dict[str, Any]:
    """The job's architecture over the defaults, checked."""
    chosen = {**default_architecture(), **(spec.supervised.get("architecture") or {})}
    sizes = chosen["hidden_sizes"]
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 1 for s in sizes):
        raise ValueError(
            f"architecture.hidden_sizes must be a list of positive integers, got {sizes!r}"
        )
    if chosen["activation"] not in ACTIVATIONS:
        raise ValueError(f"architecture.activation must be one of {sorted(ACTIVATIONS)}")
    if not 0 <= float(chosen["dropout"]) < 1:
        raise ValueError("architecture.dropout must be at least 0 and below 1")
    return {
        "hidden_sizes": list(sizes),
        "activation": str(chosen["activation"]),
        "dropout": float(chosen["dropout"]),
    }


def feature_statistics(rows: Sequence[Example]) -> tuple[list[float], list[float]]:
    """Per-feature mean and standard deviation of `rows`; a constant feature gets std 1, so it
    scales to 0 instead of dividing by zero. Rounded to float32, the precision inference uses."""
    features = torch.tensor([row["features"] for row in rows], dtype=torch.float64)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float().tolist(), std.float().tolist()


@register(FORMAT_TABULAR)
class Tabular(TaskKind):
    model_kind = KIND_TABULAR

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}  # config.json of the model, set by prepare

    def labels(self, train_rows: Sequence[Example], valid_rows: Sequence[Example]) -> list[str]:
        return label_list(train_rows, valid_rows)

    def prepare(self, spec: TrainingSpec, train_rows: Sequence[Example], labels: list[str]) -> None:
        if spec.parent is not None:
            # A continued model keeps its parent's layers and input scaling (its weights
            # expect inputs scaled so); only the labels are the new file's.
            parent = json.loads((spec.parent.path / "config.json").read_text(encoding="utf-8"))
            self.config = {**parent, "architecture": MLP_ARCHITECTURE, "labels": list(labels)}
            return
        # Statistics of the training rows only: validation data must not leak into the model.
        mean, std = feature_statistics(train_rows)
        self.config = {
            "architecture": MLP_ARCHITECTURE,
            "input_size": len(mean),
            **architecture(spec),
            "labels": list(labels),
            "feature_mean": mean,
            "feature_std": std,
        }

    def load_model(
        self, spec: TrainingSpec, labels: list[str], weights_dir: Path | None = None
    ) -> torch.nn.Module:
        if weights_dir is None and spec.parent is not None:
            return self._continued(spec.parent.path, spec.parent.labels or [], labels)
        if weights_dir is None:
            return build_mlp(self.config)  # initialised from the torch seed the loop set
        model, saved = load_mlp(weights_dir)
        if saved != self.config:
            raise ValueError(
                "the checkpoint's model does not match this job's data or architecture"
            )
        return model

    def _continued(self, parent_dir: Path, old_labels: list[str], labels: list[str]) -> MLP:
        """The parent's network; its output layer's rows follow the labels (labels.py)."""
        model = build_mlp(self.config)  # new classes' rows: initialised from the torch seed
        weights = load_mlp(parent_dir)[0].state_dict()
        last = len(model.layers) - 1
        output = [f"layers.{last}.weight", f"layers.{last}.bias"]
        model.load_state_dict({k: v for k, v in weights.items() if k not in output}, strict=False)
        carry_label_rows(model, weights, output, old_labels, labels)
        return model

    def encode_examples(
        self,
        rows: Sequence[Example],
        tokenizer: Any | None,
        labels: list[str],
        hp: TrainingHyperparameters,
        warn: Warn = no_warning,
    ) -> list[Features]:
        size = self.config["input_size"]
        wrong = next((row for row in rows if len(row["features"]) != size), None)
        if wrong is not None:
            found = len(wrong["features"])
            raise ValueError(
                f"every row needs {size} features, as in the training file; got {found}"
            )
        label_ids = {label: i for i, label in enumerate(labels)}
        mean = torch.tensor(self.config["feature_mean"], dtype=torch.float32)
        std = torch.tensor(self.config["feature_std"], dtype=torch.float32)
        # Scaled as the predictions route scales inputs: in float32, with the saved statistics.
        scaled = (torch.tensor([row["features"] for row in rows], dtype=torch.float32) - mean) / std
        return [
            {"features": scaled[i], "labels": label_ids[str(row["label"])]}
            for i, row in enumerate(rows)
        ]

    def make_collate(self, tokenizer: Any | None, pad_to_multiple_of: int | None = None) -> Collate:
        def collate(features: list[Features]) -> Batch:
            return {
                "features": torch.stack([f["features"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
            }

        return collate

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # The model returns logits; cross_entropy applies the (log-)softmax once, itself.
        return F.cross_entropy(model(batch["features"]), batch["labels"], reduction="sum")

    def count_tokens(self, batch: Batch) -> int:
        return int(batch["labels"].shape[0])

    def eval_metrics(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = model(batch["features"])
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            count += int(batch["labels"].shape[0])
        if count == 0:
            return {}
        return {"valid_loss": loss_sum / count, "valid_accuracy": correct / count}

    def save_model(self, model: torch.nn.Module, tokenizer: Any | None, path: Path) -> None:
        assert isinstance(model, MLP)
        save_mlp(model, self.config, path)
