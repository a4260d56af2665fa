"""Merge a LoRA adapter into its base model: ``python -m worker.merge BASE ADAPTER OUTPUT``.

Started by the API (``app/services/merged_models.py``) in a clean interpreter of its own, since
the API process never imports torch. The base loads as the inference process loads it
(``load_causal_lm``: safetensors only, its own dtype), the adapter is folded in with peft's
``merge_and_unload``, and OUTPUT receives a standalone Hugging Face directory: safetensors
weights, config, generation config and the adapter's tokenizer (with the chat template the job
trained with, or Tunehouse's default, as inference renders prompts). OUTPUT must not exist; the
caller removes it if this process fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.core.process import die_with_parent

log = logging.getLogger("tunehouse.merge")


def merge_adapter(base_dir: Path, adapter_dir: Path, output_dir: Path) -> None:
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    from app.inference.generation import load_causal_lm, load_tokenizer

    hf_logging.disable_progress_bar()
    base = load_causal_lm(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(safe_merge=True)
    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir)  # safetensors: transformers writes no other format
    # The tokenizer the adapter was saved with, as inference loads it (pad token, chat template).
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    load_tokenizer(adapter_dir if has_tokenizer else base_dir).save_pretrained(output_dir)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # the request that asked for the merge is gone with its process
    parser = argparse.ArgumentParser(prog="python -m worker.merge")
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    merge_adapter(args.base_dir, args.adapter_dir, args.output_dir)
    log.info("merged %s into its base", args.adapter_dir.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
