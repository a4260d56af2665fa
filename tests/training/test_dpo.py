"""DPO (worker/training/dpo.py) on tiny causal LMs built here.

- The losses (sigmoid, ipo, simpo, and RPO's SFT term) equal the formulas written out below on
  a fixed table of log-probs.
- A preference task: each prompt has two replies, a plain one (the style the base model was
  tuned to favour) and a cheerful one (preferred). After DPO the model prefers the cheerful
  reply on held-out prompts far more often than the model it started from.
- A LoRA DPO job holds one copy of the weights (its reference is the same network with the
  adapter disabled); a full one, its weights and AdamW's two moments, and no frozen copy.
- A paused DPO run resumes at the same step and ends with the same weights; two processes train
  the weights, and report the figures, of one.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import build_causal_lm
from tests.training import support
from tests.training.support import Reporter, write_jsonl
from tests.training.test_batches_and_precision import assert_close_weights
from worker.training.checkpoint import latest_complete_checkpoint
from worker.training.dpo import DpoSettings, preference_loss, sequence_logps
from worker.training.loop import train
from worker.training.registry import get_task_kind
from worker.training.spec import TrainingHyperparameters, TrainingSpec, TrainingStopped

TRAIN_TOPICS = [
    "apples", "rivers", "castles", "tigers", "clouds", "violins", "pepper", "rockets",
    "gardens", "mirrors", "candles", "harbors", "bridges", "forests", "lanterns", "pianos",
]  # fmt: skip
HELD_OUT_TOPICS = ["oceans", "mountains", "kittens", "trains", "meadows", "comets"]
SYSTEM = {"role": "system", "content": "you are a helpful assistant"}


def prompt(topic: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": f"tell me about {topic}"}]


def plain_reply(topic: str) -> str:
    return f"{topic} are fine."


def cheerful_reply(topic: str) -> str:
    return f"oh, {topic} are wonderful!"


def preference_rows(topics: list[str]) -> list[dict[str, Any]]:
    """OpenAI's preference rows: the cheerful reply preferred over the plain one."""
    return [
        {
            "input": {"messages": prompt(topic)},
            "preferred_output": [{"role": "assistant", "content": cheerful_reply(topic)}],
            "non_preferred_output": [{"role": "assistant", "content": plain_reply(topic)}],
        }
        for topic in topics
    ]


def plain_chat_rows(topics: list[str]) -> list[dict[str, Any]]:
    return [
        {"messages": [*prompt(t), {"role": "assistant", "content": plain_reply(t)}]} for t in topics
    ]


def style_texts() -> list[str]:
    topics = TRAIN_TOPICS + HELD_OUT_TOPICS
    texts = [f"tell me about {t} {plain_reply(t)} {cheerful_reply(t)}" for t in topics]
    return [*texts, SYSTEM["content"], "### user: ### assistant:"]


# The runs here are DPO's unless a test says otherwise.
make_spec = functools.partial(support.make_spec, method_type="dpo")


def plain_favouring_base(root: Path) -> Path:
    """A tiny Llama tuned briefly on plain replies: the base favours the plain style."""
    random_base = build_causal_lm(root / "random-llama", style_texts())
    rows = plain_chat_rows(TRAIN_TOPICS)
    spec = make_spec(
        "chat",
        random_base,
        write_jsonl(root / "plain.jsonl", rows),
        root / "plain",
        {"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "packing": False},
        method_type="supervised",
    )
    train(spec, Reporter())
    return spec.output_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plain_favouring_base(tmp_path_factory.mktemp("dpo-base"))


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("preferences")
    train_file = write_jsonl(root / "train.jsonl", preference_rows(TRAIN_TOPICS))
    valid_file = write_jsonl(root / "valid.jsonl", preference_rows(TRAIN_TOPICS[:4]))
    return train_file, valid_file


def preference_rate(model_dir: Path, tokenizer_dir: Path | None = None) -> float:
    """The share of held-out prompts whose cheerful reply has the higher log-prob, each reply
    rendered after its prompt as training renders it."""
    kind = get_task_kind("preference")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    hp = TrainingHyperparameters(max_seq_length=256)
    features = kind.encode_examples(preference_rows(HELD_OUT_TOPICS), tokenizer, [], hp)
    batch = kind.make_collate(tokenizer)(features)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logps = sequence_logps(model, batch)[0]
    rows = len(features)
    return float((logps[:rows] > logps[rows:]).float().mean())


# --- the loss ---------------------------------------------------------------------------------

# Per row: policy chosen, policy rejected, reference chosen, reference rejected (summed log-probs)
# and the chosen and rejected replies' token counts.
TABLE = torch.tensor(
    [
        [-12.0, -15.0, -13.0, -14.0, 4.0, 5.0],
        [-20.5, -18.0, -19.0, -19.5, 6.0, 3.0],
        [-3.25, -9.75, -3.0, -9.0, 2.0, 7.0],
        [-40.0, -40.0, -41.5, -38.0, 10.0, 12.0],
    ],
    dtype=torch.float64,
)


def reference_losses(row: list[float], settings: DpoSettings) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) of one row, from the papers' formulas."""
    pc, pr, rc, rr, nc, nr = row
    b = settings.beta

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    if settings.loss == "sigmoid":  # DPO, eq. 7
        loss = -log_sigmoid(b * ((pc - rc) - (pr - rr)))
        rewards = (b * (pc - rc), b * (pr - rr))
    elif settings.loss == "ipo":  # IPO, eq. 17, on length-averaged log-probs
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        loss = (h - 1 / (2 * b)) ** 2
        rewards = (b * (pc - rc) / nc, b * (pr - rr) / nr)
    else:  # SimPO: no reference, a target margin gamma
        loss = -log_sigmoid(b * (pc / nc) - b * (pr / nr) - settings.simpo_gamma)
        rewards = (b * pc / nc, b * pr / nr)
    if settings.rpo_alpha is not None:  # RPO: the chosen reply's mean token NLL
        loss += settings.rpo_alpha * (-pc / nc)
    return loss, *rewards


@pytest.mark.parametrize(
    "settings",
    [
        DpoSettings(beta=0.1),
        DpoSettings(beta=0.5),
        DpoSettings(beta=0.1, loss="ipo"),
        DpoSettings(beta=2.0, loss="simpo", simpo_gamma=0.5),
        DpoSettings(beta=0.1, rpo_alpha=1.0),
        DpoSettings(beta=0.3, loss="ipo", rpo_alpha=0.5),
    ],
    ids=["sigmoid", "sigmoid-beta-0.5", "ipo", "simpo", "sigmoid+rpo", "ipo+rpo"],
)
def test_the_loss_matches_the_formula(settings: DpoSettings) -> None:
    pc, pr, rc, rr, nc, nr = TABLE.T
    scores = preference_loss(settings, pc, pr, rc, rr, nc.long(), nr.long())
    expected = torch.tensor(
        [reference_losses(row, settings) for row in TABLE.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(scores.losses, expected[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores.chosen_rewards, expected[:, 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores.rejected_rewards, expected[:, 2], rtol=1e-12, atol=1e-12)


def test_the_sigmoid_loss_at_the_start_is_log_2() -> None:
    # Policy = reference: every log-ratio is 0, the loss log 2 and the rewards 0.
    logps = torch.tensor([-5.0, -7.0])
    counts = torch.tensor([3, 4])
    scores = preference_loss(DpoSettings(), logps, logps + 1, logps, logps + 1, counts, counts)
    torch.testing.assert_close(scores.losses, torch.full((2,), math.log(2)))
    assert not scores.chosen_rewards.any() and not scores.rejected_rewards.any()
    assert torch.equal(F.logsigmoid(torch.zeros(1)), -torch.tensor([math.log(2)]))


# --- rows to features -------------------------------------------------------------------------


def test_only_the_reply_is_scored_after_the_prompt_rendered_as_chat(base: Path) -> None:
    kind = get_task_kind("preference")
    tokenizer = AutoTokenizer.from_pretrained(base)
    row = preference_rows(["apples"])[0]
    (feature,) = kind.encode_examples([row], tokenizer, [], TrainingHyperparameters())
    for side, reply in (("chosen", cheerful_reply("apples")), ("rejected", plain_reply("apples"))):
        ids, labels = feature[f"{side}_ids"], feature[f"{side}_labels"]
        scored = [token for token in labels if token != -100]
        assert str(tokenizer.decode(scored)).startswith(reply)
        chat = [*prompt("apples"), {"role": "assistant", "content": reply}]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, tokenize=False)


# --- training ---------------------------------------------------------------------------------

# The base prefers the plain reply by about 19 nats a row: 20 steps undo that.
DPO_HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 10,
    "batch_size": 8,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.0,
    "beta": 0.1,
}


def test_dpo_makes_the_model_prefer_the_chosen_style_on_held_out_prompts(
    base: Path, preference_files: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, valid_file = preference_files
    spec = make_spec(
        "preference",
        base,
        train_file,
        tmp_path,
        DPO_HYPERPARAMETERS,
        validation_file=valid_file,
    )
    reporter = Reporter()
    result = train(spec, reporter)

    before, after = preference_rate(base), preference_rate(spec.output_dir)
    print(f"held-out preference rate: before DPO {before:.2f}, after DPO {after:.2f}")
    assert before <= 0.2 and after >= 0.8
    assert (result.model_kind, result.adapter) == ("causal-lm", False)
    first, last = reporter.metrics_events[0], reporter.metrics_events[-1]
    for name in (
        "train_loss",
        "train_reward_accuracy",
        "train_reward_margin",
        "train_rewards_chosen",
        "train_rewards_rejected",
        "train_logps_chosen",
        "train_logps_rejected",
        "valid_loss",
        "valid_reward_accuracy",
        "valid_reward_margin",
        "valid_rewards_chosen",
        "valid_rewards_rejected",
        "valid_logps_chosen",
        "valid_logps_rejected",
    ):
        assert name in last, name
    assert last["valid_reward_accuracy"] == 1.0 and last["valid_reward_margin"] > 0
    # The first step starts from the reference (loss log 2); the loss falls from there.
    assert last["valid_loss"] < 0.1 < first["train_loss"] <= math.log(2) + 1e-4


@pytest.mark.parametrize(
    "extensions",
    [{"loss": "simpo", "simpo_gamma": 0.5, "beta": 2.0}, {"loss": "ipo", "rpo_alpha": 0.5}],
    ids=["simpo", "ipo+rpo"],
)
def test_the_other_losses_train(
    base: Path, preference_files: tuple[Path, Path], tmp_path: Path, extensions: dict[str, Any]
) -> None:
    train_file, valid_file = preference_files
    hyperparameters = {**DPO_HYPERPARAMETERS, "n_epochs": 3, **extensions}
    spec = make_spec(
        "preference", base, train_file, tmp_path, hyperparameters, validation_file=valid_file
    )
    reporter = Reporter()
    train(spec, reporter)
    first, last = reporter.metrics_events[0], reporter.metrics_events[-1]
    assert last["valid_loss"] < first["valid_loss"]
    assert last["valid_reward_margin"] > first["valid_reward_margin"]


def _dpo_rank(rank: int, init_file: str, spec: TrainingSpec) -> None:
    """One rank of a group of two: train, and (rank 0) write the metrics events."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        reporter = Reporter()
        train(spec, reporter)
        if rank == 0:
            events = spec.output_dir.parent / "metrics.json"
            events.write_text(json.dumps(reporter.metrics_events))
    finally:
        dist.destroy_process_group()


def test_two_processes_train_and_report_as_one(
    base: Path, preference_files: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, valid_file = preference_files
    # 16 rows in batches of 3: the last batch of an epoch is one row, and rank 1's share of it
    # is empty (it runs a stand-in row whose loss and figures count for nothing).
    hyperparameters = {**DPO_HYPERPARAMETERS, "n_epochs": 2, "batch_size": 3}
    alone = make_spec(
        "preference", base, train_file, tmp_path / "alone", hyperparameters,
        validation_file=valid_file,
    )  # fmt: skip
    reporter = Reporter()
    train(alone, reporter)
    group = replace(alone, output_dir=tmp_path / "group" / "model", resources={"processes": 2})
    group.output_dir.parent.mkdir(parents=True)
    init_file = str(tmp_path / "init")
    mp.spawn(_dpo_rank, args=(init_file, group), nprocs=2, join=True)

    assert_close_weights(alone.output_dir, group.output_dir)
    events = json.loads((group.output_dir.parent / "metrics.json").read_text())
    assert [e["step"] for e in events] == [e["step"] for e in reporter.metrics_events]
    for together, single in zip(events, reporter.metrics_events, strict=True):
        for name in ("train_loss", "train_reward_accuracy", "train_reward_margin"):
            assert together[name] == pytest.approx(single[name], rel=1e-4, abs=1e-5), name


def live_tensor_storages() -> dict[int, int]:
    """The bytes of every tensor storage alive in this process, by its address."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if not tensor.is_meta:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return seen


@dataclass
class MemoryReporter(Reporter):
    """Measures the tensors alive after each optimizer step that were not alive before the run
    (the rest of the test session's tensors, models cached by earlier tests, do not count);
    keeps the most."""

    most: int = 0
    before: set[int] = field(default_factory=lambda: set(live_tensor_storages()))

    def progress(self, step: int, total_steps: int) -> None:
        super().progress(step, total_steps)
        if step:
            alive = live_tensor_storages()
            self.most = max(self.most, sum(n for p, n in alive.items() if p not in self.before))


def test_lora_dpo_holds_one_copy_of_the_weights(
    preference_files: tuple[Path, Path], tmp_path: Path
) -> None:
    # A base whose weights dwarf everything else the run keeps.
    base = build_causal_lm(tmp_path / "base", style_texts(), hidden_size=128, layers=4)
    weights = sum(
        t.numel() * t.element_size() for t in load_file(base / "model.safetensors").values()
    )
    train_file, valid_file = preference_files
    figures = {}
    for adapter in ("full", {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}):
        gc.collect()
        reporter = MemoryReporter()
        name = "full" if adapter == "full" else "lora"
        spec = make_spec(
            "preference",
            base,
            train_file,
            tmp_path / name,
            {**DPO_HYPERPARAMETERS, "n_epochs": 1},
            adapter=adapter,
            validation_file=valid_file,
        )
        train(spec, reporter)
        figures[name] = reporter.most
    print(
        f"weights {weights / 2**20:.1f} MiB; tensors alive while training: LoRA DPO "
        f"{figures['lora'] / 2**20:.1f} MiB ({figures['lora'] / weights:.2f}x the weights), "
        f"full DPO {figures['full'] / 2**20:.1f} MiB ({figures['full'] / weights:.2f}x)"
    )
    # LoRA: the weights once, plus the adapter and its optimizer state.
    assert weights <= figures["lora"] < 1.3 * weights
    # Full: the weights and AdamW's two moments (3x); a frozen reference copy would make 4x.
    assert 2.9 * weights <= figures["full"] < 3.5 * weights


def test_a_paused_dpo_run_resumes_exactly(
    base: Path, preference_files: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, _ = preference_files
    hyperparameters = {**DPO_HYPERPARAMETERS, "n_epochs": 3, "checkpoint_every_steps": 3}
    never_stopped = make_spec("preference", base, train_file, tmp_path / "a", hyperparameters)
    reporter = Reporter()
    train(never_stopped, reporter)

    stopped = replace(never_stopped, output_dir=tmp_path / "b", checkpoints_dir=tmp_path / "b-ckpt")
    with pytest.raises(TrainingStopped):
        train(stopped, Reporter(stop_after_step=3))
    checkpoint = latest_complete_checkpoint(stopped.checkpoints_dir)
    # 16 rows, 1 held out for evaluation: 2 steps an epoch; step 3 is mid-epoch.
    assert checkpoint is not None and checkpoint.name == "step-3"
    resumed = Reporter()
    train(replace(stopped, resume_from=checkpoint), resumed)
    assert ("Restarted from checkpoint at step 3", "info") in resumed.messages
    a = load_file(never_stopped.output_dir / "model.safetensors")
    b = load_file(stopped.output_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _same_figures(resumed.metrics_events[-1], reporter.metrics_events[-1])


def _same_figures(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same training and validation figures (throughput and memory aside)."""
    keys = [k for k in a if k.startswith(("train_", "valid_")) or k in ("step", "epoch")]
    return all(a[k] == b[k] for k in keys) and keys == [
        k for k in b if k.startswith(("train_", "valid_")) or k in ("step", "epoch")
    ]
