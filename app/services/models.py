"""Models: the base models this server may fine-tune, and each organization's fine-tuned ones.

Model kinds (``app/core/kinds.py``, docs/model-kinds.md): ``encoder``, ``classification``,
``causal-lm`` (optionally a LoRA adapter over a registered base) and ``tabular``. No torch here:
a base model's kind is read from its ``config.json``.

Nothing from a model directory is executed or unpickled (design rule 4): a directory is loadable
only when its weights are safetensors files with valid headers, it holds no pickle weights (which
a loader might fall back to), and its config.json asks for no custom code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest, NotFound
from app.core.kinds import KIND_CAUSAL_LM, KIND_ENCODER, KIND_TABULAR, BaseKind, model_kind
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Checkpoint, FineTunedModel, Job, Organization

_CHECKPOINT_SUFFIX = re.compile(r"^(?P<model>.+):ckpt-step-(?P<step>\d+)$")
_SERVER_START = datetime.now().astimezone()

# The architecture designed from scratch: listed as a base model, with no directory.
MLP_MODEL = "tunehouse/mlp"
ADAPTER_CONFIG = "adapter_config.json"
# A job's parent_adapter (app/services/lineage.py): continue a LoRA parent's adapter, or merge it
# into its base and train a new one.
CONTINUE, MERGE = "continue", "merge"

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Weight files that are pickles: loading one runs whatever code it names. (A checkpoint's
# training_state.pt is not weights: only the worker reads it, with weights_only=True.)
PICKLE_WEIGHTS = ("*.bin", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str
    task: str | None = None
    base_model: str | None = None
    job_id: str | None = None
    labels: list[str] | None = None


@dataclass(frozen=True)
class LoadableModel:
    """What an inference process needs to load and serve a model.

    ``task`` is the model kind (``encoder``, ``classification``, ``causal-lm``, ``tabular``);
    ``base_path`` is set for a LoRA adapter (``path`` holds ``adapter_config.json``): the
    directory of the registered base model it applies to."""

    id: str
    task: str
    path: Path
    labels: list[str] | None
    base_path: Path | None = None

    @property
    def kind(self) -> str:
        return self.task


def base_model_kind(path: Path) -> BaseKind:
    """``causal-lm`` when config.json's ``architectures`` name a causal LM head, else
    ``encoder``. Raises OSError or ValueError when config.json cannot be read."""
    config = Path(path) / "config.json"
    stat = config.stat()
    # Read once per version of the file: listings and job creation ask on every request.
    return _kind_from_config(config, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _kind_from_config(config_path: Path, _mtime_ns: int, _size: int) -> BaseKind:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    architectures = config.get("architectures") or []
    if any(str(name).endswith(_CAUSAL_SUFFIXES) for name in architectures):
        return KIND_CAUSAL_LM
    return KIND_ENCODER


def unsafe_weights(path: Path) -> str | None:
    """Why the model directory at ``path`` may not be loaded, in words; None when it may."""
    try:
        stats = [(p.name, p.stat()) for p in Path(path).iterdir()]
        entries = tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))
    except OSError:
        return "its directory cannot be read"
    return _weights_verdict(Path(path), entries)


@lru_cache(maxsize=256)
def _weights_verdict(path: Path, entries: tuple[tuple[str, int, int], ...]) -> str | None:
    """``unsafe_weights`` once per version of a directory's listing (read on every request)."""
    from safetensors import SafetensorError, safe_open

    names = [name for name, _, _ in entries]
    pickles = [name for name in names if any(fnmatch(name, pattern) for pattern in PICKLE_WEIGHTS)]
    if pickles:
        return f"it holds pickle weights ({', '.join(pickles)}); weights load from safetensors only"
    tensors = [name for name in names if name.endswith(".safetensors")]
    if not tensors:
        return "it holds no safetensors weights"
    for name in tensors:
        try:
            with safe_open(str(path / name), framework="numpy"):  # reads the header only
                pass
        except (SafetensorError, OSError):
            return f"{name} is not a valid safetensors file"
    if "config.json" in names:
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "its config.json is not readable JSON"
        if isinstance(config, dict) and config.get("auto_map"):
            return "its config.json asks for custom code (auto_map), which this server never runs"
    return None


def require_safe_weights(path: Path, what: str = "The model") -> None:
    """Raise InvalidRequest (param ``model``) unless ``unsafe_weights`` finds nothing."""
    problem = unsafe_weights(path)
    if problem:
        raise InvalidRequest(
            f"{what} cannot be loaded: {problem}.", param="model", code="unsafe_model_files"
        )


def base_kind(settings: Settings, model_id: str) -> str | None:
    """The kind of a base model (``tabular`` for tunehouse/mlp); None when ``model_id`` is not
    a base model. Raises InvalidRequest when a registered base has no readable config.json."""
    if model_id == MLP_MODEL:
        return KIND_TABULAR
    path = settings.registered_base_models().get(model_id)
    if path is None:
        return None
    try:
        kind = base_model_kind(path)
    except (OSError, ValueError):
        raise InvalidRequest(
            f"Base model '{model_id}' is registered but its directory has no readable config.json.",
            param="model",
            code="model_not_available",
        ) from None
    require_safe_weights(path, f"Base model '{model_id}'")
    return kind


def is_base_model(settings: Settings, model_id: str) -> bool:
    return model_id == MLP_MODEL or model_id in settings.registered_base_models()


def _base_info(settings: Settings, model_id: str) -> ModelInfo:
    try:
        kind = base_kind(settings, model_id)
    except InvalidRequest:
        kind = None  # listed, but not usable until its directory is fixed
    return ModelInfo(
        id=model_id, created=int(_SERVER_START.timestamp()), owned_by="system", task=kind
    )


def _fine_tuned_info(model: FineTunedModel, org: Organization) -> ModelInfo:
    return ModelInfo(
        id=model.id,
        created=int(model.created_at.timestamp()),
        owned_by=org.name,
        task=model_kind(model.task),
        base_model=model.base_model,
        job_id=model.job_id,
        labels=model.labels,
    )


def list_models(session: Session, settings: Settings, org: Organization) -> list[ModelInfo]:
    base_ids = [*settings.registered_base_models(), MLP_MODEL]
    models = [_base_info(settings, model_id) for model_id in base_ids]
    rows = session.scalars(
        select(FineTunedModel)
        .where(FineTunedModel.organization_id == org.id)
        .order_by(FineTunedModel.created_at.desc())
    )
    return models + [_fine_tuned_info(row, org) for row in rows]


def _fine_tuned(session: Session, org: Organization, model_id: str) -> FineTunedModel | None:
    return session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.organization_id == org.id
        )
    )


def _not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def get_model(session: Session, settings: Settings, org: Organization, model_id: str) -> ModelInfo:
    if is_base_model(settings, model_id):
        return _base_info(settings, model_id)
    row = _fine_tuned(session, org, model_id)
    if row is None:
        raise _not_found(model_id)
    return _fine_tuned_info(row, org)


def delete_model(session: Session, storage: Storage, org: Organization, model_id: str) -> Path:
    """Delete a fine-tuned model's row; returns its directory for removal after commit."""
    row = _fine_tuned(session, org, model_id)
    if row is None:
        raise _not_found(model_id)
    path = storage.resolve(row.storage_path)
    session.delete(row)
    session.flush()
    return path


# The job id of an uploaded base model's row (POST /v1/models): no job trained it.
UPLOADED = ""


def uploaded_base_kind(session: Session, org: Organization, model_id: str) -> str | None:
    """The kind of one of ``org``'s uploaded base models; None when ``model_id`` is not one."""
    row = _fine_tuned(session, org, model_id)
    return model_kind(row.task) if row is not None and row.job_id == UPLOADED else None


def base_model_dir(
    session: Session, settings: Settings, storage: Storage, model_id: str
) -> Path | None:
    """The directory of a registered base model, or of an uploaded one (of any organization:
    for the server's own use, once a job's organization was checked)."""
    registered = settings.registered_base_models().get(model_id)
    if registered is not None:
        return registered
    row = session.get(FineTunedModel, model_id)
    if row is None or row.job_id != UPLOADED:
        return None
    return storage.resolve(row.storage_path)


def adapter_base(
    session: Session, settings: Settings, storage: Storage, row: FineTunedModel, path: Path
) -> Path | None:
    """The base directory of a LoRA adapter stored at ``path``; None for a standalone model."""
    if not (path / ADAPTER_CONFIG).is_file():
        return None
    base = base_model_dir(session, settings, storage, row.base_model)
    if base is None:
        raise NotFound(
            f"Model '{row.id}' is a LoRA adapter of '{row.base_model}', which is no longer "
            "registered on this server.",
            param="model",
            code="base_model_not_found",
        )
    return base


def _loadable(
    session: Session,
    settings: Settings,
    storage: Storage,
    row: FineTunedModel,
    model_id: str,
    path: Path,
) -> LoadableModel:
    base_path = adapter_base(session, settings, storage, row, path)
    return LoadableModel(model_id, model_kind(row.task), path, row.labels, base_path)


def loadable_by_id(
    session: Session, settings: Settings, storage: Storage, model_id: str
) -> LoadableModel:
    """A fine-tuned model of any organization, or a base model, by its id: for the server's own
    loads (pinned models, models of jobs that just succeeded), never for a caller's request."""
    row = session.get(FineTunedModel, model_id)
    if row is not None:
        return _loadable(session, settings, storage, row, row.id, storage.resolve(row.storage_path))
    base = settings.registered_base_models().get(model_id)
    if base is not None:
        return LoadableModel(model_id, base_kind(settings, model_id) or KIND_ENCODER, base, None)
    raise _not_found(model_id)


def _checkpoint_path(
    session: Session, storage: Storage, org: Organization, parent: FineTunedModel, step: int
) -> Path | None:
    checkpoint = session.scalar(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(
            Job.id == parent.job_id,
            Job.organization_id == org.id,
            Checkpoint.step_number == step,
        )
    )
    return storage.resolve(checkpoint.storage_path) if checkpoint is not None else None


def adapter_of_root_base(session: Session, job_id: str) -> bool:
    """Whether the LoRA checkpoints of job ``job_id`` are adapters of its root base model:
    always, but for a job that trained a new adapter over a fine-tuned parent's weights
    (app/services/lineage.py), whose base is stored nowhere."""
    lineage = session.scalar(select(Job.lineage).where(Job.id == job_id))
    return not lineage or lineage.get("parent_adapter") == CONTINUE


def resolve_loadable(
    session: Session, settings: Settings, storage: Storage, org: Organization, model_id: str
) -> LoadableModel:
    """Find a servable model: a fine-tuned model, one of its checkpoints, or a base model
    (``encoder`` or ``causal-lm``)."""
    row = _fine_tuned(session, org, model_id)
    if row is not None:
        return _loadable(session, settings, storage, row, row.id, storage.resolve(row.storage_path))
    match = _CHECKPOINT_SUFFIX.match(model_id)
    if match:
        parent = _fine_tuned(session, org, match["model"])
        if parent is not None:
            path = _checkpoint_path(session, storage, org, parent, int(match["step"]))
            if path is not None:
                if (path / ADAPTER_CONFIG).is_file() and not adapter_of_root_base(
                    session, parent.job_id
                ):
                    raise InvalidRequest(
                        f"Checkpoint '{model_id}' holds a LoRA adapter of weights merged for its "
                        f"job, which are not stored; use '{parent.id}', stored merged.",
                        param="model",
                        code="model_not_available",
                    )
                return _loadable(session, settings, storage, parent, model_id, path)
    if model_id == MLP_MODEL:
        raise InvalidRequest(
            f"'{MLP_MODEL}' is an architecture to fine-tune on a tabular file, not a trained "
            "model; use the model a tabular job created.",
            param="model",
        )
    base = settings.registered_base_models().get(model_id)
    if base is not None:
        kind = base_kind(settings, model_id) or KIND_ENCODER
        return LoadableModel(model_id, kind, base, None)
    raise _not_found(model_id)
