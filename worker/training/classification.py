"""The "classification" kind: rows of {"text", "label"} fine-tune a sequence classifier
(a pretrained encoder with a fresh classification head)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from app.core.kinds import FORMAT_CLASSIFICATION, KIND_CLASSIFICATION
from worker.training.labels import carry_label_rows, output_keys
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


@register(FORMAT_CLASSIFICATION)
class Classification(TaskKind):
    model_kind = KIND_CLASSIFICATION

    def labels(self, train_rows: Sequence[Example], valid_rows: Sequence[Example]) -> list[str]:
        return label_list(train_rows, valid_rows)

    def load_tokenizer(self, spec: TrainingSpec) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(spec.require_base_model_dir(), local_files_only=True)

    def load_model(
        self, spec: TrainingSpec, labels: list[str], weights_dir: Path | None = None
    ) -> torch.nn.Module:
        # A continued classifier (spec.parent) loads from the parent's directory, head
        # included; with other labels its head is rebuilt (worker/training/labels.py).
        parent = spec.parent if weights_dir is None else None
        relabelled = parent is not None and parent.labels is not None and parent.labels != labels
        # Labels go into config.json so the saved model predicts names, not ids.
        model = AutoModelForSequenceClassification.from_pretrained(
            weights_dir or spec.require_base_model_dir(),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            local_files_only=True,
            use_safetensors=True,
            ignore_mismatched_sizes=relabelled,
        )
        if relabelled:
            assert parent is not None and parent.labels is not None
            self._carry_head(model, parent.path, parent.labels, labels)
        return model

    @staticmethod
    def _carry_head(
        model: torch.nn.Module, parent_dir: Path, old_labels: list[str], labels: list[str]
    ) -> None:
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for path in sorted(parent_dir.glob("*.safetensors")):
            weights.update(load_file(path))
        prefix = str(getattr(model, "base_model_prefix", "") or "")
        keys = output_keys(model, weights, len(old_labels), len(labels), skip_prefix=prefix)
        if not keys:
            raise ValueError("the parent classifier's output layer was not found")
        std = float(getattr(model.config, "initializer_range", 0.02))

        def fresh(row: torch.Tensor) -> None:  # transformers' init of a Linear layer
            row.normal_(0.0, std) if row.dim() else row.zero_()

        carry_label_rows(model, weights, keys, old_labels, labels, fresh)

    def encode_examples(
        self,
        rows: Sequence[Example],
        tokenizer: Any | None,
        labels: list[str],
        hp: TrainingHyperparameters,
        warn: Warn = no_warning,
    ) -> list[Features]:
        assert tokenizer is not None
        label_ids = {label: i for i, label in enumerate(labels)}
        encoded = tokenizer(
            [row["text"] for row in rows], truncation=True, max_length=hp.max_seq_length
        )
        return [
            {
                **{key: values[i] for key, values in encoded.items()},
                "labels": label_ids[str(row["label"])],
            }
            for i, row in enumerate(rows)
        ]

    def make_collate(self, tokenizer: Any | None, pad_to_multiple_of: int | None = None) -> Collate:
        assert tokenizer is not None
        # Pad each batch only to its own longest row: short texts stay cheap.
        return DataCollatorWithPadding(
            tokenizer,
            padding="longest",
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="pt",
        )

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def eval_metrics(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            out = model(**batch)
            n = int(batch["labels"].shape[0])
            loss_sum += float(out.loss) * n  # the model's loss is a batch mean
            correct += int((out.logits.argmax(dim=-1) == batch["labels"]).sum())
            count += n
        if count == 0:
            return {}
        return {"valid_loss": loss_sum / count, "valid_accuracy": correct / count}
