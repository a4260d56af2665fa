"""A job's W&B run, for its ``wandb`` integration (OpenAI's ``integrations`` shape).

Started by the training process (rank 0) only when the job has such an integration, and only
then is ``wandb`` imported. The run's id is the job's id, so a job resumed after a pause or a
lost worker continues the same run (``resume="allow"``); its name is ``wandb.name`` or the
job's id; its config is the job's resolved hyperparameters, with the model, seed and method.
Every metrics event the job records is logged to it as it is (``step``, ``train_loss``,
``valid_loss``, ``valid_mean_token_accuracy`` or ``valid_accuracy``, ``learning_rate``,
``tokens_per_second``, ...), with ``step`` as the x-axis, and the run is finished when the
training process ends: exit code 0 when the job succeeded or stopped to be resumed, 1 when it
failed.

W&B is never the reason a job fails: a run that cannot start, log or finish costs the job its
W&B logging, and the job gets a warning event saying why. Run files go to ``WANDB_DIR`` when
it is set, else to ``<data dir>/wandb`` (an offline run: ``wandb sync`` it from there).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.training.spec import TrainingSpec

log = logging.getLogger("tunehouse.wandb")

# The longest the training process waits for W&B to finish a run (uploading what is left).
FINISH_TIMEOUT_SECONDS = 120.0

Warn = Callable[[str], None]


def wandb_integration(spec: TrainingSpec) -> dict[str, Any] | None:
    """The job's ``wandb`` settings (``project``, ``name``, ``entity``, ``tags``), if any."""
    for integration in spec.integrations:
        if isinstance(integration, dict) and integration.get("type") == "wandb":
            settings = integration.get("wandb")
            return settings if isinstance(settings, dict) else None
    return None


class WandbRun:
    """The job's W&B run: ``log`` each metrics event, ``finish`` once. After a failure it logs
    nothing more; each call's failure is warned about once."""

    def __init__(self, run: Any, warn: Warn):
        self._run: Any | None = run
        self._warn = warn

    @classmethod
    def start(cls, spec: TrainingSpec, data_dir: Path, warn: Warn) -> WandbRun | None:
        """The job's run, started; None when the job has no wandb integration or W&B could
        not start one (``warn`` says why)."""
        integration = wandb_integration(spec)
        if integration is None:
            return None
        try:
            import wandb

            directory = Path(os.environ.get("WANDB_DIR") or data_dir.resolve() / "wandb")
            directory.mkdir(parents=True, exist_ok=True)
            config = {
                **spec.hyperparameters,
                "model": spec.model,
                "seed": spec.seed,
                "method": spec.method.get("type", "supervised"),
                "job_id": spec.job_id,
            }
            run = wandb.init(
                project=integration["project"],
                entity=integration.get("entity"),
                name=integration.get("name") or spec.job_id,
                tags=integration.get("tags") or None,
                id=spec.job_id,
                resume="allow",
                config=config,
                dir=str(directory),
                reinit=True,
                settings=wandb.Settings(
                    console="off", silent=True, disable_git=True, save_code=False
                ),
            )
            run.define_metric("*", step_metric="step")
        except Exception as exc:  # W&B's own errors have no common base class
            log.warning("could not start the W&B run of %s", spec.job_id, exc_info=True)
            warn(f"W&B logging is off for this job: the run could not start ({_reason(exc)})")
            return None
        log.info("logging %s to W&B run %s", spec.job_id, getattr(run, "url", None) or run.id)
        return cls(run, warn)

    def log(self, data: dict[str, float | int]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(dict(data))
        except Exception as exc:
            log.warning("W&B could not log a metrics event", exc_info=True)
            self._warn(f"W&B logging stopped: a metrics event could not be logged ({_reason(exc)})")
            self._abandon()

    def finish(self, exit_code: int) -> None:
        """Finish the run, waiting at most FINISH_TIMEOUT_SECONDS for W&B."""
        run, self._run = self._run, None
        if run is None:
            return
        failure: list[BaseException] = []

        def finish() -> None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                failure.append(exc)

        thread = threading.Thread(target=finish, name="wandb-finish", daemon=True)
        thread.start()
        thread.join(FINISH_TIMEOUT_SECONDS)
        if thread.is_alive():
            self._warn(f"W&B did not finish the run within {FINISH_TIMEOUT_SECONDS:g} s")
        elif failure:
            log.warning("W&B could not finish the run", exc_info=failure[0])
            self._warn(f"W&B could not finish the run ({_reason(failure[0])})")

    def _abandon(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1, quiet=True)
        except Exception:
            log.debug("W&B could not finish an abandoned run", exc_info=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
