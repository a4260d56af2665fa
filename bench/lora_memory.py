"""Memory of one base model with 1 and with 10 LoRA adapters loaded, against a second full copy.

    .venv/bin/python bench/lora_memory.py

Builds a causal LM (Llama shape: hidden 512, 8 layers; about 30M parameters, random weights)
and ten rank-8 LoRA adapters on its attention projections, then loads them the way the
inference routes do (``ModelCache.attach_adapter``: one shared base, adapters added by name)
and reads this process's resident memory after each step. The baseline is what one more full
copy of the model costs, which is what serving each fine-tune as its own model would add.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import build_causal_lm  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog and runs far away"] * 50


def rss_mib() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def tensor_mib(model: torch.nn.Module) -> float:
    """Bytes held by the model's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total / 2**20


def touch(model: Any, adapter: str | None = None) -> None:
    """One forward pass, so every weight is really in memory (safetensors maps files lazily).
    ``model`` is a transformers or peft model (as ``load_causal_lm`` and the cache give it)."""
    import torch

    if adapter is not None:
        model.set_adapter(adapter)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))


def make_adapters(base: Path, root: Path, count: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )  # fmt: skip
        path = root / f"adapter-{i}"
        get_peft_model(model, config).save_pretrained(str(path))
        paths.append(path)
        del model
    return paths


def main() -> None:
    from app.inference.generation import load_causal_lm
    from app.inference.registry import ModelCache

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = build_causal_lm(tmp / "base", TEXTS, hidden_size=512, layers=8, heads=8)
        adapters = make_adapters(base, tmp, 10)
        weights = (base / "model.safetensors").stat().st_size / 2**20
        adapter_size = (adapters[0] / "adapter_model.safetensors").stat().st_size / 2**20

        cache = ModelCache(capacity=32)
        before = rss_mib()
        shared = cache.attach_adapter(base, adapters[0], "a0").model
        touch(shared, "a0")
        one, one_bytes = rss_mib(), tensor_mib(shared)
        for i, path in enumerate(adapters[1:], start=1):
            cache.attach_adapter(base, path, f"a{i}")
            touch(shared, f"a{i}")
        ten, ten_bytes = rss_mib(), tensor_mib(shared)
        copy = load_causal_lm(base)
        touch(copy)
        with_copy, copy_bytes = rss_mib(), tensor_mib(copy)
        del copy

    print(f"base weights on disk {weights:.1f} MiB, one adapter on disk {adapter_size:.2f} MiB")
    print(f"{'':40}{'RSS growth MiB':>16}{'tensors MiB':>14}")
    print(f"{'base + 1 adapter':40}{one - before:>16.1f}{one_bytes:>14.1f}")
    print(f"{'base + 10 adapters':40}{ten - before:>16.1f}{ten_bytes:>14.1f}")
    per_adapter = (ten - one) / 9
    full_copy = with_copy - ten
    print(f"{'each extra adapter':40}{per_adapter:>16.2f}{(ten_bytes - one_bytes) / 9:>14.2f}")
    print(f"{'baseline: one more full copy':40}{full_copy:>16.1f}{copy_bytes:>14.1f}")
    print(f"ratio (extra adapter / full copy, RSS): {per_adapter / full_copy:.3f}")


if __name__ == "__main__":
    main()
