"""The soak's clients: threads that each play one role until the load is over, and watchers
that follow the jobs' event streams (idle connections, as open dashboards are)."""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections.abc import Callable

from tests.soak import ops
from tests.soak.http import Http
from tests.soak.world import World

Op = Callable[[Http, World, random.Random], None]

# The roles, in the order clients take them: 10 clients are 4 inference, 2 streaming, 2 files,
# 1 jobs and 1 control client; more clients repeat the cycle.
ROLES = ["inference", "jobs", "streaming", "files", "inference", "control",
         "inference", "streaming", "files", "inference", "jobs", "control"]  # fmt: skip
MIXES: dict[str, list[tuple[Op, int]]] = {
    "inference": [
        (ops.predict_classifier, 3),
        (ops.predict_generative, 1),
        (ops.predict_tabular, 2),
        (ops.chat, 3),
        (ops.completion, 2),
        (ops.embed, 3),
    ],
    "streaming": [(ops.chat_stream, 2), (ops.completion_stream, 1)],
    "files": [(ops.upload_good, 3), (ops.upload_bad, 3), (ops.read_files, 3), (ops.delete_file, 1)],
    "control": [(ops.read_control, 1)],
}


def jobs_step(h: Http, w: World, rng: random.Random) -> None:
    """Create jobs (a few at a time: one worker trains them in turn), carry out their fates,
    and poll them as a dashboard does."""
    ops.act_on_jobs(h, w, rng)
    room = len(w.active_jobs()) < w.max_active_jobs and h.recorder.now() < w.jobs_until
    if room and rng.random() < 0.6:
        ops.create_job(h, w, rng)
    elif rng.random() < 0.1:
        ops.create_bad_job(h, w, rng)
    else:
        ops.read_jobs(h, w, rng)
    time.sleep(rng.uniform(0.1, 0.4))


def _mixed(mix: list[tuple[Op, int]]) -> Op:
    functions, weights = zip(*mix, strict=True)

    def step(h: Http, w: World, rng: random.Random) -> None:
        rng.choices(functions, weights)[0](h, w, rng)
        time.sleep(rng.uniform(0, 0.05))

    return step


STEPS: dict[str, Op] = {"jobs": jobs_step, **{role: _mixed(mix) for role, mix in MIXES.items()}}


class Client(threading.Thread):
    """Plays one role in a closed loop (the next request when the last is answered) until the
    load is over."""

    def __init__(self, http: Http, world: World, role: str, seed: int):
        super().__init__(name=http.name, daemon=True)
        self.http, self.world, self.role = http, world, role
        self.rng = random.Random(seed)

    def run(self) -> None:
        try:
            while not self.world.load_over.is_set():
                self.play()
        except Exception:  # the harness's own error, or a body it could not read: reported
            self.http.recorder.violation(
                "client", f"client {self.name} stopped: {traceback.format_exc(limit=3)}"
            )
        finally:
            self.http.close()

    def play(self) -> None:
        STEPS[self.role](self.http, self.world, self.rng)


class Watcher(Client):
    """Follows one unfinished job's event stream after another, until the soak has drained."""

    def __init__(self, http: Http, world: World, seed: int):
        super().__init__(http, world, "watcher", seed)

    def run(self) -> None:
        try:
            while not self.world.drained.is_set():
                plans = self.world.active_jobs()
                if not plans:
                    if self.world.load_over.is_set():
                        return
                    time.sleep(0.5)
                    continue
                plan = self.rng.choice(plans)
                ended = ops.follow_events(self.http, self.world, self.rng, plan)
                seen = ops.refresh_job(self.http, self.world, plan)
                if ended and seen and not plan.ended:
                    self.http.stream_violation(
                        f"GET /v1/fine_tuning/jobs/{plan.id}/events?stream=true",
                        f"[DONE] came while the job is {plan.status}",
                    )
        except Exception:
            self.http.recorder.violation(
                "client", f"watcher {self.name} stopped: {traceback.format_exc(limit=3)}"
            )
        finally:
            self.http.close()
