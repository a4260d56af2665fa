"""Packing for the generative kinds, on tiny causal LMs built here: several rows share one
sequence without attending to each other, with the loss, its token count and the gradients of
the same rows padded one per row; a packed run learns in fewer steps and resumes exactly; a
model that would let packed examples see each other trains unpacked, with a warning.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.support import FACTS, HELD_OUT_QUESTIONS, TRAIN_QUESTIONS, fact_chat_rows, fact_texts
from tests.tiny_models import EOS, build_causal_lm, build_tokenizer
from tests.training.support import Reporter, write_jsonl
from worker.training.causal_lm import IGNORE_INDEX, CausalLM, forward
from worker.training.checkpoint import latest_complete_checkpoint
from worker.training.loop import eval_batches, evaluate, train
from worker.training.registry import Features, get_task_kind
from worker.training.spec import TrainingHyperparameters, TrainingSpec, TrainingStopped

MAX_LENGTH = 128
# Three epochs of the 60 fact conversations (about 35 tokens each): 45 steps of 4 rows padded,
# 15 steps of 4 packed rows of 3 conversations.
RUN_HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 3,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "max_seq_length": MAX_LENGTH,
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        arch: build_causal_lm(root / arch, fact_texts(), arch=arch) for arch in ("llama", "gpt2")
    }


def make_spec(
    task: str,
    base: Path,
    run_dir: Path,
    hyperparameters: dict[str, Any],
    training_file: Path = Path("unused"),
    validation_file: Path | None = None,
) -> TrainingSpec:
    return TrainingSpec(
        job_id="ftjob-packing",
        task=task,
        base_model_dir=base,
        training_file=training_file,
        validation_file=validation_file,
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters=hyperparameters,
        seed=0,
    )


def completion_rows() -> list[dict[str, Any]]:
    """Prompts of varied length, so packing has rows of many sizes to fit together."""
    rng = random.Random(0)
    return [
        {"prompt": f"{question.format(kw=kw)} " * rng.randint(1, 3), "completion": code}
        for kw, code in FACTS.items()
        for question in TRAIN_QUESTIONS
    ]


ROWS = {
    "chat": fact_chat_rows(TRAIN_QUESTIONS),
    "completion": completion_rows(),
    # Text takes loss on every token, the first of each document too when unpacked.
    "text": [
        {"text": f"{q.format(kw=kw)} {code}"} for kw, code in FACTS.items() for q in TRAIN_QUESTIONS
    ],
}


def encoded(
    task: str, base: Path, rows: list[dict[str, Any]], **hp: Any
) -> tuple[CausalLM, Any, list[Features], TrainingHyperparameters]:
    """The kind prepared for `base` (packing checked), its tokenizer and the encoded rows."""
    kind = get_task_kind(task)
    assert isinstance(kind, CausalLM)
    hyperparameters = TrainingHyperparameters(**{"max_seq_length": MAX_LENGTH, **hp})
    spec = make_spec(task, base, Path("unused"), {})
    kind.prepare(spec, rows, [])
    tokenizer = kind.load_tokenizer(spec)
    return (
        kind,
        tokenizer,
        kind.encode_examples(rows, tokenizer, [], hyperparameters),
        hyperparameters,
    )


def segments(row: Features, key: str) -> list[list[int]]:
    """A packed row's `key` cut back into its examples."""
    out, start = [], 0
    for length in row["lengths"]:
        out.append(row[key][start : start + length])
        start += length
    assert start == len(row[key])
    return out


def loss_and_gradients(
    kind: CausalLM, model: torch.nn.Module, tokenizer: Any, features: list[Features]
) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean token loss of `features` as one batch (as the loop computes it), and its
    gradients."""
    model.zero_grad(set_to_none=True)
    loss = kind.loss_sum(model, kind.make_collate(tokenizer)(features)) / kind.loss_count(features)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("task", ["chat", "completion", "text"])
def test_packed_rows_give_the_loss_and_gradients_of_padded_rows(
    bases: dict[str, Path], task: str, arch: str
) -> None:
    kind, tokenizer, features, hp = encoded(task, bases[arch], ROWS[task][:24])
    packed = kind.pack(features, hp)
    assert kind.packing_off is None and len(packed) < len(features) / 2
    assert kind.loss_count(packed) == kind.loss_count(features)

    model = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()  # no dropout
    padded_loss, padded_grads = loss_and_gradients(kind, model, tokenizer, features)
    packed_loss, packed_grads = loss_and_gradients(kind, model, tokenizer, packed)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 4
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Validation rows are packed too: the same scores, and the same tokens counted.
    collate = kind.make_collate(tokenizer)
    with torch.no_grad():
        padded_scores = kind.eval_metrics(model, [collate(features[:10]), collate(features[10:])])
        packed_scores = kind.eval_metrics(model, [collate(packed)])
    assert (
        packed_scores.keys()
        == padded_scores.keys()
        == {
            "valid_loss",
            "valid_mean_token_accuracy",
        }
    )
    for key, value in padded_scores.items():
        assert packed_scores[key] == pytest.approx(value, rel=1e-5), key
    tokens = sum(len(f["input_ids"]) for f in features)
    assert kind.count_tokens(collate(packed)) == kind.count_tokens(collate(features)) == tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_examples_in_a_packed_row_do_not_attend_to_each_other(
    bases: dict[str, Path], arch: str
) -> None:
    kind, tokenizer, features, hp = encoded("completion", bases[arch], ROWS["completion"][:2])
    first, second = features
    model = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()
    collate = kind.make_collate(tokenizer, pad_to_multiple_of=8)

    def logits_in_row(before: Features) -> torch.Tensor:
        """The second example's logits, packed with `before` (beside it, padded alone)."""
        (row,) = kind.pack([before, second], hp)
        at = segments(row, "input_ids").index(second["input_ids"])
        start, n = sum(row["lengths"][:at]), len(second["input_ids"])
        batch = collate([row, *kind.pack([second], hp)])
        assert "attention_mask" not in batch
        with torch.no_grad():
            logits = forward(model, batch).logits
        torch.testing.assert_close(logits[1, :n], logits[0, start : start + n])
        return logits[0, start : start + n]

    other = {**first, "input_ids": [(t + 7) % len(tokenizer) for t in first["input_ids"]]}
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    torch.testing.assert_close(logits_in_row(first), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_in_row(other), alone, rtol=1e-5, atol=1e-5)


def test_packed_rows_keep_the_loss_masks(bases: dict[str, Path]) -> None:
    kind, tokenizer, features, hp = encoded("chat", bases["llama"], ROWS["chat"])
    packed = kind.pack(features, hp)
    answers = Counter(f"{code}{EOS}" for code in FACTS.values() for _ in TRAIN_QUESTIONS)
    trained: Counter[str] = Counter()
    for row in packed:
        assert len(row["lengths"]) > 1
        for ids, labels in zip(segments(row, "input_ids"), segments(row, "labels"), strict=True):
            assert labels[0] == IGNORE_INDEX  # nothing of this example predicts its first token
            assert all(
                label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True)
            )
            # Only the assistant's answer takes loss: the system and user turns do not.
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            assert tokenizer.decode(ids[:first]).endswith("### assistant:\n")
            trained[tokenizer.decode([label for label in labels if label != IGNORE_INDEX])] += 1
    assert trained == answers


def test_packing_is_deterministic_and_loses_nothing(bases: dict[str, Path]) -> None:
    # Text documents longer than max_seq_length are cut into pieces, packed like any row.
    documents = [{"text": " ".join(fact_texts()[i : i + n])} for i, n in enumerate(range(1, 40))]
    kind, _, features, hp = encoded("text", bases["llama"], documents, max_seq_length=64)
    assert max(len(f["input_ids"]) for f in features) == 64  # the long documents were cut
    packed = kind.pack(features, hp)
    again_kind, _, again_features, _ = encoded("text", bases["llama"], documents, max_seq_length=64)
    assert again_kind.pack(again_features, hp) == packed == kind.pack(features, hp)

    assert all(len(row["input_ids"]) <= 64 for row in packed)
    examples = Counter(tuple(ids) for row in packed for ids in segments(row, "input_ids"))
    assert examples == Counter(tuple(f["input_ids"]) for f in features)  # each once, whole
    tokens = sum(len(f["input_ids"]) for f in features)
    assert len(packed) <= math.ceil(tokens / 64) + 1  # the rows are nearly full


def test_text_documents_do_not_attend_to_each_other_when_packed(bases: dict[str, Path]) -> None:
    documents = [{"text": f"the code for {kw} is {code}."} for kw, code in FACTS.items()]
    kind, tokenizer, features, hp = encoded("text", bases["llama"], documents)
    (row,) = kind.pack(features, hp)  # all twelve documents in one sequence
    documents_in_row = segments(row, "input_ids")
    assert sorted(documents_in_row) == sorted(f["input_ids"] for f in features)
    model = AutoModelForCausalLM.from_pretrained(bases["llama"]).eval()
    with torch.no_grad():
        packed = forward(model, kind.make_collate(tokenizer)([row])).logits[0]
        start = 0
        for ids in documents_in_row:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            n = len(ids)
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


# --- training end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fact_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("facts")
    train_file = write_jsonl(root / "train.jsonl", fact_chat_rows(TRAIN_QUESTIONS))
    valid_file = write_jsonl(root / "valid.jsonl", fact_chat_rows(HELD_OUT_QUESTIONS))
    return train_file, valid_file


def run_spec(
    bases: dict[str, Path], files: tuple[Path, Path], run_dir: Path, **hp: Any
) -> TrainingSpec:
    return make_spec("chat", bases["llama"], run_dir, {**RUN_HYPERPARAMETERS, **hp}, *files)


@pytest.fixture(scope="module")
def packed_run(
    bases: dict[str, Path], fact_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingSpec, Any]:
    spec = run_spec(bases, fact_files, tmp_path_factory.mktemp("packed"), checkpoint_every_steps=2)
    return spec, train(spec, Reporter())


def valid_loss_before_training(bases: dict[str, Path]) -> float:
    rows = fact_chat_rows(HELD_OUT_QUESTIONS)  # the validation file's rows
    kind, tokenizer, features, _ = encoded("chat", bases["llama"], rows)
    model = AutoModelForCausalLM.from_pretrained(bases["llama"])
    batches = eval_batches(features, kind.make_collate(tokenizer), 8, torch.device("cpu"))
    return evaluate(kind, model, batches)["valid_loss"]


def test_packed_training_ends_where_unpacked_training_ends(
    bases: dict[str, Path], fact_files: tuple[Path, Path], packed_run, tmp_path: Path
) -> None:
    """Packing is the rows of each batch packed together: the same batches, the same steps,
    the same losses and so the same weights as unpacked, to float rounding."""
    packed_spec, packed = packed_run
    unpacked_spec = run_spec(bases, fact_files, tmp_path, packing=False)
    unpacked = train(unpacked_spec, Reporter())
    before = valid_loss_before_training(bases)

    assert packed.steps == unpacked.steps == 45  # 180 rows, 4 a step, 1 epoch...
    assert packed.trained_tokens == unpacked.trained_tokens
    assert packed.final_metrics["valid_loss"] < before * 0.75, (before, packed.final_metrics)
    assert packed.final_metrics == pytest.approx(unpacked.final_metrics, rel=1e-3)
    a = load_file(packed_spec.output_dir / "model.safetensors")
    b = load_file(unpacked_spec.output_dir / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)
    losses = [event["train_loss"] for event in packed.metrics_history]
    expected = [event["train_loss"] for event in unpacked.metrics_history]
    assert losses == pytest.approx(expected, rel=1e-4)


def test_a_packed_run_resumed_from_a_checkpoint_ends_as_if_never_stopped(
    bases: dict[str, Path], fact_files: tuple[Path, Path], packed_run, tmp_path: Path
) -> None:
    never_stopped, result = packed_run
    run = replace(never_stopped, output_dir=tmp_path / "model", checkpoints_dir=tmp_path / "ckpt")
    with pytest.raises(TrainingStopped):
        train(run, Reporter(stop_after_step=3))
    checkpoint = latest_complete_checkpoint(run.checkpoints_dir)
    assert checkpoint is not None and checkpoint.name == "step-2"
    resumed = train(replace(run, resume_from=checkpoint), Reporter())

    a = load_file(never_stopped.output_dir / "model.safetensors")
    b = load_file(run.output_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed.steps, resumed.trained_tokens) == (result.steps, result.trained_tokens)
    assert resumed.final_metrics == result.final_metrics


def test_packing_is_off_with_a_warning_where_the_model_lets_examples_attend_to_each_other(
    fact_files: tuple[Path, Path], tmp_path: Path
) -> None:
    # BLOOM takes position ids but ignores them (ALiBi from the attention mask): packed
    # examples would see each other, so the run trains every row alone.
    from transformers import BloomConfig, BloomForCausalLM

    base = tmp_path / "bloom"
    tokenizer = build_tokenizer(fact_texts())
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=4, eos_token_id=eos
    )
    torch.manual_seed(0)
    BloomForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    reporter = Reporter()
    spec = make_spec("chat", base, tmp_path, {**RUN_HYPERPARAMETERS, "n_epochs": 1}, *fact_files)
    result = train(spec, reporter)

    warnings = [text for text, level in reporter.messages if level == "warn"]
    assert warnings == [
        "packing is off: the bloom model lets examples packed in one sequence attend to each "
        "other; every row is trained on alone, padded"
    ]
    assert result.steps == 15  # 60 rows, 4 a step: unpacked
