"""Task kinds: what differs between training a classifier, a generative model and a model
built from scratch. Everything else (the loop, checkpoints, metrics) is shared.

A kind is a class registered under the name of the dataset format it trains on (the
`FORMAT_*` names of `app/core/kinds.py`), and says which model kind it stores (`KIND_*`). The
built-in kinds are imported on first use so importing this module never loads torch. An
instance lives for one run, so a kind may keep what `prepare` learns (the base model's context
length, the feature statistics) between calls.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.core.kinds import (
    FORMAT_CHAT,
    FORMAT_CLASSIFICATION,
    FORMAT_COMPLETION,
    FORMAT_PREFERENCE,
    FORMAT_TABULAR,
    FORMAT_TEXT,
)

if TYPE_CHECKING:
    import torch

    from worker.training.spec import TrainingHyperparameters, TrainingSpec

Example = dict[str, Any]  # one normalised dataset row, as iter_examples yields it
Features = dict[str, Any]  # one encoded row, ready for the collate function
Batch = dict[str, "torch.Tensor"]  # what the model's forward takes
Collate = Callable[[list[Features]], Batch]
Warn = Callable[[str], None]  # reports a warning event about the data

LENGTH_GROUP_BATCHES = 50  # rows are sorted by length within windows of this many batches


def no_warning(text: str) -> None:
    """The default Warn: the warning is dropped (tests and tools that call a kind directly)."""


def label_list(train_rows: Sequence[Example], valid_rows: Sequence[Example]) -> list[str]:
    """Sorted distinct training labels; every validation label must be one of them, since a
    class never seen in training cannot be predicted."""
    labels = sorted({str(row["label"]) for row in train_rows})
    unseen = sorted({str(row["label"]) for row in valid_rows} - set(labels))
    if unseen:
        raise ValueError(
            f"the validation file has labels that are not in the training file: {unseen[:10]}"
        )
    if len(labels) < 2:
        raise ValueError(f"a classifier needs at least 2 distinct labels, got {labels}")
    return labels


class TaskKind(ABC):
    """How one kind of task loads its model, turns rows into batches and scores the model."""

    name: str = ""  # the dataset format, set by @register
    model_kind: str = ""  # what the stored model is: a KIND_* of app/core/kinds.py

    def labels(self, train_rows: Sequence[Example], valid_rows: Sequence[Example]) -> list[str]:
        """The class names, in id order; generative kinds have none."""
        return []

    def prepare(self, spec: TrainingSpec, train_rows: Sequence[Example], labels: list[str]) -> None:
        """Learn what encoding and saving need before any row is encoded: called once per run
        (again on resume, with the same rows), before load_tokenizer. Default: nothing."""
        return None

    def load_tokenizer(self, spec: TrainingSpec) -> Any | None:
        """The tokenizer (or other preprocessor) saved beside the model; None when there is none."""
        return None

    @abstractmethod
    def load_model(
        self, spec: TrainingSpec, labels: list[str], weights_dir: Path | None = None
    ) -> torch.nn.Module:
        """The model to train: from spec.base_model_dir, or from `weights_dir` (a checkpoint)
        when resuming. Must be deterministic given the torch seed set by the loop."""

    @abstractmethod
    def encode_examples(
        self,
        rows: Sequence[Example],
        tokenizer: Any | None,
        labels: list[str],
        hp: TrainingHyperparameters,
        warn: Warn = no_warning,
    ) -> list[Features]:
        """Rows to unpadded features, once, before training; `warn` reports what the user
        should know about the data (rows cut to max_seq_length)."""

    @abstractmethod
    def make_collate(self, tokenizer: Any | None, pad_to_multiple_of: int | None = None) -> Collate:
        """A function that pads a list of features into one batch of tensors: to the batch's
        longest row, rounded up to `pad_to_multiple_of` (8 on GPUs, for the tensor cores)."""

    # -- batches ---------------------------------------------------------------------------

    supports_packing: bool = False  # pack() may put several rows into one sequence
    packing_off: str | None = None  # why this run's model cannot be packed after all (prepare)

    def pack(
        self, features: list[Features], hp: TrainingHyperparameters, warn: Warn = no_warning
    ) -> list[Features]:
        """Several encoded rows per sequence, each attending only to itself (packing): the loop
        packs the rows of each micro-batch. Only called when `supports_packing` and the job's
        `packing` are on, and prepare found nothing against it (`packing_off`)."""
        raise NotImplementedError(f"{self.name} rows cannot be packed")

    def feature_length(self, feature: Features) -> int:
        """How long a row is, for grouping rows of similar length into a batch."""
        ids = feature.get("input_ids")
        return len(ids) if ids is not None else 1

    def epoch_batches(
        self, features: Sequence[Features], batch_size: int, generator: torch.Generator
    ) -> list[list[int]]:
        """The row indices of each batch (one optimizer step) of one epoch, drawn from
        `generator` (seeded for this epoch by the loop, so a resumed run sees the same
        batches).

        Rows of similar length share a batch, so little of it is padding. Sorting only within
        windows of a random order, and shuffling the batches, keeps the epoch random (the
        recipe of transformers' LengthGroupedSampler). Each batch is sorted longest first."""
        import torch

        order = torch.randperm(len(features), generator=generator).tolist()
        window = batch_size * LENGTH_GROUP_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            group = sorted(
                order[start : start + window],
                key=lambda i: self.feature_length(features[i]),
                reverse=True,
            )
            batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    # -- before training -------------------------------------------------------------------

    def start_training(
        self,
        model: torch.nn.Module,
        datasets: Sequence[list[Features]],
        batches: Callable[[list[Features]], Iterator[Batch]],
        saved: Any | None,
    ) -> None:
        """Called once the model is loaded, before the first step (of every attempt), in eval
        mode under torch.no_grad: what training needs from the starting model (DPO's reference
        log-probs of the training and validation features, `datasets`, batched by `batches`),
        computed now, or taken back from `saved` (what training_state returned, from the
        checkpoint the run resumes from). Default: nothing."""
        return None

    def training_state(self) -> Any | None:
        """What a checkpoint keeps for start_training: tensors and plain containers only."""
        return None

    # -- loss ------------------------------------------------------------------------------

    @abstractmethod
    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The loss of a batch summed (not averaged) over what it scores: rows for a
        classifier, predicted tokens for a language model. The loop divides by the count of
        the whole optimizer step (loss_count), so the gradient does not depend on how the
        step is cut into micro-batches or shared between processes."""

    def loss_count(self, features: Sequence[Features]) -> int:
        """How many terms loss_sum adds up over these rows. Default: one per row."""
        return len(features)

    def begin_step(self) -> None:
        """An optimizer step's forward passes begin (or begin again, after the micro-batch
        was lowered): forget what step_metrics gathered of it so far."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Figures of the rows of the step just taken, summed over the rows, with the count of
        rows under "rows" ({} for none): the loop reports each as ``train_<name>``, its mean
        over the rows since the last metrics event. Default: none."""
        return {}

    def count_tokens(self, batch: Batch) -> int:
        """Non-padding tokens in a batch, for the job's trained_tokens."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else 0

    @abstractmethod
    def eval_metrics(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """Scores over the whole validation set, keyed `valid_*` (always `valid_loss`).
        Called under torch.no_grad with the model in eval mode."""

    def save_model(self, model: torch.nn.Module, tokenizer: Any | None, path: Path) -> None:
        """Write the model in Hugging Face format, weights as safetensors."""
        # A transformers or peft model; nn.Module types such attributes as Tensor | Module.
        model.save_pretrained(path)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def save_final_model(self, model: torch.nn.Module, tokenizer: Any | None, path: Path) -> None:
        """Write the model the job hands to the user (checkpoints use save_model)."""
        self.save_model(model, tokenizer, path)

    def stores_adapter(self, spec: TrainingSpec) -> bool:
        """True when save_final_model writes an adapter that needs its base model."""
        return False


_KINDS: dict[str, type[TaskKind]] = {}

# Modules that register the built-in kinds; imported lazily by get_task_kind.
_BUILTIN_MODULES: dict[str, str] = {
    FORMAT_CLASSIFICATION: "worker.training.classification",
    FORMAT_CHAT: "worker.training.causal_lm",
    FORMAT_COMPLETION: "worker.training.causal_lm",
    FORMAT_TEXT: "worker.training.causal_lm",
    FORMAT_TABULAR: "worker.training.tabular",
    FORMAT_PREFERENCE: "worker.training.dpo",
}

K = TypeVar("K", bound=type[TaskKind])


def register(name: str) -> Callable[[K], K]:
    """Class decorator: make a TaskKind available as `get_task_kind(name)`."""

    def decorate(cls: K) -> K:
        if name in _KINDS and _KINDS[name] is not cls:
            raise ValueError(f"task kind {name!r} is already registered")
        cls.name = name
        _KINDS[name] = cls
        return cls

    return decorate


def get_task_kind(name: str) -> TaskKind:
    """A fresh instance of the kind registered as `name`."""
    if name not in _KINDS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        return _KINDS[name]()
    except KeyError:
        known = sorted(set(_KINDS) | set(_BUILTIN_MODULES))
        raise ValueError(f"unknown task kind {name!r} (known: {', '.join(known)})") from None
