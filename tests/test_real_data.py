"""Real data: a few hundred rows of GLUE SST-2 (../shared/data/sst2, see its README) through the
whole service. Required in CI; skipped on a laptop without ../shared/data."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.stacks import embedded_stack
from tests.support import BASE_MODEL, extra, jsonl, read_sst2, wait_until

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def service(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    with embedded_stack(tmp_path_factory.mktemp("sst2")) as (stack, key):
        yield stack.base_url, key


def test_sst2_few_hundred_rows_beat_075_on_dev(shared_data: Path, service: tuple[str, str]) -> None:
    base_url, key = service
    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    train = random.Random(0).sample(read_sst2(shared_data / "sst2" / "train.tsv"), 500)
    dev = read_sst2(shared_data / "sst2" / "dev.tsv")[:200]

    file = client.files.create(file=("sst2-train.jsonl", jsonl(train)), purpose="fine-tune")
    assert extra(file, "stats")["rows"] == 500
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=file.id,
        hyperparameters={"n_epochs": 3, "batch_size": 16},
        seed=0,
    )
    done = wait_until(
        lambda: (
            (j := client.fine_tuning.jobs.retrieve(job.id)).status
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        600,
        interval=1,
        what="the SST-2 job",
    )
    assert done.status == "succeeded", done.error

    response = httpx.post(
        f"{base_url}/v1/predictions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": done.fine_tuned_model, "input": [r["text"] for r in dev]},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    predicted = [p["label"] for p in response.json()["data"]]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, dev, strict=True)) / len(dev)
    print(f"SST-2: 500 train rows, 3 epochs -> dev accuracy {accuracy:.3f} on {len(dev)} rows")
    assert accuracy > 0.75
