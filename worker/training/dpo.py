"""The "preference" kind: OpenAI's preference rows train a causal language model with DPO
(method "dpo").

A row is a prompt (``input.messages``, and ``tools``) with two replies: the preferred
(chosen) one and the other (rejected). Each reply is rendered after the prompt exactly as a
chat row's assistant turn is (``causal_lm.Chat``: the base's chat template, or Tunehouse's
default), and only the reply's tokens are scored. A batch of rows is one forward pass over its
chosen and its rejected sequences together; a sequence's log-prob is the sum of its reply's
token log-probs.

The losses are TRL's DPOTrainer's (and CPOTrainer's for SimPO), written here:
- sigmoid (DPO): -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)));
- ipo: ((pi_c - pi_r) - (ref_c - ref_r) - 1 / (2 beta))^2, with log-probs averaged over each
  reply's tokens;
- simpo: -logsigmoid(beta * (avg pi_c - avg pi_r) - gamma), no reference at all;
- with rpo_alpha, each row adds rpo_alpha times the chosen reply's mean token NLL (RPO). TRL
  averages that NLL over the batch's tokens; here it is averaged per row, so the loss of a row
  does not depend on the rows it is batched with (the loop's micro-batching and processes rely
  on that).
Rewards are beta times the log-ratios the loss uses (for simpo, beta times the average
log-prob), as TRL reports them.

The reference is the starting model: its log-probs for every training and validation row are
computed once, in one pass before the first step (``start_training``), and kept in the rows'
features and in every checkpoint (a resumed run takes them back rather than computing them
from weights that have moved). With a LoRA adapter the pass runs on the same network with the
adapter disabled (peft's ``disable_adapter``); a full fine-tune, or a job continuing a LoRA
model's adapter (whose starting model is the root base with that adapter), runs it on the model
as loaded, before it trains. Either way no second copy of the weights is ever held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, PreTrainedTokenizerBase

from app.core.kinds import FORMAT_PREFERENCE
from app.services.hyperparameters import DPO_BETA, SIMPO_GAMMA
from worker.training.causal_lm import (
    IGNORE_INDEX,
    CausalLM,
    Chat,
    context_length,
    continued_adapter_dir,
    forward,
    lora_settings,
    next_token_targets,
    padding_collate,
    teaches_nothing,
    warn_truncated,
)
from worker.training.registry import (
    Batch,
    Collate,
    Example,
    Features,
    Warn,
    no_warning,
    register,
)
from worker.training.spec import TrainingHyperparameters, TrainingSpec

LOSSES = ("sigmoid", "ipo", "simpo")
# The figures reported for the rows of a step (train_*) and of the validation set (valid_*).
PAIR_METRICS = (
    "reward_accuracy",
    "reward_margin",
    "rewards_chosen",
    "rewards_rejected",
    "logps_chosen",
    "logps_rejected",
)
SIDES = (("chosen", "preferred_output"), ("rejected", "non_preferred_output"))


@dataclass(frozen=True)
class DpoSettings:
    """The DPO hyperparameters; a job's were resolved when it was created, these defaults
    (the same) only fill in for a spec built by hand."""

    beta: float = DPO_BETA
    loss: str = "sigmoid"
    rpo_alpha: float | None = None
    simpo_gamma: float = SIMPO_GAMMA

    @classmethod
    def from_hyperparameters(cls, values: dict[str, Any]) -> DpoSettings:
        beta = values.get("beta")
        loss = values.get("loss") or "sigmoid"
        if loss not in LOSSES:
            raise ValueError(f"hyperparameter loss must be one of {', '.join(LOSSES)}")
        gamma = values.get("simpo_gamma")
        rpo = values.get("rpo_alpha")
        settings = cls(
            beta=DPO_BETA if beta in (None, "auto") else float(beta),
            loss=str(loss),
            rpo_alpha=None if rpo is None else float(rpo),
            simpo_gamma=SIMPO_GAMMA if gamma is None else float(gamma),
        )
        if settings.beta <= 0:
            raise ValueError("hyperparameter beta must be greater than 0")
        return settings

    @property
    def uses_reference(self) -> bool:
        return self.loss != "simpo"


@dataclass(frozen=True)
class PairScores:
    """Per row: the loss, and the rewards of the chosen and of the rejected reply."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    settings: DpoSettings,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> PairScores:
    """The loss of each row from summed reply log-probs (the policy's and the reference's) and
    the replies' token counts."""
    beta = settings.beta
    chosen_count = chosen_tokens.clamp(min=1).to(policy_chosen.dtype)
    rejected_count = rejected_tokens.clamp(min=1).to(policy_rejected.dtype)
    chosen_mean = policy_chosen / chosen_count  # the chosen reply's mean token log-prob
    if settings.loss == "simpo":
        chosen_rewards = beta * chosen_mean
        rejected_rewards = beta * policy_rejected / rejected_count
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - settings.simpo_gamma)
    else:
        chosen_ratio = policy_chosen - reference_chosen
        rejected_ratio = policy_rejected - reference_rejected
        if settings.loss == "ipo":  # IPO compares length-averaged log-probs
            chosen_ratio, rejected_ratio = (
                chosen_ratio / chosen_count,
                rejected_ratio / rejected_count,
            )
        logits = chosen_ratio - rejected_ratio
        if settings.loss == "ipo":
            losses = (logits - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * logits)
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    if settings.rpo_alpha is not None:  # RPO: the chosen reply's mean token NLL
        losses = losses - settings.rpo_alpha * chosen_mean
    return PairScores(losses, chosen_rewards.detach(), rejected_rewards.detach())


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-prob of its scored tokens (labels other than -100), and how
    many tokens that is."""
    logits = forward(model, batch).logits
    targets = next_token_targets(batch["labels"])
    token_logps = -F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_logps.sum(dim=-1), (targets != IGNORE_INDEX).sum(dim=-1)


class PairTotals:
    """The pair metrics of PAIR_METRICS (and the loss) summed over rows, kept on the device
    until read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows = 0

    def add(self, scores: PairScores, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        margin = scores.chosen_rewards - scores.rejected_rewards
        values = {
            "loss": scores.losses.detach(),
            "reward_accuracy": (margin > 0).float(),
            "reward_margin": margin,
            "rewards_chosen": scores.chosen_rewards,
            "rewards_rejected": scores.rejected_rewards,
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }
        for name, value in values.items():
            total = value.float().sum()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.rows += len(scores.losses)

    def floats(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.sums.items()}


@register(FORMAT_PREFERENCE)
class Preference(CausalLM):
    supports_packing = False  # a row is a pair of sequences, scored as one

    def __init__(self) -> None:
        super().__init__()
        self.settings = DpoSettings()
        self._chat = Chat()  # renders a reply after its prompt as chat SFT renders a turn
        self._step = PairTotals()
        self._reference: list[torch.Tensor] | None = None  # per dataset: [rows, 2]
        # A job continuing a LoRA parent's adapter starts from base + that adapter: its
        # reference keeps the adapter on (disabled, it would be the root base, not the parent).
        self._continues_adapter = False

    def prepare(self, spec: TrainingSpec, train_rows: Sequence[Example], labels: list[str]) -> None:
        config = AutoConfig.from_pretrained(spec.require_base_model_dir(), local_files_only=True)
        self.context_length = context_length(config)
        self.lora = lora_settings(spec)
        self._continues_adapter = continued_adapter_dir(spec) is not None
        self.settings = DpoSettings.from_hyperparameters(spec.hyperparameters)

    # -- rows to features --------------------------------------------------------------------

    def encode_examples(
        self,
        rows: Sequence[Example],
        tokenizer: Any | None,
        labels: list[str],
        hp: TrainingHyperparameters,
        warn: Warn = no_warning,
    ) -> list[Features]:
        assert tokenizer is not None
        limit = self.max_length(hp)
        features: list[Features] = []
        truncated = skipped = 0
        for row in rows:
            feature: Features = {}
            cut = False
            for side, key in SIDES:
                ids, row_labels = self.encode_reply(row, row[key][0], tokenizer)
                if len(ids) > limit:
                    cut = True
                    ids, row_labels = ids[:limit], row_labels[:limit]
                feature[f"{side}_ids"], feature[f"{side}_labels"] = ids, row_labels
            truncated += cut
            if any(teaches_nothing(feature[f"{side}_labels"]) for side, _ in SIDES):
                skipped += 1  # a reply cut off entirely: nothing to compare
                continue
            features.append(feature)
        warn_truncated(warn, truncated, skipped, len(rows), limit, "had a reply cut off entirely")
        return features

    def encode_reply(
        self, row: Example, reply: dict[str, Any], tokenizer: PreTrainedTokenizerBase
    ) -> tuple[list[int], list[int]]:
        """The prompt and one reply as a chat row whose only trained turn is the reply."""
        prompt = [{**message, "weight": 0} for message in row["input"]["messages"]]
        chat_row = {**row["input"], "messages": [*prompt, {**reply, "weight": 1}]}
        return self._chat.encode_row(chat_row, tokenizer)

    def feature_length(self, feature: Features) -> int:
        return len(feature["chosen_ids"]) + len(feature["rejected_ids"])

    def make_collate(self, tokenizer: Any | None, pad_to_multiple_of: int | None = None) -> Collate:
        assert tokenizer is not None
        padded = padding_collate(int(tokenizer.pad_token_id), pad_to_multiple_of)

        def collate(features: list[Features]) -> Batch:
            # The chosen sequences, then the rejected ones: one forward pass for both.
            sequences = [
                {"input_ids": f[f"{side}_ids"], "labels": f[f"{side}_labels"]}
                for side, _ in SIDES
                for f in features
            ]
            batch = padded(sequences)
            if all("reference_logps" in f for f in features):
                chosen = [f["reference_logps"][0] for f in features]
                rejected = [f["reference_logps"][1] for f in features]
                batch["reference_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
            return batch

        return collate

    # -- the reference -----------------------------------------------------------------------

    def start_training(
        self,
        model: torch.nn.Module,
        datasets: Sequence[list[Features]],
        batches: Callable[[list[Features]], Iterator[Batch]],
        saved: Any | None,
    ) -> None:
        if not self.settings.uses_reference:
            return
        if saved is not None:
            reference = [torch.as_tensor(values) for values in saved]
        else:
            reference = [self._reference_logps(model, rows, batches) for rows in datasets]
        if [len(values) for values in reference] != [len(rows) for rows in datasets]:
            raise ValueError("the checkpoint's reference log-probs do not match the rows")
        for rows, values in zip(datasets, reference, strict=True):
            for feature, (chosen, rejected) in zip(rows, values.tolist(), strict=True):
                feature["reference_logps"] = (chosen, rejected)
        self._reference = reference

    def _reference_logps(
        self,
        model: torch.nn.Module,
        rows: list[Features],
        batches: Callable[[list[Features]], Iterator[Batch]],
    ) -> torch.Tensor:
        """The starting model's (chosen, rejected) log-prob of each row: with a new LoRA
        adapter, the same network with the adapter disabled; with a continued one, as loaded
        (the parent's adapter on)."""
        fresh_adapter = self.lora is not None and not self._continues_adapter
        disable = getattr(model, "disable_adapter", None) if fresh_adapter else None
        values: list[torch.Tensor] = []
        with disable() if disable is not None else contextlib.nullcontext():
            for batch in batches(rows):
                logps = sequence_logps(model, batch)[0].float().cpu()
                values.append(logps.view(2, -1).T)
        return torch.cat(values) if values else torch.zeros(0, 2)

    def training_state(self) -> Any | None:
        return None if self._reference is None else [v.clone() for v in self._reference]

    # -- loss --------------------------------------------------------------------------------

    def _scores(
        self, model: torch.nn.Module, batch: Batch
    ) -> tuple[PairScores, torch.Tensor, torch.Tensor]:
        logps, counts = sequence_logps(model, batch)
        rows = logps.shape[0] // 2
        reference = batch.get("reference_logps")
        if reference is None:
            if self.settings.uses_reference:
                raise RuntimeError("the reference log-probs were not computed before training")
            reference = torch.zeros_like(logps)
        reference = reference.to(logps.device, logps.dtype)
        scores = preference_loss(
            self.settings,
            logps[:rows],
            logps[rows:],
            reference[:rows],
            reference[rows:],
            counts[:rows],
            counts[rows:],
        )
        return scores, logps[:rows], logps[rows:]

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        scores, chosen, rejected = self._scores(model, batch)
        self._step.add(scores, chosen, rejected)
        return scores.losses.sum()

    def loss_count(self, features: Sequence[Features]) -> int:
        return len(features)  # the loss is a mean over rows

    def begin_step(self) -> None:
        self._step = PairTotals()

    def step_metrics(self) -> dict[str, float]:
        totals = self._step.floats()
        totals.pop("loss", None)  # the loop reports the loss itself
        figures = {name: totals.get(name, 0.0) for name in PAIR_METRICS}
        figures["rows"] = float(self._step.rows)
        self._step = PairTotals()
        return figures

    # -- scores ------------------------------------------------------------------------------

    def eval_metrics(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        totals = PairTotals()
        for batch in batches:
            totals.add(*self._scores(model, batch))
        if not totals.rows:
            return {}
        return {f"valid_{name}": value / totals.rows for name, value in totals.floats().items()}
