"""Soak: the mixed concurrent load of tests/test_soak.py, as long and as wide as you like.

    .venv/bin/python bench/soak.py [--duration 600] [--clients 24] [--watchers 32]
                                   [--stack embedded|distributed] [--apis 2] [--cache-size 2]

Starts Tunehouse as a user does (`tunehouse run`, or `--apis` x `tunehouse api` and one
`tunehouse worker` on PostgreSQL + Redis), registers tiny models (a Llama base, LoRA adapters of
it, BERT-style classifiers; with MiniLM more than the cache holds), and lets clients upload
files (some bad), create, pause, resume and cancel jobs, follow event streams and call every
inference route. It prints each kind of request's p50/p99 under the load beside the same
requests made one at a time on the idle server first (the baseline), as a ratio, the API
processes' memory and open descriptors from the idle start to the idle end, each job's expected
and actual end state, and every violation (5xx, an answer over the bound, a wrong status, a
hung client, a job in the wrong state, memory growth, files left in storage/tmp). Exits 1 when
there is any.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.soak import SoakConfig, build_models, distributed, embedded, run_soak  # noqa: E402
from tests.support import fresh_postgres_database  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--clients", type=int, default=24, help="busy clients")
    parser.add_argument("--watchers", type=int, default=32, help="event-stream followers")
    parser.add_argument("--stack", choices=["embedded", "distributed"], default="embedded")
    parser.add_argument("--apis", type=int, default=2, help="API processes (distributed)")
    parser.add_argument("--cache-size", type=int, default=2, help="TUNEHOUSE_MODEL_CACHE_SIZE")
    parser.add_argument("--bound", type=float, default=30, help="slowest answer allowed (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "TUNEHOUSE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL server (a database is made and dropped)",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--calls-json", type=Path, help="write every request's record here")
    parser.add_argument("--resources-csv", type=Path, help="write the memory and fd samples here")
    args = parser.parse_args()
    max_active_jobs = max(2, args.clients // 6)
    config = SoakConfig(
        duration=args.duration,
        clients=args.clients,
        watchers=args.watchers,
        bound=args.bound,
        max_active_jobs=max_active_jobs,
        # One worker trains the last jobs in turn: up to a minute each on a busy machine.
        drain_bound=max(150.0, 60.0 * max_active_jobs),
        warmup=min(60.0, args.duration / 4),
        baseline_rounds=2,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="tunehouse-soak-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        models = build_models(tmp / "models")
        (tmp / "run").mkdir()
        if args.stack == "embedded":
            deployment = embedded(tmp / "run", models, args.cache_size)
        else:
            url = stack.enter_context(fresh_postgres_database(args.pg, prefix="tunehouse_soak"))
            deployment = distributed(
                tmp / "run", models, url, args.redis, args.apis, args.cache_size
            )
        target, zoo = stack.enter_context(deployment)
        print(f"soaking {target.name} for {config.duration:.0f} s ...", flush=True)
        report = run_soak(target, zoo, config)
        print(report.summary())
        if report.violations:
            print("server errors logged:\n" + target.log_errors())
        if args.calls_json:
            args.calls_json.write_text(json.dumps([c.__dict__ for c in report.calls], indent=1))
        if args.resources_csv:
            rows = [
                f"{s.at - report.samples[0].at:.1f},{s.pid},{s.rss_mib:.1f},{s.fds}"
                for s in report.samples
            ]
            args.resources_csv.write_text("seconds,pid,rss_mib,fds\n" + "\n".join(rows) + "\n")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
