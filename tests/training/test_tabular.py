"""The from-scratch MLP (`tunehouse/mlp`) on scikit-learn's bundled handwritten digits (real
data, no download): it learns them, stores what inference needs, and resumes exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.inference.architectures import MLP, load_mlp
from tests.training.support import Reporter, write_jsonl
from worker.training.checkpoint import latest_complete_checkpoint
from worker.training.loop import train
from worker.training.spec import TrainingResult, TrainingSpec, TrainingStopped

HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 20,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "checkpoint_every_steps": 30,
}
ARCHITECTURE = {"hidden_sizes": [128, 64], "activation": "relu", "dropout": 0.1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any, Any]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=0, stratify=data.target
    )
    root = tmp_path_factory.mktemp("digits")

    def rows(x: Any, y: Any) -> list[dict[str, Any]]:
        return [{"features": a.tolist(), "label": int(b)} for a, b in zip(x, y, strict=True)]

    train_file = write_jsonl(root / "train.jsonl", rows(x_train, y_train))
    test_file = write_jsonl(root / "test.jsonl", rows(x_test, y_test))
    return train_file, test_file, x_test, y_test


def make_spec(digits: Any, run_dir: Path) -> TrainingSpec:
    train_file, test_file, _, _ = digits
    return TrainingSpec(
        job_id="ftjob-digits",
        task="tabular",
        base_model_dir=None,
        training_file=train_file,
        validation_file=test_file,
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters=dict(HYPERPARAMETERS),
        seed=0,
        method={"type": "supervised", "supervised": {"architecture": ARCHITECTURE}},
    )


@pytest.fixture(scope="module")
def trained(digits: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingResult]:
    spec = make_spec(digits, tmp_path_factory.mktemp("run"))
    return spec.output_dir, train(spec, Reporter())


def predict(model_dir: Path, x: Any) -> list[str]:
    """Labels as the predictions route computes them: scale with the saved statistics."""
    model, config = load_mlp(model_dir)
    features = torch.tensor(x, dtype=torch.float32)
    mean = torch.tensor(config["feature_mean"], dtype=torch.float32)
    std = torch.tensor(config["feature_std"], dtype=torch.float32)
    with torch.no_grad():
        logits = model((features - mean) / std)
    return [config["labels"][i] for i in logits.argmax(dim=-1).tolist()]


def test_mlp_learns_handwritten_digits(digits: Any, trained: Any) -> None:
    _, _, x_test, y_test = digits
    model_dir, result = trained
    predicted = predict(model_dir, x_test)
    accuracy = sum(p == str(int(y)) for p, y in zip(predicted, y_test, strict=True)) / len(y_test)
    assert accuracy >= 0.95, accuracy
    # The loop scored the same model on the same rows: loading reproduces its predictions.
    assert result.final_metrics["valid_accuracy"] == pytest.approx(accuracy)
    assert (result.model_kind, result.adapter) == ("tabular", False)
    assert result.labels == [str(d) for d in range(10)]
    assert result.trained_tokens == HYPERPARAMETERS["n_epochs"] * 1437  # rows seen


def test_model_dir_holds_the_architecture_and_feature_statistics(digits: Any, trained: Any) -> None:
    model_dir, _ = trained
    assert {p.name for p in model_dir.iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architecture"] == "tunehouse/mlp"
    assert (config["input_size"], config["hidden_sizes"]) == (64, [128, 64])
    assert (config["activation"], config["dropout"]) == ("relu", 0.1)
    assert len(config["feature_mean"]) == len(config["feature_std"]) == 64
    # Pixels that are blank in every training image have std 0: scaled by 1, not divided by 0.
    assert 1.0 in config["feature_std"] and min(config["feature_std"]) > 0
    model, _ = load_mlp(model_dir)
    assert isinstance(model, MLP) and not model.training
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Softmax)]  # logits out


def test_resuming_gives_the_same_model(digits: Any, trained: Any, tmp_path: Path) -> None:
    model_dir, _ = trained
    spec = make_spec(digits, tmp_path)
    with pytest.raises(TrainingStopped):
        train(spec, Reporter(stop_after_step=40))
    checkpoint = latest_complete_checkpoint(spec.checkpoints_dir)
    assert checkpoint is not None and checkpoint.name == "step-30"
    train(replace(spec, resume_from=checkpoint), Reporter())
    a, b = (
        load_file(model_dir / "model.safetensors"),
        load_file(spec.output_dir / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
