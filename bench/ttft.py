"""Time to first token of a streamed chat answer, against the whole non-streamed answer.

    .venv/bin/python bench/ttft.py [--max-tokens 128] [--runs 5]

Starts `tunehouse api` with a causal LM registered as a base model (Llama shape, hidden 512,
8 layers, random weights, so every answer runs to max_tokens) and asks the same question
streamed and not streamed over HTTP. The first figure is the time until the first content chunk
arrives; the baseline is the time the non-streamed answer takes, which is what a client waits
without streaming.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stacks import base_env  # noqa: E402
from tests.support import free_port, tunehouse, wait_until  # noqa: E402
from tests.tiny_models import build_causal_lm  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog and runs far away"] * 50


def first_token_seconds(client: httpx.Client, body: dict[str, object]) -> float:
    """Read the whole stream, as a chat client does, and note when text first arrived."""
    started, first = time.perf_counter(), None
    with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("no content arrived")
    return first


def whole_answer_seconds(client: httpx.Client, body: dict[str, object]) -> float:
    started = time.perf_counter()
    client.post("/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = build_causal_lm(tmp / "base", TEXTS, hidden_size=512, layers=8, heads=8)
        env = base_env(tmp / "data")
        env["TUNEHOUSE_BASE_MODELS"] = json.dumps({"bench-llama": str(base)})
        tunehouse("migrate", env=env)
        key = tunehouse("keys", "create", env=env).stdout.strip()
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}/v1", headers=headers, timeout=300
            ) as client:
                wait_until(lambda: _up(port), 60, what="the API")
                body = {
                    "model": "bench-llama",
                    "messages": [{"role": "user", "content": "tell me about the fox"}],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                }
                whole_answer_seconds(client, body)  # load the model once, outside the timings
                ttft = [first_token_seconds(client, body) for _ in range(args.runs)]
                whole = [whole_answer_seconds(client, body) for _ in range(args.runs)]
        finally:
            server.terminate()
            server.wait()
    t, w = statistics.median(ttft), statistics.median(whole)
    print(f"chat answer of {args.max_tokens} tokens, median of {args.runs} runs, over HTTP")
    print(f"{'':36}{'seconds':>10}")
    print(f"{'streamed: time to first token':36}{t:>10.3f}")
    print(f"{'baseline: whole non-streamed answer':36}{w:>10.3f}")
    print(f"ratio: {t / w:.3f}")


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
