"""The generative kinds: "chat", "completion" and "text" fine-tune a causal language model.

They share everything but how a row becomes tokens and labels:
- chat: the conversation rendered with the tokenizer's chat template (or Tunehouse's default,
  saved with the model), with the row's tools if any (docs/tool-calling.md); loss only on
  assistant turns with weight 1, their content and tool calls;
- completion: the prompt followed by the completion and EOS; loss on the completion and EOS;
- text: every row followed by EOS, cut into pieces of max_seq_length tokens when longer; loss
  on every token.

Labels are -100 where no loss is taken. Position i predicts token i+1, so the first answer
token is learnt from the last prompt token.

Packing (hyperparameter `packing`, on unless false): several encoded rows share one sequence of
at most max_seq_length tokens, placed best-fit longest first, so a sequence is mostly tokens
and not padding. A packed row keeps the length of each example; its position ids restart at 0
for each one and the batch carries no attention mask, from which transformers builds a
block-diagonal causal mask (sdpa, eager) or cuts the varlen sequences (flash attention): no
example attends to another. Each example's first token takes no loss (it would be predicted
from the previous example's last token), so the loss and its token count are exactly those of
the unpacked rows. Whether the model really keeps packed examples apart is checked once per
run on the loaded model; where it does not, every row is trained on alone, padded.

LoRA (method.supervised.adapter = {"type": "lora", ...}) wraps the base with peft: only the
adapter trains, checkpoints hold only the adapter, and the job stores only the adapter (or,
with "merge": true, the merged standalone model).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from app.core.defaults import LORA_ALPHA, LORA_DROPOUT, LORA_R, lora_target_modules
from app.core.kinds import FORMAT_CHAT, FORMAT_COMPLETION, FORMAT_TEXT, KIND_CAUSAL_LM
from app.inference.templates import ensure_chat_template
from app.inference.tool_calls import render_chat
from worker.training.registry import (
    Batch,
    Collate,
    Example,
    Features,
    TaskKind,
    Warn,
    no_warning,
    register,
)
from worker.training.spec import TrainingHyperparameters, TrainingSpec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that takes no loss (PyTorch's cross_entropy default)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Architectures whose linear layers are transposed (GPT-2's Conv1D): peft must know.
FAN_IN_FAN_OUT = {"gpt2"}

Span = tuple[int, int]  # [start, end) character offsets of text that takes loss
# What the model's forward is given from a batch; a packed batch has no attention mask, and
# carries its count of real tokens (num_tokens) for trained_tokens.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Two short token sequences the packing check runs, packed together and alone (ids taken modulo
# the vocabulary, so any model has them).
PROBE_ROWS = ([3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5])


@dataclass(frozen=True)
class LoraSettings:
    r: int = LORA_R
    alpha: float = LORA_ALPHA
    dropout: float = LORA_DROPOUT
    target_modules: list[str] | None = None  # None: the per-architecture default
    merge: bool = False  # store the merged standalone model instead of the adapter


class LoadResult(Protocol):
    """What ``load_state_dict`` returns (peft annotates it as a bare ``namedtuple``)."""

    unexpected_keys: list[str]


def lora_settings(spec: TrainingSpec) -> LoraSettings | None:
    """The job's LoRA settings; None for full fine-tuning (adapter "full" or absent)."""
    adapter = spec.method_settings.get("adapter", "full")
    if adapter in (None, "full"):
        return None
    if not isinstance(adapter, dict) or adapter.get("type") != "lora":
        raise ValueError(f'the method\'s adapter must be "full" or a LoRA spec, got {adapter!r}')
    defaults = LoraSettings()

    def given(key: str, default: Any) -> Any:  # a key that is absent or null takes the default
        value = adapter.get(key)
        return default if value is None else value

    targets = adapter.get("target_modules")
    return LoraSettings(
        r=int(given("r", defaults.r)),
        alpha=float(given("alpha", defaults.alpha)),
        dropout=float(given("dropout", defaults.dropout)),
        target_modules=[str(name) for name in targets] if targets else None,
        merge=bool(given("merge", defaults.merge)),
    )


def continued_adapter_dir(spec: TrainingSpec) -> Path | None:
    """The LoRA parent's adapter directory when the job continues that adapter (its
    parent_adapter "continue"); None otherwise."""
    parent = spec.parent
    if parent is None or not parent.adapter or parent.merge_adapter:
        return None
    return parent.path


def starting_weights(spec: TrainingSpec, lora: LoraSettings | None) -> torch.nn.Module:
    """The full weights a job starts from: its base model's, or its full parent's (then
    spec.base_model_dir), or its LoRA parent's adapter folded into the base
    (merge_and_unload) when the job does not continue that adapter."""
    base = load_base_model(spec.require_base_model_dir())
    parent = spec.parent
    if parent is not None and parent.adapter and (lora is None or parent.merge_adapter):
        from peft import PeftModel

        folded = PeftModel.from_pretrained(base, parent.path, is_trainable=False)
        base = folded.merge_and_unload()
        base.requires_grad_(True)  # peft froze the base's weights
    return base


def context_length(config: Any) -> int | None:
    """The most positions the model was built for (GPT-2 calls it n_positions)."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def load_base_model(path: Path) -> torch.nn.Module:
    # Weights are trained in float32 whatever the checkpoint's dtype: AdamW updates to bf16
    # weights are mostly rounded away. Never trust_remote_code: the architecture must be one
    # transformers ships.
    return AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, local_files_only=True, dtype=torch.float32
    )


def encode_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: Sequence[Span]
) -> tuple[list[int], list[int]]:
    """Token ids of `text` (tokenized whole, as inference sees it) and their labels: a token
    takes loss when it starts inside one of `spans`."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


class CausalLM(TaskKind):
    """What the generative kinds share: model, tokenizer, truncation, batching, scoring."""

    model_kind = KIND_CAUSAL_LM

    supports_packing = True

    def __init__(self) -> None:
        self.context_length: int | None = None  # from the base config, in prepare
        self.lora: LoraSettings | None = None
        self.packing_off: str | None = None  # why this run's model cannot be packed for
        # The model prepare loaded to check packing, and the weights_dir it came from: the
        # loop's load_model gets it instead of loading it again.
        self._loaded: tuple[Path | None, torch.nn.Module] | None = None

    # -- model and tokenizer -----------------------------------------------------------------

    def prepare(self, spec: TrainingSpec, train_rows: Sequence[Example], labels: list[str]) -> None:
        config = AutoConfig.from_pretrained(spec.require_base_model_dir(), local_files_only=True)
        self.context_length = context_length(config)
        self.lora = lora_settings(spec)
        self.packing_off, self._loaded = None, None
        if TrainingHyperparameters.from_dict(spec.hyperparameters).packing is not False:
            # Packing is exact only if the architecture keeps packed examples apart: checked on
            # the very model the run trains. Loaded from a seed of its own, as the loop loads
            # it right after seeding, so the weights (a LoRA adapter's init) are the same.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = self.load_model(spec, labels, weights_dir=spec.resume_from)
            self.packing_off = packing_problem(model)
            self._loaded = (spec.resume_from, model)

    def load_tokenizer(self, spec: TrainingSpec) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.require_base_model_dir(), local_files_only=True
        )
        if not tokenizer.is_fast:  # offsets map rendered text back to messages
            raise ValueError("fine-tuning a causal LM needs a fast tokenizer (tokenizer.json)")
        if tokenizer.pad_token is None:  # padding is masked out; any token will do
            tokenizer.pad_token = tokenizer.eos_token
        # Saved with the model, so inference renders prompts exactly as training did.
        if ensure_chat_template(tokenizer):
            logger.info("the base tokenizer has no chat template; using Tunehouse's default")
        return tokenizer

    def load_model(
        self, spec: TrainingSpec, labels: list[str], weights_dir: Path | None = None
    ) -> torch.nn.Module:
        if self._loaded is not None and self._loaded[0] == weights_dir:
            model, self._loaded = self._loaded[1], None
            return model
        lora = lora_settings(spec)
        if lora is None and weights_dir is not None:
            return load_base_model(weights_dir)
        base = starting_weights(spec, lora)
        if lora is None:
            return base
        from peft import get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        model = get_peft_model(base, self._lora_config(base, lora))
        # A checkpoint holds the adapter only; a job continuing a LoRA parent's adapter starts
        # from the parent's.
        adapter_dir = weights_dir or continued_adapter_dir(spec)
        if adapter_dir is not None:
            result: LoadResult = set_peft_model_state_dict(
                model, load_file(adapter_dir / ADAPTER_WEIGHTS)
            )
            if result.unexpected_keys:
                raise ValueError(f"the saved adapter does not fit: {result.unexpected_keys}")
        return model

    @staticmethod
    def _lora_config(base: torch.nn.Module, lora: LoraSettings) -> Any:
        from peft import LoraConfig, TaskType

        model_type = getattr(base.config, "model_type", "")
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; it only divides by r
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules or lora_target_modules(model_type),
            fan_in_fan_out=model_type in FAN_IN_FAN_OUT,
            task_type=TaskType.CAUSAL_LM,
        )

    def save_final_model(self, model: torch.nn.Module, tokenizer: Any | None, path: Path) -> None:
        if self.lora is not None and self.lora.merge:
            # The adapter folded into the base weights: a standalone model, served alone.
            # A peft model here; nn.Module types such attributes as Tensor | Module.
            model = model.merge_and_unload()  # type: ignore[operator]
        self.save_model(model, tokenizer, path)

    def stores_adapter(self, spec: TrainingSpec) -> bool:
        lora = lora_settings(spec)
        return lora is not None and not lora.merge

    # -- rows to features --------------------------------------------------------------------

    def max_length(self, hp: TrainingHyperparameters) -> int:
        if self.context_length is not None and hp.max_seq_length > self.context_length:
            logger.info(
                "max_seq_length %d capped at the model's %d", hp.max_seq_length, self.context_length
            )
            return self.context_length
        return hp.max_seq_length

    def encode_row(
        self, row: Example, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[list[int], list[int]]:
        """One row's token ids and labels, before truncation."""
        raise NotImplementedError

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
            ids, row_labels = self.encode_row(row, tokenizer)
            if len(ids) > limit:
                truncated += 1
                ids, row_labels = ids[:limit], row_labels[:limit]
            if teaches_nothing(row_labels):
                skipped += 1
                continue
            features.append({"input_ids": ids, "labels": row_labels})
        warn_truncated(warn, truncated, skipped, len(rows), limit, "had nothing left to learn from")
        return features

    # -- batches -----------------------------------------------------------------------------

    def pack(
        self, features: list[Features], hp: TrainingHyperparameters, warn: Warn = no_warning
    ) -> list[Features]:
        if self.packing_off is not None:  # the loop said so, once
            return features
        return pack_features(features, self.max_length(hp))

    def make_collate(self, tokenizer: Any | None, pad_to_multiple_of: int | None = None) -> Collate:
        assert tokenizer is not None
        pad_id = int(tokenizer.pad_token_id)
        padded = padding_collate(pad_id, pad_to_multiple_of)
        packed = packed_collate(pad_id, pad_to_multiple_of)
        return lambda features: (
            packed(features) if any("lengths" in f for f in features) else padded(features)
        )

    def count_tokens(self, batch: Batch) -> int:
        if "num_tokens" in batch:  # packed: no attention mask to count
            return int(batch["num_tokens"])
        return super().count_tokens(batch)

    # -- loss --------------------------------------------------------------------------------

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # Summed over the predicted tokens (not averaged), so every token of an optimizer step
        # weighs the same whatever micro-batch it is in.
        logits = forward(model, batch).logits
        targets = next_token_targets(batch["labels"])
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def loss_count(self, features: Sequence[Features]) -> int:
        return sum(sum(1 for label in f["labels"][1:] if label != IGNORE_INDEX) for f in features)

    # -- scores ------------------------------------------------------------------------------

    def eval_metrics(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        # Summed over tokens, not averaged per batch: every scored token counts the same.
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            predicted = forward(model, batch).logits.float()
            targets = next_token_targets(batch["labels"])
            scored = targets != IGNORE_INDEX
            loss_sum += float(
                F.cross_entropy(
                    predicted.reshape(-1, predicted.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            correct += int(((predicted.argmax(dim=-1) == targets) & scored).sum())
            count += int(scored.sum())
        if count == 0:
            return {}
        return {"valid_loss": loss_sum / count, "valid_mean_token_accuracy": correct / count}


def teaches_nothing(labels: Sequence[int]) -> bool:
    """Whether a row's labels train nothing. A label on the first token is never used (nothing
    predicts it), so a row needs one after it to teach anything."""
    return all(label == IGNORE_INDEX for label in labels[1:])


def warn_truncated(
    warn: Warn, truncated: int, skipped: int, rows: int, limit: int, why_skipped: str
) -> None:
    """Tell the user how many of ``rows`` were cut to max_seq_length, and how many of those were
    skipped for ``why_skipped``."""
    if not truncated:
        return
    note = f"{truncated} of {rows} rows were longer than max_seq_length={limit} and were truncated"
    if skipped:
        note += f"; {skipped} of them {why_skipped} and were skipped"
    warn(note)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position is scored against: position i predicts label i+1, the last position
    nothing. Shifting the labels rather than cutting the last position off the logits spares
    a copy of the logits, and of their gradient, as large as batch x length x vocabulary."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def forward(model: torch.nn.Module, batch: Batch) -> Any:
    """The model's output on a batch. No cache: training needs none, and transformers looks for
    packed examples in the position ids only when there is none (nor an attention mask)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    return model(**inputs, use_cache=False)


def padded_width(features: list[Features], pad_to_multiple_of: int | None) -> int:
    width = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


def padded_ids_and_labels(
    features: list[Features], pad_id: int, pad_to_multiple_of: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' ids and labels padded on the right: ids with the pad token, labels with -100."""
    shape = (len(features), padded_width(features, pad_to_multiple_of))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return input_ids, labels


def padding_collate(
    pad_id: int, pad_to_multiple_of: int | None = None
) -> Callable[[list[Features]], Batch]:
    """Pad a batch to its own longest row (on the right), rounded up to a multiple of
    `pad_to_multiple_of`: ids with the pad token, labels with -100, attention mask 0."""

    def collate(features: list[Features]) -> Batch:
        input_ids, labels = padded_ids_and_labels(features, pad_id, pad_to_multiple_of)
        attention_mask = torch.zeros_like(input_ids)
        for i, f in enumerate(features):
            attention_mask[i, : len(f["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def packed_collate(
    pad_id: int, pad_to_multiple_of: int | None = None
) -> Callable[[list[Features]], Batch]:
    """Pad packed rows (on the right) into one batch with position ids restarting at 0 for
    each example and no attention mask: transformers then keeps the examples apart. Padding
    has position 0, so each pad token is an example of its own, seen by no real token (and
    never past the model's positions, however the width is rounded); its labels are -100."""

    def collate(features: list[Features]) -> Batch:
        input_ids, labels = padded_ids_and_labels(features, pad_id, pad_to_multiple_of)
        position_ids = torch.zeros_like(input_ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            lengths = f.get("lengths", [n])
            position_ids[i, :n] = torch.cat([torch.arange(length) for length in lengths])
        real = sum(len(f["input_ids"]) for f in features)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "num_tokens": torch.tensor(real),
        }

    return collate


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of items grouped into bins of `capacity`: longest item first, each into the
    fullest bin it fits in (ties: the oldest bin), else a new bin. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin), sorted: the best fit is a bisect
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
        else:
            space, b = capacity, len(bins)
            bins.append([i])
        bisect.insort(free, (space - lengths[i], b))
    return bins


def pack_features(features: Sequence[Features], max_length: int) -> list[Features]:
    """Encoded rows packed into sequences of at most `max_length` tokens. A packed row keeps
    each example's length; each example's first token takes no loss, as in an unpacked row
    (nothing before it in the example predicts it)."""
    packed: list[Features] = []
    for group in best_fit_decreasing([len(f["input_ids"]) for f in features], max_length):
        input_ids: list[int] = []
        labels: list[int] = []
        for i in group:
            input_ids += features[i]["input_ids"]
            labels += [IGNORE_INDEX, *features[i]["labels"][1:]]
        lengths = [len(features[i]["input_ids"]) for i in group]
        packed.append({"input_ids": input_ids, "labels": labels, "lengths": lengths})
    return packed


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why packing would not be exact for `model`, or None when it is: two short rows packed
    into one sequence (and one padded beside it) must give each the logits it has alone."""
    vocab_size = int(getattr(model.config, "vocab_size", 0) or 0) or 1
    first, second = ([token % vocab_size for token in row] for row in PROBE_ROWS)
    packed = pack_features(
        [{"input_ids": row, "labels": row} for row in (first, second)], len(first + second)
    )
    alone = [{"input_ids": second, "labels": second, "lengths": [len(second)]}]
    batch = packed_collate(0)(packed + alone)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = forward(model, batch).logits.float()
            first_alone = model(input_ids=torch.tensor([first]), use_cache=False).logits
            second_alone = model(input_ids=torch.tensor([second]), use_cache=False).logits
    except (TypeError, ValueError, RuntimeError) as error:
        return f"the {model_type} model cannot take packed rows ({error})"
    finally:
        model.train(training)
    n, m = len(first), len(second)
    pairs = [
        (together[0, :n], first_alone[0]),  # best fit puts the longer row first
        (together[0, n : n + m], second_alone[0]),
        (together[1, :m], second_alone[0]),  # a row padded beside a packed one
    ]
    if not all(torch.allclose(a, b.float(), rtol=1e-3, atol=1e-4) for a, b in pairs):
        return (
            f"the {model_type} model lets examples packed in one sequence attend to each "
            "other; every row is trained on alone, padded"
        )
    return None


# --- the three kinds --------------------------------------------------------------------------


def chat_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its trained assistant turns
    (role "assistant", weight 1 or absent): their content and their tool calls.

    The conversation is rendered (with ``tools``, app/inference/tool_calls.py) again up to each
    message, so any template works: a turn's span runs from the end of the prompt that asks for
    it (the history plus the generation prompt, exactly what inference renders) to the end of
    the history that includes it, trailing whitespace left out (nothing generates it). Tool
    messages, like user ones, take no loss."""

    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0 and generation_prompt:
            return ""  # an assistant turn opening the conversation: nothing before it
        return render_chat(
            tokenizer, messages[:upto], tools, add_generation_prompt=generation_prompt
        )

    text = render(len(messages), False)
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt, through = render(i, True), render(i + 1, False)
        if not (
            text.startswith(prompt) and text.startswith(through) and through.startswith(prompt)
        ):
            raise ValueError(
                "the model's chat template does not render a conversation turn by turn "
                "(an earlier turn changes when a later one is added); it cannot be used to "
                "mask the prompt"
            )
        spans.append((len(prompt), len(through.rstrip())))
    return text, spans


@register(FORMAT_CHAT)
class Chat(CausalLM):
    def encode_row(
        self, row: Example, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[list[int], list[int]]:
        text, spans = chat_spans(tokenizer, row["messages"], row.get("tools"))
        return encode_spans(tokenizer, text, spans)


@register(FORMAT_COMPLETION)
class Completion(CausalLM):
    def encode_row(
        self, row: Example, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[list[int], list[int]]:
        prompt, completion = row["prompt"], row["completion"]
        ids, labels = encode_spans(
            tokenizer, prompt + completion, [(len(prompt), len(prompt) + len(completion))]
        )
        # EOS ends a completion, so the model learns where to stop.
        eos = int(tokenizer.eos_token_id)
        return ids + [eos], labels + [eos]


@register(FORMAT_TEXT)
class Text(CausalLM):
    def encode_row(
        self, row: Example, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[list[int], list[int]]:
        ids = list(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
        ids.append(int(tokenizer.eos_token_id))  # marks where one document ends
        return ids, list(ids)

    def encode_examples(
        self,
        rows: Sequence[Example],
        tokenizer: Any | None,
        labels: list[str],
        hp: TrainingHyperparameters,
        warn: Warn = no_warning,
    ) -> list[Features]:
        # No document is truncated: a long one is cut into pieces of max_seq_length tokens,
        # each learnt on its own (packed with others, or padded when packing is off).
        assert tokenizer is not None
        limit = self.max_length(hp)
        features: list[Features] = []
        for row in rows:
            ids = self.encode_row(row, tokenizer)[0]
            pieces = [ids[i : i + limit] for i in range(0, len(ids), limit)]
            # A piece of one token has nothing to predict.
            features += [{"input_ids": p, "labels": list(p)} for p in pieces if len(p) > 1]
        return features
