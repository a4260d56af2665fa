"""Everything a soak client does, one function per kind of request. Each sends what a user
sends and checks what a user would look at (status, the shape of the answer, a stream that ends
with ``[DONE]``); the recorder judges status and latency. ``model=None`` picks one at random;
the baseline passes each model in turn."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from tests.crash_support import tabular_rows
from tests.soak.http import Http
from tests.soak.world import CANCEL, UNTOUCHED, JobPlan, World
from tests.support import jsonl, sentiment_rows

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_datasets"
_EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text("utf-8"))
BAD_FILES = sorted(name for name, case in _EXPECTED.items() if case["status"] == 400)
ODD_GOOD_FILES = sorted(name for name, case in _EXPECTED.items() if case["status"] == 200)
# The corpus's bad files are bad under these settings (as in tests/test_dataset_corpus.py).
CORPUS_ENV = {
    "TUNEHOUSE_MAX_DATASET_LINE_BYTES": str(64 * 1024),
    "TUNEHOUSE_MIN_EXAMPLES_PER_LABEL": "2",
}

SENTENCES = [row["text"] for row in sentiment_rows(60, seed=5)]
PROMPTS = ["say hello", "once upon a time", "the quick brown fox", "tell me about the world"]
FEATURES = 6  # as in tests.crash_support.tabular_rows


def job_body(training_file: str, seed: int, fate: str) -> dict[str, Any]:
    return {
        "model": "tunehouse/mlp",
        "training_file": training_file,
        "seed": seed,
        "suffix": f"soak{seed}",
        "metadata": {"soak": "yes", "fate": fate},
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 16, "learning_rate": 0.01},
                "architecture": {"hidden_sizes": [16], "activation": "relu", "dropout": 0.1},
            },
        },
    }


def _check(
    h: Http, response: httpx.Response | None, holds: Callable[[Any], bool], what: str
) -> None:
    """A 200 whose body is not what the route promises (``holds`` says no) is a violation."""
    if response is None or response.status_code != 200:
        return
    try:
        fine = holds(response.json())
    except (ValueError, KeyError, IndexError, TypeError):
        fine = False
    if not fine:
        h.recorder.violation(
            "body",
            f"{response.request.method} {response.request.url.path} (client {h.name}, "
            f"request {response.request.headers.get('x-request-id')}): expected {what}: "
            f"{response.text[:200]}",
        )


# -- inference --------------------------------------------------------------------------------


def predict_classifier(h: Http, w: World, rng: random.Random, model: str | None = None) -> None:
    model = model or rng.choice(w.zoo.classifiers)
    texts = rng.sample(SENTENCES, rng.randint(1, 4))
    r = h.call(
        "predict-classifier",
        "POST",
        "/v1/predictions",
        model=model,
        json={"model": model, "input": texts},
    )
    _check(h, r, lambda body: len(body["data"]) == len(texts), "one prediction per input")


def predict_generative(h: Http, w: World, rng: random.Random, model: str | None = None) -> None:
    model = model or rng.choice(w.zoo.generative)
    r = h.call(
        "predict-generative",
        "POST",
        "/v1/predictions",
        model=model,
        json={"model": model, "input": [rng.choice(PROMPTS)]},
    )
    _check(h, r, lambda body: isinstance(body["data"][0]["text"], str), "a text")


def predict_tabular(h: Http, w: World, rng: random.Random, model: str | None = None) -> None:
    """A model one of the soak's jobs made; another client may be deleting it (then 404)."""
    models = [model] if model else w.live_job_models()
    if not models:
        return predict_classifier(h, w, rng)
    model = rng.choice(models)
    rows = [[rng.uniform(-1, 1) for _ in range(FEATURES)] for _ in range(rng.randint(1, 8))]
    r = h.call(
        "predict-tabular",
        "POST",
        "/v1/predictions",
        model=model,
        expect=(200, 404),
        json={"model": model, "input": rows},
    )
    if r is not None and r.status_code == 404 and not w.job_models.get(model):
        h.recorder.violation(
            "status", f"predictions for {model} (client {h.name}): 404, yet nobody deleted it"
        )
    _check(h, r, lambda body: len(body["data"]) == len(rows), "one prediction per row")


def chat(h: Http, w: World, rng: random.Random, model: str | None = None) -> None:
    model = model or rng.choice(w.zoo.generative)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": 16,
        "temperature": rng.choice([0.0, 0.8]),
        "seed": rng.randrange(1000),
    }
    r = h.call("chat", "POST", "/v1/chat/completions", model=model, json=body)
    _check(
        h,
        r,
        lambda body: isinstance(body["choices"][0]["message"]["content"], str),
        "an assistant message",
    )


def completion(h: Http, w: World, rng: random.Random, model: str | None = None) -> None:
    model = model or rng.choice(w.zoo.generative)
    prompts = rng.sample(PROMPTS, rng.randint(1, 2))
    n = rng.randint(1, 2)
    body = {"model": model, "prompt": prompts, "max_tokens": 12, "n": n, "temperature": 0.7}
    r = h.call("completion", "POST", "/v1/completions", model=model, json=body)
    _check(h, r, lambda body: len(body["choices"]) == len(prompts) * n, "n choices per prompt")


def embed(h: Http, w: World, rng: random.Random, model: str | None = None) -> None:
    model = model or rng.choice(w.zoo.encoders)
    texts = rng.sample(SENTENCES, rng.randint(1, 4))
    body = {"model": model, "input": texts, "encoding_format": rng.choice(["float", "base64"])}
    r = h.call("embeddings", "POST", "/v1/embeddings", model=model, json=body)
    _check(h, r, lambda body: len(body["data"]) == len(texts), "one vector per input")


def chat_stream(
    h: Http, w: World, rng: random.Random, model: str | None = None, cut: bool | None = None
) -> None:
    """A streamed chat answer, read to the end, or (a third of the time) dropped after its
    first piece of text, as a client that goes away does."""
    model = model or rng.choice(w.zoo.generative)
    cut = rng.random() < 1 / 3 if cut is None else cut
    body = {
        "model": model,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": 32,
        "stream": True,
        "stream_options": {"include_usage": rng.random() < 0.5},
    }
    op = "chat-stream-cut" if cut else "chat-stream"
    _read_stream(h, op, "/v1/chat/completions", model, body, cut)


def completion_stream(
    h: Http, w: World, rng: random.Random, model: str | None = None, cut: bool | None = None
) -> None:
    model = model or rng.choice(w.zoo.generative)
    cut = rng.random() < 1 / 3 if cut is None else cut
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 32, "stream": True}
    op = "completion-stream-cut" if cut else "completion-stream"
    _read_stream(h, op, "/v1/completions", model, body, cut)


def _read_stream(h: Http, op: str, path: str, model: str, body: dict[str, Any], cut: bool) -> None:
    done = opened = False
    with closing(h.stream(op, "POST", path, model=model, json=body)) as lines:
        for line in lines:
            opened = True
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                h.stream_violation(f"POST {path} model={model}", f"error in the stream: {chunk}")
                return
            if cut and _has_text(chunk):
                return  # gone after the first piece of text, without reading the rest
    if opened and not done and not h.broken:
        h.stream_violation(f"POST {path} model={model}", "the stream ended without [DONE]")


def _has_text(chunk: dict[str, Any]) -> bool:
    choice = (chunk.get("choices") or [{}])[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


# -- files ------------------------------------------------------------------------------------


def upload_good(h: Http, w: World, rng: random.Random, kind: str | None = None) -> None:
    """A dataset a job may train on (tabular), or one a client may delete later."""
    kind = kind or rng.choice(["tabular", "classification", "corpus-ok"])
    if kind == "tabular":
        name, content = "rows.jsonl", jsonl(tabular_rows(240, rng.randrange(10**6)))
    elif kind == "classification":
        name, content = (
            "reviews.jsonl",
            jsonl(dict(row) for row in sentiment_rows(60, rng.randrange(10**6))),
        )
    else:
        name = rng.choice(ODD_GOOD_FILES)
        content = (CORPUS / name).read_bytes()
    r = h.call(
        f"upload-{kind}",
        "POST",
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": (name, content, "application/octet-stream")},
    )
    if r is not None and r.status_code == 200:
        _check(
            h,
            r,
            lambda file: file["status"] == "processed" and file["bytes"] == len(content),
            "a processed file of the bytes sent",
        )
        w.remember_upload(r.json()["id"], content, for_jobs=kind == "tabular")


def upload_bad(h: Http, w: World, rng: random.Random, name: str | None = None) -> None:
    """A file of the bad-dataset corpus: refused with a 400 naming what is wrong."""
    name = name or rng.choice(BAD_FILES)
    h.call(
        "upload-bad",
        "POST",
        "/v1/files",
        expect=(400,),
        data={"purpose": "fine-tune"},
        files={"file": (name, (CORPUS / name).read_bytes(), "application/octet-stream")},
    )


def read_files(h: Http, w: World, rng: random.Random) -> None:
    r = h.call("files-list", "GET", "/v1/files", params={"limit": 20, "purpose": "fine-tune"})
    _check(h, r, lambda body: body["object"] == "list", "a list")
    if not w.job_files:
        return
    file_id = rng.choice(w.job_files)
    h.call("files-retrieve", "GET", f"/v1/files/{file_id}")
    r = h.call("files-content", "GET", f"/v1/files/{file_id}/content")
    sent = w.contents[file_id]
    if r is not None and r.status_code == 200 and hashlib.sha256(r.content).hexdigest() != sent:
        h.recorder.violation(
            "body", f"GET /v1/files/{file_id}/content (client {h.name}): not the bytes sent"
        )


def delete_file(h: Http, w: World, rng: random.Random) -> None:
    file_id = w.take_deletable_file(rng)
    if file_id is None:
        return upload_good(h, w, rng, "classification")
    r = h.call("files-delete", "DELETE", f"/v1/files/{file_id}")
    if r is not None and r.status_code == 200:
        h.call("files-retrieve-deleted", "GET", f"/v1/files/{file_id}", expect=(404,))


# -- jobs -------------------------------------------------------------------------------------


def create_job(h: Http, w: World, rng: random.Random, fate: str | None = None) -> list[JobPlan]:
    """A quick tabular job with a fate: left alone, cancelled, or paused then resumed. Some are
    created with an Idempotency-Key and sent twice, as a client retrying does. Returns the job
    made (none when the request failed)."""
    if not w.job_files:
        upload_good(h, w, rng, "tabular")
        return []
    fate = fate or w.next_fate()
    body = job_body(rng.choice(w.job_files), rng.randrange(10**6), fate)
    key = f"soak-{uuid.uuid4().hex}" if rng.random() < 0.3 else None
    headers = {"Idempotency-Key": key} if key else None
    r = h.call("jobs-create", "POST", "/v1/fine_tuning/jobs", json=body, headers=headers)
    if r is None or r.status_code != 200:
        return []
    plan = JobPlan(r.json()["id"], h.name, fate, due=h.recorder.now() + rng.uniform(0.5, 5))
    plan.note(h.recorder.now(), f"created ({fate})")
    with w.lock:
        w.jobs[plan.id] = plan
    if key:
        again = h.call(
            "jobs-create-retry", "POST", "/v1/fine_tuning/jobs", json=body, headers=headers
        )
        _check(
            h,
            again,
            lambda job: job["id"] == plan.id,
            f"the same job ({plan.id}) for the same Idempotency-Key",
        )
    return [plan]


def create_bad_job(h: Http, w: World, rng: random.Random) -> None:
    body = job_body("file-doesnotexist000000000", 1, UNTOUCHED)
    if rng.random() < 0.5:
        body["model"] = "no-such-base-model"
    h.call("jobs-create-bad", "POST", "/v1/fine_tuning/jobs", json=body, expect=(400,))


def act_on_jobs(h: Http, w: World, rng: random.Random, *, finishing: bool = False) -> None:
    """Carry out each job's fate when it is due. ``finishing`` (the load is over): only the
    resumes still owed, at once; a job must never be left paused."""
    now = h.recorder.now()
    for plan in w.active_jobs():
        if plan.owner != h.name and not finishing:
            continue  # each client acts on the jobs it created
        if plan.paused and (finishing or plan.due <= now):
            _resume(h, plan)
        elif not finishing and plan.due <= now and plan.fate != UNTOUCHED:
            _act(h, rng, plan)


def _act(h: Http, rng: random.Random, plan: JobPlan) -> None:
    action = "cancel" if plan.fate == CANCEL else "pause"
    r = h.call(
        f"jobs-{action}", "POST", f"/v1/fine_tuning/jobs/{plan.id}/{action}", expect=(200, 409)
    )
    now = h.recorder.now()
    if r is None or r.status_code not in (200, 409):
        plan.due = now + 1  # recorded as a violation; tried again, as a user would
        return
    status = r.json().get("status") if r.status_code == 200 else None
    plan.note(now, f"{action} -> {r.status_code} {status or _message(r)}")
    if r.status_code == 409:
        # Too early (still validating: try again soon) or too late (it has ended).
        plan.due = now + 0.5 if "validating" in _message(r) else float("inf")
    elif action == "cancel":
        plan.expected, plan.due = "cancelled", float("inf")
    else:
        plan.paused, plan.due = True, now + rng.uniform(0.5, 3)


def _resume(h: Http, plan: JobPlan) -> None:
    r = h.call("jobs-resume", "POST", f"/v1/fine_tuning/jobs/{plan.id}/resume")
    if r is None or r.status_code >= 500:
        return  # recorded as a violation; tried again on the next round
    plan.note(h.recorder.now(), f"resume -> {r.status_code}")
    plan.paused, plan.due = False, float("inf")


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:100]


def read_jobs(h: Http, w: World, rng: random.Random) -> None:
    """What a dashboard polls: one job, the list, its events and checkpoints."""
    plans = w.active_jobs() or list(w.jobs.values())
    if plans:
        plan = rng.choice(plans)
        refresh_job(h, w, plan)
        h.call("jobs-events", "GET", f"/v1/fine_tuning/jobs/{plan.id}/events", params={"limit": 10})
        h.call("jobs-checkpoints", "GET", f"/v1/fine_tuning/jobs/{plan.id}/checkpoints")
    h.call("jobs-list", "GET", "/v1/fine_tuning/jobs", params={"limit": 10})


def refresh_job(h: Http, w: World, plan: JobPlan) -> bool:
    """Retrieve the job and note its status; False when that failed."""
    r = h.call("jobs-retrieve", "GET", f"/v1/fine_tuning/jobs/{plan.id}")
    if r is None or r.status_code != 200:
        return False
    w.seen_status(plan, r.json(), h.recorder.now())
    return True


def follow_events(h: Http, w: World, rng: random.Random, plan: JobPlan) -> bool:
    """``GET .../events?stream=true`` as the dashboard follows a job: every event once, in
    order, then ``[DONE]`` when the job ends; a quarter of the followers leave after the first
    event. True when the stream said the job has ended."""
    peek = rng.random() < 0.25
    op = "events-stream-cut" if peek else "events-stream"
    path = f"/v1/fine_tuning/jobs/{plan.id}/events"
    seen: set[str] = set()
    done = opened = False
    with closing(h.stream(op, "GET", path, params={"stream": "true"})) as lines:
        for line in lines:
            opened = True
            if w.drained.is_set():
                return False  # the soak is over; the job's own check says if it never ended
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event["id"] in seen:
                h.stream_violation(f"GET {path}", f"event {event['id']} sent twice")
            seen.add(event["id"])
            if peek:
                return False
    if opened and not done and not h.broken:
        h.stream_violation(f"GET {path}", "the stream ended without [DONE]")
    return done


# -- control ----------------------------------------------------------------------------------


def read_control(h: Http, w: World, rng: random.Random) -> None:
    """The control plane a user and an operator touch, including its refusals."""
    choice = rng.randrange(6)
    if choice == 0:
        h.call("models-list", "GET", "/v1/models")
    elif choice == 1:
        model = rng.choice(w.zoo.generative + w.zoo.classifiers)
        h.call("models-retrieve", "GET", f"/v1/models/{model}")
    elif choice == 2:
        h.call("healthz", "GET", "/healthz")
        h.call("readyz", "GET", "/readyz")
    elif choice == 3:
        h.call(
            "jobs-retrieve-unknown",
            "GET",
            "/v1/fine_tuning/jobs/ftjob-nosuchjob00000",
            expect=(404,),
        )
    elif choice == 4:
        h.call("no-key", "GET", "/v1/models", expect=(401,), headers={"Authorization": ""})
    else:
        delete_job_model(h, w, rng)


def delete_job_model(h: Http, w: World, rng: random.Random) -> None:
    """Delete one of the models the soak's jobs made, while others may be calling it."""
    models = w.live_job_models()
    if len(models) < 2:  # keep one to call
        return
    model = rng.choice(models)
    with w.lock:
        w.job_models[model] = True
    r = h.call("models-delete", "DELETE", f"/v1/models/{model}", model=model)
    if r is not None and r.status_code == 200:
        h.call("models-retrieve-deleted", "GET", f"/v1/models/{model}", expect=(404,))
