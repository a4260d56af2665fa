"""Defaults that the API states in its schema and the trainer applies, kept in one place so
the two never disagree. No torch here.

Hyperparameter defaults are not here: they are resolved when a job is created
(``app/services/hyperparameters.py``) and stored on the job, so the trainer reads numbers.
"""

from __future__ import annotations

from typing import Any, Final, Literal

# ---- LoRA (method.supervised.adapter = {"type": "lora", ...}) ---------------------------------

LORA_R: Final = 8  # rank of the update matrices
LORA_ALPHA: Final = 16.0  # scaling: the update is multiplied by alpha / r
LORA_DROPOUT: Final = 0.05  # dropout on the adapter's input
# LoRA on the attention projections, where each architecture (config.json's model_type) names
# them; other architectures get peft's own per-model-type defaults.
LORA_TARGET_MODULES: Final[dict[str, tuple[str, ...]]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "c_proj"),
}


def lora_target_modules(model_type: str) -> list[str] | None:
    """The default modules LoRA adapts in a model of ``model_type``; None: peft's default."""
    modules = LORA_TARGET_MODULES.get(model_type)
    return list(modules) if modules else None


# ---- tunehouse/mlp (method.supervised.architecture) --------------------------------------------

Activation = Literal["relu", "gelu", "tanh"]
MLP_HIDDEN_SIZES: Final = (256, 128)  # widths of the hidden layers, input side first
MLP_ACTIVATION: Final[Activation] = "relu"
MLP_DROPOUT: Final = 0.1  # after each hidden layer


def default_architecture() -> dict[str, Any]:
    """The architecture of a tunehouse/mlp job that gives none, as the job stores it."""
    return {
        "hidden_sizes": list(MLP_HIDDEN_SIZES),
        "activation": MLP_ACTIVATION,
        "dropout": MLP_DROPOUT,
    }
