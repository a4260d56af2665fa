"""Models designed from scratch: ``tunehouse/mlp``, the multilayer perceptron of the classic
PyTorch example, with its layers set in the job (docs/model-kinds.md).

The network outputs logits: the loss (CrossEntropyLoss) and the predictions route apply the
softmax themselves. A softmax inside the network as well, as in the classic example, would be
applied twice and flatten the gradients. Stored as config.json plus model.safetensors; loading
reads safetensors only. Imported by the training process and the inference routes, never by
app/api (it imports torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MLP_ARCHITECTURE = "tunehouse/mlp"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """input -> [Linear -> activation -> Dropout] per hidden size -> Linear -> logits."""

    def __init__(
        self,
        input_size: int,
        hidden_sizes: list[int],
        n_classes: int,
        activation: str = "relu",
        dropout: float = 0.1,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (use one of {list(ACTIVATIONS)})")
        layers: list[nn.Module] = []
        width = input_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def build_mlp(config: dict[str, Any]) -> MLP:
    """The (untrained) network a config.json describes."""
    if config.get("architecture") != MLP_ARCHITECTURE:
        raise ValueError(f"not a {MLP_ARCHITECTURE} model: {config.get('architecture')!r}")
    return MLP(
        input_size=int(config["input_size"]),
        hidden_sizes=[int(size) for size in config["hidden_sizes"]],
        n_classes=len(config["labels"]),
        activation=str(config["activation"]),
        dropout=float(config["dropout"]),
    )


def save_mlp(model: MLP, config: dict[str, Any], path: Path) -> None:
    """Write config.json (architecture, sizes, labels, feature statistics) and the weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**config, "architecture": MLP_ARCHITECTURE}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def load_mlp(path: Path) -> tuple[MLP, dict[str, Any]]:
    """The trained network stored at ``path`` (in eval mode, on the CPU) and its config."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE} is not a JSON object")
    model = build_mlp(config)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE), device="cpu"), strict=True)
    return model.eval(), config
