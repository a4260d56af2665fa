"""How many bytes a loaded model holds, and giving them back to the operating system.

The cache budgets weights: the parameters and buffers of the torch modules a servable holds,
found by walking its attributes (a few levels down), each tensor storage counted once (tied
weights share one). A servable may say better itself with ``memory_bytes()`` (a quantized model,
whose packed weights are neither parameters nor buffers). A LoRA adapter counts its weight files;
the base it shares counts once, as its modules less the adapters' ``lora_`` parameters.

No torch at import: the walk only looks for modules when torch is already loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_DEPTH = 3  # attribute levels searched below a servable
_WIDE = 64  # containers larger than this (a tokenizer's vocabulary) are not searched
_PAUSE = 1.0  # seconds between two returns of memory to the operating system


def servable_bytes(servable: Any) -> int:
    """The bytes of the weights ``servable`` holds (its own ``memory_bytes()`` when it has
    one)."""
    own = getattr(servable, "memory_bytes", None)
    if callable(own):
        return int(own())
    return module_bytes(servable)


def module_bytes(root: Any, keep: Callable[[str], bool] = lambda name: True) -> int:
    """Bytes of the parameters (those whose name ``keep`` accepts) and buffers of every torch
    module reachable from ``root``, each storage once."""
    if "torch" not in sys.modules:
        return 0
    seen: set[int] = set()
    total = 0
    for module in _modules(root):
        named = [*module.named_parameters(), *module.named_buffers()]
        for name, tensor in named:
            if not keep(name) or tensor.is_meta:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def adapter_bytes(path: Path) -> int:
    """A LoRA adapter's bytes: its safetensors weight files (loaded at the same precision)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def base_bytes(servable: Any) -> int:
    """The bytes of the shared base under an adapter's servable: its modules less every
    adapter's ``lora_`` weights."""
    return module_bytes(servable, keep=lambda name: "lora_" not in name)


def _modules(root: Any) -> Iterator[Any]:
    import torch

    from app.inference.registry import Lease, ModelCache

    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        value, depth = stack.pop()
        # A lease's servable counts itself; a cache holds other models.
        if id(value) in seen or isinstance(value, Lease | ModelCache):
            continue
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            yield value
            continue
        if depth >= _DEPTH:
            continue
        children: list[Any]
        if isinstance(value, dict):
            children = list(value.values()) if len(value) <= _WIDE else []
        elif isinstance(value, list | tuple | set):
            children = list(value) if len(value) <= _WIDE else []
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            children = list(vars(value).values())
        else:
            children = []
        stack += [(child, depth + 1) for child in children]


def return_memory() -> None:
    """Collect what released models left in reference cycles, and hand the freed heap back to
    the operating system (glibc keeps freed memory for reuse otherwise)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Returner:
    """``return_memory`` in a background thread, once for any number of asks that come while
    it runs, and at most once per ``_PAUSE`` seconds: a full collection takes a tenth of a
    second with torch loaded (and holds the GIL), too long for the request whose lease's close
    evicted a model, and too often when models come and go many times a second."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ask(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tunehouse-return-memory", daemon=True
                )
                self._thread.start()
        self._asked.set()

    def _run(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            try:
                return_memory()
            except Exception:
                log.exception("returning memory failed")
            time.sleep(_PAUSE)


return_memory_soon = _Returner().ask


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
