"""Reading weights from disk, one model at a time.

transformers' ``from_pretrained`` is not thread-safe: two loads at once in one process can leave
tied weights (a causal LM's ``lm_head``) on the meta device, because the switch that skips tying
during a load is process-wide (huggingface/transformers#44940; reproduced with 5.24 and four
threads loading a tiny Llama). Every ``from_pretrained`` of a model in the inference process goes
through ``load_pretrained``.

Nor is importing transformers: a thread that imports a name from it while another thread is
still importing the package gets "cannot import name ... from 'transformers'". The inference
runtime (torch, transformers, peft) is imported once per process by ``import_runtime``, under a
lock, before any model is built (``ModelCache._build``) and by the warmer at start-up. No torch
at this module's import.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

_FROM_PRETRAINED = threading.Lock()
_RUNTIME = threading.Lock()
_runtime_imported = False


def import_runtime() -> None:
    """Import torch, transformers' model classes and peft, once; a thread that comes while
    another imports them waits until they are whole."""
    global _runtime_imported
    if _runtime_imported:
        return
    with _RUNTIME:
        if not _runtime_imported:
            import peft  # noqa: F401  (LoRA adapters)
            import torch  # noqa: F401
            import transformers  # noqa: F401
            from transformers import AutoModel, AutoModelForCausalLM  # noqa: F401

            _runtime_imported = True


def load_pretrained(model_class: Any, path: Path, **options: Any) -> Any:
    """``model_class.from_pretrained(path)`` from safetensors only, in eval mode."""
    with _FROM_PRETRAINED:
        model = model_class.from_pretrained(path, use_safetensors=True, **options)
    return model.eval()
