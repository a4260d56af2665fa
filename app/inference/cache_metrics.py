"""The model cache's Prometheus metrics (``/metrics``, ``tunehouse_model_cache_*``). No labels
name a model: their number stays fixed however many models are served."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HITS = Counter(
    "tunehouse_model_cache_hits_total", "Requests whose model was loaded already", ["use"]
)
MISSES = Counter(
    "tunehouse_model_cache_misses_total", "Requests that waited for their model to load", ["use"]
)
# reason: bytes, count, adapter-lru (the cache's limits), unload, delete
EVICTIONS = Counter(
    "tunehouse_model_cache_evictions_total", "Models taken out of the cache", ["reason"]
)
LOAD_SECONDS = Histogram(
    "tunehouse_model_cache_load_seconds",
    "Time to load a model (read its weights and build it)",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
WARMED = Counter(
    "tunehouse_model_cache_warmed_total",
    "Models loaded before any request asked (pinned, or a job that just succeeded)",
)
BYTES = Gauge("tunehouse_model_cache_bytes", "Bytes of weights loaded (a shared base once)")
BUDGET = Gauge("tunehouse_model_cache_budget_bytes", "The cache's memory budget")
MODELS = Gauge("tunehouse_model_cache_models", "Models loaded (a LoRA adapter counts one)")
ADAPTERS = Gauge("tunehouse_model_cache_adapters", "LoRA adapters loaded, on every base")
BASES = Gauge("tunehouse_model_cache_lora_bases", "Base models loaded under LoRA adapters")
