"""Models loaded before anyone asks: pinned models at start-up, and each job's model as it
succeeds, in every inference process (each replica looks for itself; nothing is sent to it).

One background thread per inference-role process (started and stopped by the app's lifespan):
1. imports torch and transformers (seconds of the first request's wait otherwise);
2. loads ``TUNEHOUSE_PINNED_MODELS`` (pinned in the cache: never evicted for its limits);
3. every ``TUNEHOUSE_WARM_POLL_SECONDS`` looks, in one short session, for jobs that succeeded in
   the last ``LOOKBACK`` seconds (an indexed query on ``jobs (status, updated_at)``) and loads
   the models it has not seen yet, for the use each kind mainly serves.

The look-back covers a commit that lands after its row's timestamp and clocks that differ
between machines; the ids seen within it are remembered, so each model is warmed once. It is
bounded: at most ``capacity`` models a look, newest first, and none when the cache has no room
an idle model could give (``ModelCache.warm``), so warming never evicts a model in use or a
pinned one. Loading happens with no database session open. Start-up and ``/healthz`` never wait
for any of this.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import select

from app.core.db import session_scope
from app.core.errors import InvalidRequest, NotFound
from app.core.kinds import KIND_CAUSAL_LM, KIND_CLASSIFICATION, KIND_ENCODER, KIND_TABULAR
from app.core.settings import Settings
from app.core.storage import Storage
from app.inference.concurrency import configure_torch_threads
from app.inference.loading import import_runtime
from app.inference.protocols import Use
from app.inference.registry import ModelCache
from app.models import Job, utcnow
from app.services.jobs import SUCCEEDED
from app.services.models import LoadableModel, loadable_by_id

log = logging.getLogger(__name__)

# The use each kind of model mainly serves: what warming loads it for.
MAIN_USE: dict[str, Use] = {
    KIND_CLASSIFICATION: "predict",
    KIND_TABULAR: "predict",
    KIND_CAUSAL_LM: "generate",
    KIND_ENCODER: "embed",
}
LOOKBACK = timedelta(seconds=60)


class Warmer:
    def __init__(self, cache: ModelCache, settings: Settings):
        self.cache, self.settings = cache, settings
        self.storage = Storage(settings.storage_root)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, datetime] = {}  # model id -> its job's success, within LOOKBACK
        self.started = threading.Event()  # the runtime is imported and pinned models loaded

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunehouse-warmer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop looking; a load in progress finishes on its own (the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            configure_torch_threads(self.settings)  # before anything imports torch
            import_runtime()
            for model_id in self.settings.pinned_models:
                if self._stop.is_set():
                    return
                model = self._find(model_id)
                if model is not None:
                    self._warm(model)
            self.started.set()
        except Exception:  # never take the process down; requests still load on demand
            log.exception("loading pinned models failed")
        interval = self.settings.warm_poll_seconds
        while interval > 0 and not self._stop.wait(interval):
            try:
                self.warm_new_models()
            except Exception as exc:  # the database away for a moment: look again later
                log.warning("looking for new models failed: %s", exc)

    def warm_new_models(self) -> None:
        """Load the models of the jobs that succeeded since the last look."""
        since = utcnow() - LOOKBACK
        self._seen = {k: at for k, at in self._seen.items() if at >= since}
        models: list[LoadableModel] = []
        with session_scope(self.settings.sqlalchemy_url) as session:
            rows = session.execute(
                select(Job.fine_tuned_model, Job.updated_at)
                .where(Job.status == SUCCEEDED, Job.updated_at >= since)
                .order_by(Job.updated_at.desc())
                .limit(self.cache.capacity)
            ).all()
            for model_id, updated_at in rows:
                if model_id is None or model_id in self._seen:
                    continue
                self._seen[model_id] = updated_at
                try:
                    models.append(loadable_by_id(session, self.settings, self.storage, model_id))
                except (NotFound, InvalidRequest):  # deleted since, or its base is gone
                    continue
        for model in reversed(models):  # the newest last: the most recently used
            if self._stop.is_set():
                return
            self._warm(model)

    def _find(self, model_id: str) -> LoadableModel | None:
        try:
            with session_scope(self.settings.sqlalchemy_url) as session:
                return loadable_by_id(session, self.settings, self.storage, model_id)
        except (NotFound, InvalidRequest) as exc:
            log.warning("pinned model %s cannot be loaded: %s", model_id, exc)
            return None

    def _warm(self, model: LoadableModel) -> None:
        use = MAIN_USE.get(model.kind)
        if use is None:
            return
        try:
            if self.cache.warm(model, use):
                log.info("warmed %s for %s", model.id, use)
        except Exception as exc:  # its first request will say what is wrong
            log.warning("could not warm %s: %s", model.id, exc)
