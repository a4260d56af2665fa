"""A continued classifier's head when its labels change (app/services/lineage.py).

The new model's classes are the new training file's, in sorted order as always. A class the
parent knew keeps its trained row of the output layer (its weights and bias), whatever its
position was; a new class gets a freshly initialised row; a class of the parent that the new
file lacks is dropped. The rest of the network is the parent's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch


def carry_label_rows(
    model: torch.nn.Module,
    parent: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    old_labels: list[str],
    new_labels: list[str],
    fresh: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """In ``model``'s output-layer tensors ``keys`` (one row per class), the rows of the
    classes both label lists hold are set to the parent's; the other rows are left as they
    are, or given to ``fresh`` to initialise (when the model was loaded with the parent's
    rows in place)."""
    params = dict(model.named_parameters())
    index = {label: i for i, label in enumerate(old_labels)}
    with torch.no_grad():
        for key in keys:
            target, rows = params[key], parent[key]
            for i, label in enumerate(new_labels):
                if label in index:
                    target[i] = rows[index[label]].to(target.dtype)
                elif fresh is not None:
                    fresh(target[i])


def output_keys(
    model: torch.nn.Module,
    parent: Mapping[str, torch.Tensor],
    old_count: int,
    new_count: int,
    skip_prefix: str = "",
) -> list[str]:
    """The parameters of ``model`` that hold one row per class, also in the ``parent``'s
    weights (one per parent class): the output layer. ``skip_prefix`` leaves out the
    backbone's."""
    keys = []
    for name, param in model.named_parameters():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        source = parent.get(name)
        if (
            source is not None
            and param.shape[:1] == (new_count,)
            and source.shape[:1] == (old_count,)
            and source.shape[1:] == param.shape[1:]
        ):
            keys.append(name)
    return keys
