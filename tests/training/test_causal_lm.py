"""The generative kinds (chat, completion, text) on tiny causal LMs built here: a chat fine-tune,
full and LoRA, learns a keyword -> code-word task the base model cannot do; the loss is taken
exactly on the tokens a user would want generated; raw text is packed into blocks.

The chat fine-tunes start from a tiny Llama pre-trained on the same task with the code words
rotated (support.pretrain_on_other_facts), as real fine-tunes start from a pretrained model:
from random weights LoRA cannot learn at all, and a full fine-tune learns the training
phrasings but answers held-out ones well only for some seeds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.inference.templates import DEFAULT_CHAT_TEMPLATE
from tests.support import FACTS, HELD_OUT_QUESTIONS, TRAIN_QUESTIONS, fact_chat_rows, fact_texts
from tests.tiny_models import EOS, build_causal_lm
from tests.training.support import Reporter, make_spec, pretrain_on_other_facts, write_jsonl
from worker.training.causal_lm import IGNORE_INDEX
from worker.training.checkpoint import latest_complete_checkpoint
from worker.training.loop import eval_batches, evaluate, train
from worker.training.registry import get_task_kind
from worker.training.spec import TrainingHyperparameters, TrainingStopped

SYSTEM = {"role": "system", "content": "answer with the code word only"}
# Enough to answer held-out phrasings: 23/24 for the full and >= 22/24 for the LoRA fine-tune
# with each of seeds 0-6 on the pretrained base.
FULL_HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 15, "batch_size": 8, "learning_rate": 1e-3}
# Unpacked: the LoRA recipe (and the resume test's step count) is tuned for 8 rows per step,
# where 8 packed rows would hold about 30 of these short conversations.
LORA_HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 15,
    "batch_size": 8,
    "learning_rate": 1e-2,
    "packing": False,
}
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny-llama", fact_texts())


@pytest.fixture(scope="module")
def pretrained_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain_on_other_facts(tiny_llama, tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("facts")
    train_file = write_jsonl(root / "train.jsonl", fact_chat_rows(TRAIN_QUESTIONS))
    valid_file = write_jsonl(root / "valid.jsonl", fact_chat_rows(TRAIN_QUESTIONS[:1]))
    return train_file, valid_file


def answer(model: Any, tokenizer: Any, question: str) -> str:
    """The greedy reply to `question`, rendered as the chat route renders it."""
    prompt = tokenizer.apply_chat_template(
        [SYSTEM, {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def held_out_accuracy(model: Any, tokenizer: Any) -> float:
    model.eval()
    asked = [(q.format(kw=kw), a) for kw, a in FACTS.items() for q in HELD_OUT_QUESTIONS]
    return sum(answer(model, tokenizer, q) == a for q, a in asked) / len(asked)


def load_tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)


def test_the_base_models_cannot_answer(tiny_llama: Path, pretrained_llama: Path) -> None:
    tokenizer = load_tokenizer(tiny_llama)
    assert not tokenizer.chat_template
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    assert held_out_accuracy(AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer) < 0.2
    pretrained = AutoModelForCausalLM.from_pretrained(pretrained_llama)
    assert held_out_accuracy(pretrained, load_tokenizer(pretrained_llama)) < 0.2


def test_full_chat_fine_tune_learns_the_facts(
    pretrained_llama: Path, facts, tmp_path: Path
) -> None:
    train_file, valid_file = facts
    spec = make_spec(
        "chat", pretrained_llama, train_file, tmp_path, FULL_HYPERPARAMETERS, valid_file
    )
    result = train(spec, Reporter())

    assert (result.model_kind, result.adapter, result.labels) == ("causal-lm", False, [])
    assert {"valid_loss", "valid_mean_token_accuracy"} <= set(result.final_metrics)
    assert result.final_metrics["valid_mean_token_accuracy"] >= 0.9
    names = {p.name for p in spec.output_dir.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "adapter_config.json" not in names
    tokenizer = load_tokenizer(spec.output_dir)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # saved with the model
    model = AutoModelForCausalLM.from_pretrained(spec.output_dir, use_safetensors=True)
    assert held_out_accuracy(model, tokenizer) >= 0.9


def test_lora_chat_fine_tune_stores_only_the_adapter(
    pretrained_llama: Path, facts, tmp_path: Path
) -> None:
    from peft import PeftModel

    train_file, valid_file = facts
    spec = make_spec(
        "chat", pretrained_llama, train_file, tmp_path, LORA_HYPERPARAMETERS, valid_file, LORA
    )
    result = train(spec, Reporter())

    assert (result.model_kind, result.adapter) == ("causal-lm", True)
    names = {p.name for p in spec.output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert "model.safetensors" not in names and not [n for n in names if n.endswith(".bin")]
    config = json.loads((spec.output_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    base = AutoModelForCausalLM.from_pretrained(pretrained_llama, use_safetensors=True)
    model = PeftModel.from_pretrained(base, spec.output_dir)
    assert held_out_accuracy(model, load_tokenizer(spec.output_dir)) >= 0.9


def test_lora_resumes_exactly_and_merges(pretrained_llama: Path, facts, tmp_path: Path) -> None:
    from peft import PeftModel

    train_file, _ = facts
    hyperparameters = {**LORA_HYPERPARAMETERS, "n_epochs": 2, "checkpoint_every_steps": 5}
    never_stopped = make_spec(
        "chat", pretrained_llama, train_file, tmp_path / "a", hyperparameters, adapter=LORA
    )
    train(never_stopped, Reporter())

    stopped = replace(never_stopped, output_dir=tmp_path / "b", checkpoints_dir=tmp_path / "b-ckpt")
    with pytest.raises(TrainingStopped):
        train(stopped, Reporter(stop_after_step=12))
    checkpoint = latest_complete_checkpoint(stopped.checkpoints_dir)
    # 54 rows (6 held out for evaluation): 7 steps an epoch; step 10 is mid-epoch.
    assert checkpoint is not None and checkpoint.name == "step-10"
    assert not (checkpoint / "model.safetensors").exists()  # a LoRA checkpoint: the adapter
    train(replace(stopped, resume_from=checkpoint), Reporter())
    a = load_file(never_stopped.output_dir / "adapter_model.safetensors")
    b = load_file(stopped.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    merged = replace(
        never_stopped,
        output_dir=tmp_path / "merged",
        checkpoints_dir=tmp_path / "c",
        method={"supervised": {"adapter": {**LORA, "merge": True}}},
    )
    assert train(merged, Reporter()).adapter is False
    assert not (merged.output_dir / "adapter_config.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base = AutoModelForCausalLM.from_pretrained(pretrained_llama, use_safetensors=True)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, never_stopped.output_dir).eval()(ids).logits
        standalone = AutoModelForCausalLM.from_pretrained(merged.output_dir).eval()(ids).logits
    torch.testing.assert_close(adapted, standalone, atol=1e-4, rtol=1e-4)


def encode(task: str, base: Path, rows: list[dict[str, Any]], **hp: Any) -> tuple[Any, list[Any]]:
    kind = get_task_kind(task)
    spec = make_spec(task, base, Path("unused"), Path("unused"), {})
    kind.prepare(spec, rows, [])
    tokenizer = kind.load_tokenizer(spec)
    return tokenizer, kind.encode_examples(rows, tokenizer, [], TrainingHyperparameters(**hp))


def trained_text(tokenizer: Any, feature: dict[str, Any]) -> str:
    labelled = [label for label in feature["labels"] if label != IGNORE_INDEX]
    ids = feature["input_ids"]
    assert all(
        label in (IGNORE_INDEX, token) for token, label in zip(ids, feature["labels"], strict=True)
    )
    return str(tokenizer.decode(labelled))


@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE], ids=["default", "chatml"])
def test_chat_loss_is_on_weighted_assistant_turns_only(
    tiny_llama: Path, tmp_path: Path, template: str | None
) -> None:
    base = tiny_llama
    if template is not None:  # a base whose tokenizer brings its own template
        base = tmp_path / "base"
        base.mkdir()
        for file in tiny_llama.iterdir():
            (base / file.name).write_bytes(file.read_bytes())
        tokenizer = load_tokenizer(base)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(base)
    row = {
        "messages": [
            {"role": "system", "content": "answer with the code word only", "weight": 1},
            {"role": "user", "content": "what is the code for apple?", "weight": 1},
            {"role": "assistant", "content": "zorvik", "weight": 0},
            {"role": "user", "content": "code for river please", "weight": 1},
            {"role": "assistant", "content": "plemna", "weight": 1},
        ]
    }
    tokenizer, (feature,) = encode("chat", base, [row], max_seq_length=512)
    end = EOS if template is None else "<|im_end|>"
    assert trained_text(tokenizer, feature) == f"plemna{end}"
    # The trained tokens are exactly the answer the generation prompt asks for.
    prompt = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in row["messages"][:4]],
        tokenize=False,
        add_generation_prompt=True,
    )
    first = next(i for i, label in enumerate(feature["labels"]) if label != IGNORE_INDEX)
    assert tokenizer.decode(feature["input_ids"][:first]) == prompt


def test_completion_loss_is_on_the_completion_and_eos(tiny_llama: Path) -> None:
    rows = [{"prompt": "what is the code for apple? ", "completion": "zorvik"}]
    tokenizer, (feature,) = encode("completion", tiny_llama, rows)
    assert trained_text(tokenizer, feature) == f"zorvik{EOS}"
    assert tokenizer.decode(feature["input_ids"]) == f"what is the code for apple? zorvik{EOS}"


def test_text_is_packed_into_blocks_and_training_lowers_validation_loss(
    tiny_llama: Path, tmp_path: Path
) -> None:
    texts = [f"the code for {kw} is {code}." for kw, code in FACTS.items()]
    rows = [{"text": f"{t} {t.replace('the code', 'its code')}"} for t in texts]
    tokenizer, blocks = encode("text", tiny_llama, rows, max_seq_length=16)
    documents = [tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    # Each document (and its EOS) is cut into blocks of 16 tokens, its last one shorter:
    # nothing lost, no block spans two documents (packing puts blocks together, apart).
    assert [b["input_ids"] for b in blocks] == [
        d[i : i + 16] for d in documents for i in range(0, len(d), 16)
    ]
    assert all(b["labels"] == b["input_ids"] for b in blocks)  # every token trained

    train_file = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", rows)
    hyperparameters = {"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "max_seq_length": 16}
    spec = make_spec("text", tiny_llama, train_file, tmp_path, hyperparameters, valid_file)
    kind = get_task_kind("text")
    kind.prepare(spec, rows, [])
    before = evaluate(
        kind,
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        eval_batches(blocks, kind.make_collate(tokenizer), 8, torch.device("cpu")),
    )
    result = train(spec, Reporter())
    assert result.final_metrics["valid_loss"] < before["valid_loss"] * 0.7, (before, result)


def test_truncation_is_reported_and_capped_by_the_context_length(tmp_path: Path) -> None:
    # A base built for 32 positions: max_seq_length=4096 must become 32.
    base = build_causal_lm(tmp_path / "short", fact_texts(), max_positions=32, layers=1)
    short = {"prompt": "code for apple? ", "completion": "zorvik"}
    long = {"prompt": "code for apple? " * 12, "completion": "zorvik"}  # the answer is cut off
    longish = {"prompt": "code for river? ", "completion": "plemna " * 12}
    rows = [short] * 6 + [long] * 2 + [longish]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    hyperparameters = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 4096}
    spec = make_spec("completion", base, train_file, tmp_path, hyperparameters, train_file)
    reporter = Reporter()
    train(spec, reporter)
    warnings = [text for text, level in reporter.messages if level == "warn"]
    assert (
        "3 of 9 rows were longer than max_seq_length=32 and were truncated; 2 of them had "
        "nothing left to learn from and were skipped (training data)"
    ) in warnings
    assert any(w.startswith("3 of 9 rows were longer") and "validation" in w for w in warnings)


def test_lora_targets_the_attention_of_each_architecture(tmp_path: Path) -> None:
    base = build_causal_lm(tmp_path / "gpt2", fact_texts(), arch="gpt2", layers=1)
    spec = make_spec("chat", base, Path("unused"), tmp_path, {}, adapter={"type": "lora"})
    kind = get_task_kind("chat")
    kind.prepare(spec, [], [])
    model = kind.load_model(spec, [])
    from peft import LoraConfig, PeftModel

    assert isinstance(model, PeftModel)
    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.target_modules is not None
    assert set(config.target_modules) == {"c_attn", "c_proj"}
    assert (config.r, config.lora_alpha, config.fan_in_fan_out) == (8, 16, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
