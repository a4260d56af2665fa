"""The route a user writes in ten minutes: the baseline that bench/serving.py measures Tunehouse
against.

    BENCH_MODEL_DIR=path/to/classifier .venv/bin/python -m uvicorn bench.naive_server:app

A FastAPI app that loads one sequence classifier (safetensors) with ``AutoTokenizer`` and
``AutoModelForSequenceClassification`` at import, and per request tokenizes the one text it is
given and runs the model on it. The route is a plain ``def``, so FastAPI runs it in its thread
pool: concurrent requests run their forward passes at once, each on torch's default threads.
Nothing here is tuned; that is the point.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL_DIR = os.environ["BENCH_MODEL_DIR"]

tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, use_safetensors=True)
model.eval()
id2label = {int(k): str(v) for k, v in model.config.id2label.items()}

app = FastAPI()


class Request(BaseModel):
    text: str


class Answer(BaseModel):
    label: str
    scores: dict[str, float]


@app.post("/predict")
def predict(body: Request) -> Answer:
    batch = tokenizer(body.text, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, dim=-1)[0].tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return Answer(label=id2label[best], scores={id2label[i]: p for i, p in enumerate(probs)})


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
