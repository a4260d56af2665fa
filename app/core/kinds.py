"""Two vocabularies that share some words: dataset formats and model kinds.

A dataset format says what a training file's rows hold; it is the job's ``task`` and the name of
the worker's task kind (``worker/training/registry.py``). A model kind says what a stored model
is and which inference factories serve it (``app/inference/registry.py``); it is
``FineTunedModel.task`` and the ``task`` of ``GET /v1/models``. "classification" and "tabular"
are words of both, so the constants carry their vocabulary in their name. No torch here.
"""

from __future__ import annotations

from typing import Final, Literal

DatasetFormat = Literal["classification", "chat", "completion", "text", "tabular", "preference"]
ModelKind = Literal["encoder", "classification", "causal-lm", "tabular"]
BaseKind = Literal["causal-lm", "encoder"]  # what a registered base model directory holds

FORMAT_CLASSIFICATION: Final = "classification"  # {"text", "label"}
FORMAT_CHAT: Final = "chat"  # {"messages": [...]}
FORMAT_COMPLETION: Final = "completion"  # {"prompt", "completion"}
FORMAT_TEXT: Final = "text"  # {"text"}
FORMAT_TABULAR: Final = "tabular"  # {"features": [numbers], "label"}
# {"input": {"messages", "tools"?}, "preferred_output": [msg], "non_preferred_output": [msg]}
FORMAT_PREFERENCE: Final = "preference"

KIND_ENCODER: Final = "encoder"  # a base encoder: embeddings only
KIND_CLASSIFICATION: Final = "classification"  # a sequence classifier
KIND_CAUSAL_LM: Final = "causal-lm"  # a causal language model, or a LoRA adapter of one
KIND_TABULAR: Final = "tabular"  # tunehouse/mlp, designed from scratch

# The model kind each dataset format trains.
KIND_OF_FORMAT: Final[dict[str, ModelKind]] = {
    FORMAT_CLASSIFICATION: KIND_CLASSIFICATION,
    FORMAT_CHAT: KIND_CAUSAL_LM,
    FORMAT_COMPLETION: KIND_CAUSAL_LM,
    FORMAT_TEXT: KIND_CAUSAL_LM,
    FORMAT_TABULAR: KIND_TABULAR,
    FORMAT_PREFERENCE: KIND_CAUSAL_LM,
}
FORMATS: Final[tuple[DatasetFormat, ...]] = (
    FORMAT_CLASSIFICATION,
    FORMAT_CHAT,
    FORMAT_COMPLETION,
    FORMAT_TEXT,
    FORMAT_TABULAR,
    FORMAT_PREFERENCE,
)
# Formats that fine-tune a causal language model with method "supervised".
CAUSAL_FORMATS: Final[tuple[DatasetFormat, ...]] = (FORMAT_CHAT, FORMAT_COMPLETION, FORMAT_TEXT)
# Formats that train with method "dpo" (OpenAI's preference rows), and only with it.
PREFERENCE_FORMATS: Final[tuple[DatasetFormat, ...]] = (FORMAT_PREFERENCE,)
# Formats whose validation rows may only hold labels the training rows have.
LABELLED_FORMATS: Final[tuple[DatasetFormat, ...]] = (FORMAT_CLASSIFICATION, FORMAT_TABULAR)


def model_kind(format_or_kind: str) -> str:
    """The model kind a dataset format trains; a model kind maps to itself."""
    return KIND_OF_FORMAT.get(format_or_kind, format_or_kind)
