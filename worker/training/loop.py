"""The training loop: one plain PyTorch loop for every task kind.

Reads top to bottom: data, model and optimizer, then per optimizer step the phases
forward/backward, clip, step (the scheduler sets the next LR), evaluate and checkpoint, log.
The task kind (see registry.py) decides how the model is loaded, how rows become batches and
how the model is scored; everything here is shared.

Reproducibility: the torch seed is set before the model is built (the new head's init), the
data order of epoch e is a permutation drawn from a generator seeded with seed + e, and a
checkpoint saves every RNG stream and the position in the epoch, so a run resumed from a
checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.services.datasets import DEFAULT_MAX_LINE_BYTES, DatasetLimits, iter_examples
from worker.training.checkpoint import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    write_checkpoint,
)
from worker.training.checkpoint_dirs import prune_checkpoints
from worker.training.devices import (
    Precision,
    describe_device,
    peak_flops,
    peak_memory_bytes,
    resolve_precision,
    training_device,
)
from worker.training.distributed import Group
from worker.training.registry import (
    Batch,
    Collate,
    Example,
    Features,
    TaskKind,
    Warn,
    get_task_kind,
)
from worker.training.spec import (
    DeadlineExceeded,
    Reporter,
    TrainingHyperparameters,
    TrainingResult,
    TrainingSpec,
    TrainingStopped,
)
from worker.training.step import Stepper, autocast, to_device

logger = logging.getLogger(__name__)

LOG_EVERY_STEPS = 10  # a metrics event at least this often, whatever eval_every_steps is
HOLDOUT_FRACTION = 0.1  # share of training rows held out when there is no validation file
HOLDOUT_MAX_ROWS = 1000  # evaluation should stay cheap on big datasets
STATE_FORMAT = 2  # bump when training_state.pt changes shape
CPU = torch.device("cpu")
FP32 = Precision("fp32", None, False)


@dataclass
class RunState:
    """Where the run is; everything here goes into a checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # batches (optimizer steps) of this epoch already trained on
    trained_tokens: int = 0
    metrics_history: list[dict[str, float | int]] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)
    loss_sum: float = 0.0  # train loss summed over the steps since the last report
    loss_steps: int = 0
    # The kind's per-row figures (step_metrics) summed since the last report, "rows" included.
    metric_sums: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0  # time spent training by earlier attempts (for max_duration)


# --- data -------------------------------------------------------------------------------------


def split_holdout(rows: Sequence[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic (seeded) held-out split: 10% of the rows, at least 1, at most 1000."""
    if len(rows) < 2:
        raise ValueError("the training file needs at least 2 rows to hold one out for evaluation")
    n_valid = min(HOLDOUT_MAX_ROWS, max(1, int(len(rows) * HOLDOUT_FRACTION)))
    held_out = set(random.Random(seed).sample(range(len(rows)), n_valid))
    train = [row for i, row in enumerate(rows) if i not in held_out]
    valid = [row for i, row in enumerate(rows) if i in held_out]
    return train, valid


def load_rows(spec: TrainingSpec, kind: TaskKind) -> tuple[list[Example], list[Example], list[str]]:
    """Training rows, validation rows and the label list."""
    # The task is the dataset format; passing it reads a plain-text file as paragraphs.
    limits = DatasetLimits(max_line_bytes=spec.max_dataset_line_bytes or DEFAULT_MAX_LINE_BYTES)
    train_rows = list(iter_examples(spec.training_file, fmt=spec.task, limits=limits))
    if spec.validation_file is not None:
        valid_rows = list(iter_examples(spec.validation_file, fmt=spec.task, limits=limits))
        labels = kind.labels(train_rows, valid_rows)
    else:
        # Labels come from the whole file, so a class that lands only in the held-out rows
        # is still a class of the model.
        labels = kind.labels(train_rows, [])
        train_rows, valid_rows = split_holdout(train_rows, spec.seed)
    if not train_rows:
        raise ValueError("the training file has no rows")
    return train_rows, valid_rows, labels


def data_warning(reporter: Reporter, which: str) -> Warn:
    """A Warn that reports a warning event naming the data it is about."""
    return lambda text: reporter.message(f"{text} ({which} data)", level="warn")


def packing(collate: Collate, kind: TaskKind, hp: TrainingHyperparameters) -> Collate:
    """`collate`, given the rows packed into sequences of at most max_seq_length tokens."""
    return lambda features: collate(kind.pack(features, hp))


def eval_batches(
    features: list[Features], collate: Collate, batch_size: int, device: torch.device
) -> Iterator[Batch]:
    for i in range(0, len(features), batch_size):
        yield to_device(collate(features[i : i + batch_size]), device)


# --- model and optimizer ----------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(
    model: torch.nn.Module, hp: TrainingHyperparameters, device: torch.device
) -> torch.optim.Optimizer:
    # Weight decay only on matrices: biases and LayerNorm weights (the 1-d tensors) are not
    # decayed, as in BERT and nanoGPT. The fused kernel updates every tensor in one pass, on a
    # GPU and on a CPU alike (on 2 CPU cores it steps MiniLM several times faster than the
    # default for-each kernel); it is Trainer's default too.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": hp.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=hp.learning_rate, fused=device.type in ("cuda", "cpu"))


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak LR, then linear decay to 0 at the last step: the
    formula of transformers' get_linear_schedule_with_warmup. Importing that one costs about
    two seconds of every job's start (transformers.optimization imports its trainer's utilities
    and peft), so the two lines are here."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(
    kind: TaskKind,
    model: torch.nn.Module,
    batches: Iterator[Batch],
    device: torch.device = CPU,
    precision: Precision = FP32,
) -> dict[str, float]:
    model.eval()  # no dropout: scores are deterministic and draw nothing from the RNG
    with torch.no_grad(), autocast(device, precision):  # batches are built lazily, inside too
        metrics = kind.eval_metrics(model, batches)
    model.train()
    return metrics


def prepare_model(model: torch.nn.Module, hp: TrainingHyperparameters) -> None:
    """Gradient checkpointing, when asked for: activations are recomputed in the backward pass
    instead of kept, for about a third more compute and much less memory."""
    if not hp.gradient_checkpointing:
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError("gradient_checkpointing is not supported by this kind of model")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With frozen embeddings (LoRA) the checkpointed blocks' inputs need gradients.
    require_grads = getattr(model, "enable_input_require_grads", None)
    if require_grads is not None:
        require_grads()


def model_flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: 6 per weight (2 forward, 4 backward), the PaLM paper's
    estimate; frozen weights (LoRA) need no weight gradient, so 4."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 6.0 * trainable + 4.0 * frozen


# --- the loop ---------------------------------------------------------------------------------


def train(spec: TrainingSpec, reporter: Reporter) -> TrainingResult:
    hp = TrainingHyperparameters.from_dict(spec.hyperparameters)
    kind = get_task_kind(spec.task)
    device = training_device(spec.resources)
    group = Group.current(device)
    precision = resolve_precision(hp.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on the tensor cores
        torch.backends.cudnn.allow_tf32 = True

    # Data: rows are encoded once; each batch is padded only to its own longest row (rounded
    # up to a multiple of 8 on a GPU, for the tensor cores).
    train_rows, valid_rows, labels = load_rows(spec, kind)
    kind.prepare(spec, train_rows, labels)
    tokenizer = kind.load_tokenizer(spec)
    train_features = kind.encode_examples(
        train_rows, tokenizer, labels, hp, warn=data_warning(reporter, "training")
    )
    valid_features = kind.encode_examples(
        valid_rows, tokenizer, labels, hp, warn=data_warning(reporter, "validation")
    )
    if not train_features:
        raise ValueError("the training file has no row left to train on")
    # Scores are sums over rows, so the order is free: by length, evaluation pads little.
    valid_features = sorted(valid_features, key=kind.feature_length, reverse=True)
    collate = kind.make_collate(tokenizer, 8 if device.type == "cuda" else None)
    # Packing: the rows of each micro-batch are packed into as few sequences as they fit in,
    # so a batch holds the same rows, and the step the same loss, as unpacked.
    packed = kind.supports_packing and hp.packing is not False
    if packed and kind.packing_off is not None:
        reporter.message(f"packing is off: {kind.packing_off}", level="warn")
        packed = False
    if packed:
        collate = packing(collate, kind, hp)
    counts = [kind.loss_count([f]) for f in train_features]

    # Schedule: one optimizer step per batch of batch_size rows (the last one of an epoch may
    # be short), shared between the processes and cut into micro-batches.
    rows_per_rank = math.ceil(hp.batch_size / group.world_size)
    micro = hp.micro_batch_size or math.ceil(rows_per_rank / hp.gradient_accumulation_steps)
    micro = min(micro, rows_per_rank)
    steps_per_epoch = math.ceil(len(train_features) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    warmup_steps = int(hp.warmup_ratio * total_steps)

    # Model and optimizer, or the state of a checkpoint to carry on from.
    seed_everything(spec.seed)  # before load_model: the new head's init draws from it
    resume = load_training_state(spec.resume_from) if spec.resume_from is not None else None
    model = kind.load_model(spec, labels, weights_dir=spec.resume_from).to(device)
    # What the kind needs from the starting model (DPO's reference log-probs): computed now,
    # before any step, or taken back from the checkpoint.
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        kind.start_training(
            model,
            (train_features, valid_features),
            lambda rows: eval_batches(rows, collate, hp.batch_size, device),
            resume.get("kind") if resume is not None else None,
        )
    model.train()
    if group.distributed and group.rank and resume is None:
        # Each rank's dropout draws its own masks (rank 0 keeps the one-process stream);
        # DDP gives every rank rank 0's weights, so the model's init is unaffected.
        torch.manual_seed(spec.seed + 1_000_003 * group.rank)
    prepare_model(model, hp)
    optimizer = make_optimizer(model, hp, device)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    generator = torch.Generator()  # the data order's own stream, apart from dropout's
    run = RunState()
    if resume is not None:
        run = _resume(
            resume, spec, labels, total_steps, optimizer, scheduler, scaler, generator, group
        )
        reporter.message(f"Restarted from checkpoint at step {run.step}")
    train_model = group.wrap(model)
    if hp.torch_compile:
        # Shapes change with every batch's length: compile for dynamic shapes once.
        train_model = torch.compile(train_model, dynamic=True)  # type: ignore[assignment]
    stepper = Stepper(
        kind=kind,
        train_model=train_model,
        optimizer=optimizer,
        scaler=scaler,
        precision=precision,
        group=group,
        device=device,
        collate=collate,
        features=train_features,
        counts=counts,
        micro=micro,
        may_shrink=device.type == "cuda" and not group.distributed and not hp.micro_batch_size,
        on_shrink=lambda rows: reporter.message(
            f"micro-batch lowered to {rows} rows to fit in the GPU's memory", level="warn"
        ),
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    flops_per_token = model_flops_per_token(model)
    peak = peak_flops(device, precision)
    saved = {"step": run.step, "at": time.monotonic()}  # the newest checkpoint (or the start)
    attempt_started, earlier_seconds = time.monotonic(), run.train_seconds

    def checkpoint(end_of_epoch: bool) -> None:
        # Every rank takes part (their RNG states and losses go in); rank 0 writes.
        ranks = group.gather(
            {
                "rng": capture_rng_state(generator),
                "loss_sum": run.loss_sum,
                "metric_sums": dict(run.metric_sums),
            }
        )
        if not group.is_main:  # every rank knows which step the newest checkpoint holds
            saved.update(step=run.step, at=time.monotonic())
            return
        run.train_seconds = earlier_seconds + time.monotonic() - attempt_started
        position = (run.epoch + 1, 0) if end_of_epoch else (run.epoch, run.batch_in_epoch)
        state = _training_state(
            spec, labels, total_steps, run, position, optimizer, scheduler, scaler, ranks
        )
        state["kind"] = kind.training_state()
        path = write_checkpoint(
            spec.checkpoints_dir,
            run.step,
            lambda d: kind.save_model(model, tokenizer, d),
            state,
            delay=spec.debug_checkpoint_delay_seconds,
        )
        reporter.checkpoint(run.step, path, checkpoint_metrics(run))
        saved.update(step=run.step, at=time.monotonic())
        if spec.keep_checkpoints is None:
            return
        try:  # older checkpoints go, or lose their optimizer state
            prune_checkpoints(
                spec.checkpoints_dir,
                keep=spec.keep_checkpoints,
                is_epoch_end=lambda step: step % steps_per_epoch == 0,
                forget=reporter.checkpoints_pruned,
            )
        except OSError:  # not worth the job: the next checkpoint prunes again
            logger.warning("could not prune the checkpoints of %s", spec.job_id, exc_info=True)

    def stop() -> TrainingStopped:
        # Between steps: the state is whole. A pause or a shutdown saves it, unless the newest
        # checkpoint already holds this very step (or nothing has been trained yet).
        checkpointed = run.step == saved["step"]
        if not checkpointed and group.main_says(group.is_main and reporter.checkpoint_on_stop()):
            checkpoint(end_of_epoch=False)
            checkpointed = True
        return TrainingStopped(run.step, total_steps, checkpointed)

    where = describe_device(device, group.world_size)
    reporter.message(
        f"training {kind.name} on {len(train_features)} rows{' (packed)' if packed else ''}, "
        f"evaluating on {len(valid_features)} rows, {total_steps} steps on {where} in "
        f"{precision.name}, {micro} rows per forward pass"
    )
    reporter.progress(run.step, total_steps)
    # Throughput since the last metrics event: training time, optimizer steps, rows, tokens.
    clock, steps, samples, tokens = time.perf_counter(), 0, 0, 0

    for epoch in range(run.epoch, hp.n_epochs):
        run.epoch = epoch
        generator.manual_seed(spec.seed + epoch)  # the same batches again after a resume
        batches = kind.epoch_batches(train_features, hp.batch_size, generator)
        while run.batch_in_epoch < len(batches):
            # What rank 0 decides (time), and a stop asked of any rank, hold for every rank.
            over_time = bool(
                hp.max_duration
                and earlier_seconds + time.monotonic() - attempt_started > hp.max_duration
            )
            checkpoint_due = bool(
                spec.checkpoint_every_seconds
                and time.monotonic() - saved["at"] >= spec.checkpoint_every_seconds
            )
            stopping, over_time, checkpoint_due = group.any(
                reporter.should_stop(),
                group.is_main and over_time,
                group.is_main and checkpoint_due,
            )
            if stopping:
                raise stop()
            if over_time:
                raise DeadlineExceeded(run.step, total_steps, hp.max_duration or 0.0)
            indices = batches[run.batch_in_epoch]
            lr = float(scheduler.get_last_lr()[0])

            # Forward and backward over the micro-batches, then clip, step and set the next
            # LR (the scheduler: linear warmup and decay).
            run.loss_sum += stepper.backward(indices)
            for name, value in kind.step_metrics().items():
                run.metric_sums[name] = run.metric_sums.get(name, 0.0) + value
            stepper.step(hp.max_grad_norm, parameters)
            scheduler.step()
            run.step += 1
            run.batch_in_epoch += 1
            run.loss_steps += 1
            batch_tokens = sum(kind.feature_length(train_features[i]) for i in indices)
            run.trained_tokens += batch_tokens
            steps, samples, tokens = steps + 1, samples + len(indices), tokens + batch_tokens
            reporter.progress(run.step, total_steps)

            # Evaluate at each epoch's end and every eval_every_steps (rank 0 only).
            end_of_epoch = run.batch_in_epoch >= len(batches)
            evaluated = end_of_epoch or bool(
                hp.eval_every_steps and run.step % hp.eval_every_steps == 0
            )
            logged = evaluated or run.step % LOG_EVERY_STEPS == 0 or run.step == total_steps
            if logged and device.type == "cuda":
                torch.cuda.synchronize(device)  # the clock counts work done, not queued
            elapsed = time.perf_counter() - clock  # training time only, before evaluating
            if evaluated and group.is_main:
                run.last_eval = evaluate(
                    kind,
                    model,
                    eval_batches(valid_features, collate, hp.batch_size, device),
                    device,
                    precision,
                )

            # Log: at least every LOG_EVERY_STEPS steps, and after every evaluation.
            if logged:
                loss = group.sum(run.loss_sum) / run.loss_steps
                figures = {name: group.sum(v) for name, v in sorted(run.metric_sums.items())}
                if group.is_main:
                    done = (steps, samples, tokens)
                    event = _metrics_event(run, steps_per_epoch, loss, lr, elapsed, done)
                    event.update(_train_figures(figures))
                    event["peak_memory_bytes"] = peak_memory_bytes(device)
                    if peak and elapsed > 0:  # model FLOPs utilisation, on a GPU we know
                        achieved = flops_per_token * tokens * group.world_size / elapsed
                        event["mfu"] = achieved / (peak * group.world_size)
                    if evaluated:
                        event.update(run.last_eval)
                    run.metrics_history.append(event)
                    reporter.metrics(event)
                    logger.info("job %s: %s", spec.job_id, event)
                run.loss_sum, run.loss_steps, run.metric_sums = 0.0, 0, {}

            # Checkpoint at each epoch's end, every checkpoint_every_steps, and when
            # checkpoint_every_seconds have passed since the last one.
            if (
                end_of_epoch
                or bool(hp.checkpoint_every_steps and run.step % hp.checkpoint_every_steps == 0)
                or checkpoint_due
            ):
                checkpoint(end_of_epoch)
            if logged:  # throughput counts training time only, not evaluation or checkpoints
                clock, steps, samples, tokens = time.perf_counter(), 0, 0, 0
        run.batch_in_epoch = 0

    # The final model, in Hugging Face format, ready to serve (rank 0 writes it).
    if group.is_main:
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        kind.save_final_model(model, tokenizer, spec.output_dir)
        reporter.message(f"training finished after {run.step} steps")
    return TrainingResult(
        labels=labels,
        metrics_history=run.metrics_history,
        final_metrics=dict(run.last_eval),
        trained_tokens=run.trained_tokens,
        steps=run.step,
        model_kind=kind.model_kind,
        adapter=kind.stores_adapter(spec),
    )


def checkpoint_metrics(run: RunState) -> dict[str, float]:
    """What a checkpoint records: the train loss and the evaluation of the metrics event
    logged at its very step; nothing when none was (an evaluation of an earlier step is not
    this checkpoint's)."""
    if not run.metrics_history or run.metrics_history[-1]["step"] != run.step:
        return {}
    event = run.metrics_history[-1]
    return {k: float(v) for k, v in event.items() if k == "train_loss" or k.startswith("valid_")}


def _train_figures(sums: dict[str, float]) -> dict[str, float]:
    """The kind's per-row figures (step_metrics, summed over the ranks and steps since the
    last report) as train_<name>: their means over the rows."""
    rows = sums.pop("rows", 0.0)
    if not rows:
        return {}
    return {f"train_{name}": value / rows for name, value in sums.items()}


def _metrics_event(
    run: RunState,
    steps_per_epoch: int,
    loss: float,
    lr: float,
    elapsed: float,
    done: tuple[int, int, int],
) -> dict[str, float | int]:
    """The figures of a metrics event; throughput (``done``: optimizer steps, rows, tokens)
    over the training time since the last one."""
    steps, samples, tokens = done
    return {
        "step": run.step,
        "epoch": run.step / steps_per_epoch,
        "train_loss": loss,
        "learning_rate": lr,
        "steps_per_second": steps / elapsed if elapsed > 0 else 0.0,
        "samples_per_second": samples / elapsed if elapsed > 0 else 0.0,
        "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
    }


# --- checkpoint state -------------------------------------------------------------------------


def _training_state(
    spec: TrainingSpec,
    labels: list[str],
    total_steps: int,
    run: RunState,
    position: tuple[int, int],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ranks: list[dict[str, Any]],
) -> dict[str, Any]:
    """Plain tensors and containers only, so the file loads with weights_only=True; the
    job, task and hyperparameters are kept so a checkpoint describes itself. `ranks` holds
    what differs between the processes of a group (RNG streams, the loss not yet reported),
    in rank order."""
    return {
        "format": STATE_FORMAT,
        "job_id": spec.job_id,
        "task": spec.task,
        "seed": spec.seed,
        "hyperparameters": dict(spec.hyperparameters),
        "labels": list(labels),
        "total_steps": total_steps,
        "step": run.step,
        "epoch": position[0],
        "batch_in_epoch": position[1],
        "trained_tokens": run.trained_tokens,
        "metrics_history": list(run.metrics_history),
        "last_eval": dict(run.last_eval),
        "loss_steps": run.loss_steps,
        "train_seconds": run.train_seconds,
        # After the last step nothing is left to optimize: a resume from here only saves the
        # model, so the optimizer's state (twice the weights' size) is not written.
        "optimizer": None if run.step == total_steps else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),  # fp16's loss scale and growth tracker
        "ranks": ranks,
    }


def _rank_state(state: dict[str, Any], group: Group) -> dict[str, Any]:
    ranks = state["ranks"]
    if len(ranks) != group.world_size:
        raise ValueError(
            f"the checkpoint was written by {len(ranks)} processes, this run has "
            f"{group.world_size}: resume with the same resources.processes"
        )
    return dict(ranks[group.rank])


def _resume(
    state: dict[str, Any],
    spec: TrainingSpec,
    labels: list[str],
    total_steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    group: Group,
) -> RunState:
    """Put the optimizer, scheduler, scaler and RNGs back as the checkpoint left them."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
    if state["labels"] != labels or state["total_steps"] != total_steps:
        raise ValueError(
            "the checkpoint does not match this job: its labels or number of steps differ "
            "(was the data or were the hyperparameters changed?)"
        )
    own = _rank_state(state, group)
    if state["optimizer"] is not None:  # None in the checkpoint of the last step
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    # Last, after the model is built: loading it draws from the torch RNG.
    restore_rng_state(own["rng"], generator)
    logger.info("job %s: resuming from step %d", spec.job_id, state["step"])
    return RunState(
        step=state["step"],
        epoch=state["epoch"],
        batch_in_epoch=state["batch_in_epoch"],
        trained_tokens=state["trained_tokens"],
        metrics_history=list(state["metrics_history"]),
        last_eval=dict(state["last_eval"]),
        loss_sum=float(own["loss_sum"]),
        metric_sums={k: float(v) for k, v in own.get("metric_sums", {}).items()},
        loss_steps=state["loss_steps"],
        train_seconds=float(state.get("train_seconds", 0.0)),
    )
