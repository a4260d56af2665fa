"""Hyperparameters: what "auto" and unset values resolve to when a job is created.

The resolved numbers are stored on the job (and shown in its ``hyperparameters``), so the
trainer never applies defaults of its own.
"""

from __future__ import annotations

import math
from typing import Any

from app.core.kinds import (
    CAUSAL_FORMATS,
    FORMAT_CLASSIFICATION,
    FORMAT_PREFERENCE,
    FORMAT_TABULAR,
)
from app.schemas import DpoHyperparametersRequest, HyperparametersRequest

LORA_LEARNING_RATE = 2e-4  # the default learning rate with a LoRA adapter
# DPO moves a model only a little from where it starts: TRL's DPOConfig learns at 1e-6 (a full
# fine-tune); an adapter, starting from nothing, needs more.
DPO_LEARNING_RATE = 1e-6
DPO_LORA_LEARNING_RATE = 1e-5
DPO_BETA = 0.1  # what beta "auto" resolves to: TRL's DPOConfig default
DPO_LOSS = "sigmoid"
SIMPO_GAMMA = 0.5  # TRL's CPOConfig default

# What every dataset format starts from.
_SHARED: dict[str, Any] = {
    "gradient_accumulation_steps": 1,
    "precision": "auto",  # resolved by the trainer on the device it gets
    "gradient_checkpointing": False,
    "torch_compile": False,
    "eval_every_steps": None,
    "checkpoint_every_steps": None,
    "max_grad_norm": 1.0,
}
_CAUSAL: dict[str, Any] = {
    "packing": True,  # rows share sequences, each attending only to itself
    "learning_rate": 5e-5,  # full fine-tuning; LORA_LEARNING_RATE with a LoRA adapter
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "max_seq_length": 1024,
}
# What differs by dataset format. A format missing here cannot be trained.
_BY_FORMAT: dict[str, dict[str, Any]] = {
    FORMAT_CLASSIFICATION: {
        "learning_rate": 1e-4,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "max_seq_length": 128,
        "packing": False,
    },
    **{fmt: _CAUSAL for fmt in CAUSAL_FORMATS},
    # Preference rows (method dpo) are never packed: each pair is scored row by row.
    FORMAT_PREFERENCE: {**_CAUSAL, "packing": False, "learning_rate": DPO_LEARNING_RATE},
    FORMAT_TABULAR: {
        "learning_rate": 1e-3,
        "batch_size": 64,  # what "auto" resolves to: rows are tiny
        "warmup_ratio": 0.0,
        "weight_decay": 1e-4,
        "packing": False,
    },
}
TRAINABLE_FORMATS = frozenset(_BY_FORMAT)
# The default learning rate with a LoRA adapter, where it is not LORA_LEARNING_RATE.
_LORA_LEARNING_RATES = {FORMAT_PREFERENCE: DPO_LORA_LEARNING_RATE}


def task_defaults(task: str) -> dict[str, Any]:
    """The defaults of a dataset format (the job's task), before the request's values."""
    return {**_BY_FORMAT[task], **_SHARED}


def _auto_epochs(task: str, rows: int) -> int:
    rows = max(rows, 1)
    if task == FORMAT_TABULAR:
        # Small networks on small tables: about 50k examples seen, 5 to 50 epochs.
        return max(5, min(50, math.ceil(50_000 / rows)))
    # Three epochs, stretched so tiny files see ~100 examples, capped near 25k for big ones.
    if rows * 3 < 100:
        return min(25, math.ceil(100 / rows))
    if rows * 3 > 25_000:
        return max(1, 25_000 // rows)
    return 3


def resolve_hyperparameters(
    task: str, rows: int, requested: HyperparametersRequest, *, lora: bool = False
) -> dict[str, Any]:
    """Turn "auto" and missing values into numbers, the way OpenAI sizes its defaults."""
    given = requested.model_dump(exclude_none=True)
    defaults = task_defaults(task)
    if lora:
        defaults["learning_rate"] = _LORA_LEARNING_RATES.get(task, LORA_LEARNING_RATE)
    resolved = dict(defaults)
    resolved.update({k: v for k, v in given.items() if v != "auto"})
    if "n_epochs" not in resolved:
        resolved["n_epochs"] = _auto_epochs(task, rows)
    if "batch_size" not in resolved:
        resolved["batch_size"] = 8 if rows < 500 else 16 if rows < 5000 else 32
    multiplier = resolved.get("learning_rate_multiplier", 1.0)
    resolved["learning_rate_multiplier"] = float(multiplier)
    if "learning_rate" not in given:
        resolved["learning_rate"] = defaults["learning_rate"] * multiplier
    return resolved


def resolve_dpo_hyperparameters(
    rows: int, requested: DpoHyperparametersRequest, *, lora: bool = False
) -> dict[str, Any]:
    """A DPO job's hyperparameters: those of every job, then beta ("auto": DPO_BETA), the loss,
    rpo_alpha (None: no SFT term) and, for the simpo loss only, simpo_gamma. Raises ValueError
    for simpo_gamma with another loss."""
    resolved = resolve_hyperparameters(FORMAT_PREFERENCE, rows, requested, lora=lora)
    loss = requested.loss or DPO_LOSS
    if requested.simpo_gamma is not None and loss != "simpo":
        raise ValueError(f"simpo_gamma applies to loss 'simpo' only, not to '{loss}'")
    beta = requested.beta
    resolved["beta"] = DPO_BETA if beta in (None, "auto") else float(beta)
    resolved["loss"] = loss
    resolved["rpo_alpha"] = requested.rpo_alpha
    if loss == "simpo":
        gamma = requested.simpo_gamma
        resolved["simpo_gamma"] = SIMPO_GAMMA if gamma is None else float(gamma)
    return resolved
