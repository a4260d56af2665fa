"""The decode engine's Prometheus metrics (``tunehouse_generation_*``), apart from the engine
(app/inference/engine.py, which imports torch) so that an inference process shows them from its
start, before its first generation."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "tunehouse_generation_batch_size",
    "Sequences decoded together in one decode step",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
TOKENS = Counter("tunehouse_generation_tokens_total", "Tokens generated")
STEP_SECONDS = Histogram(
    "tunehouse_generation_step_seconds",
    "Time of one engine step: the prefills of joining sequences and one decode forward pass",
)
FIRST_TOKEN_SECONDS = Histogram(
    "tunehouse_generation_time_to_first_token_seconds",
    "From a sequence's submission to its first token",
)
ACTIVE = Gauge(
    "tunehouse_generation_active_sequences", "Sequences decoding or waiting to join a batch"
)
PREFILLS = Counter("tunehouse_generation_prefills_total", "Prompt prefills (one per group)")
