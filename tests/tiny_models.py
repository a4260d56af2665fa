"""Tiny causal language models built here, from nothing: a byte-level BPE tokenizer trained on
the texts a test will use, and a randomly initialised few-layer Llama or GPT-2, saved in Hugging
Face format with safetensors weights. Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer (exact round trips, like GPT-2's) trained on ``texts``; it has
    no chat template, so Tunehouse's default one is used for chat fine-tuning."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def build_causal_lm(
    path: Path,
    texts: Iterable[str],
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
    vocab_size: int = 600,
) -> Path:
    """Save a tiny randomly initialised causal LM and its tokenizer to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config: PretrainedConfig
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=True,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=hidden_size,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
