"""Reading weights from disk, one model at a time.

transformers' ``from_pretrained`` is not thread-safe: two loads at once in one process can leave
tied weights (a causal LM's ``lm_head``) on the meta device, because the switch that skips tying
during a load is process-wide (huggingface/transformers#44940; reproduced with 5.24 and four
threads loading a tiny Llama). Every ``from_pretrained`` of a model in the inference process goes
through ``load_pretrained``. No torch here.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

_FROM_PRETRAINED = threading.Lock()


def load_pretrained(model_class: Any, path: Path, **options: Any) -> Any:
    """``model_class.from_pretrained(path)`` from safetensors only, in eval mode."""
    with _FROM_PRETRAINED:
        model = model_class.from_pretrained(path, use_safetensors=True, **options)
    return model.eval()
