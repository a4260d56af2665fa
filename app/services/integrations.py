"""Whether a job's ``integrations`` can be honoured where this server runs. No import of the
integrations' packages here: the API only looks for them.

A ``wandb`` integration needs the ``wandb`` package (the ``wandb`` extra) and a configuration
for it: ``WANDB_API_KEY`` (or a ``wandb login`` entry in ``~/.netrc`` for the W&B host), or
``WANDB_MODE`` set to ``offline``/``dryrun`` (runs kept on disk, for ``wandb sync`` later) or
``disabled``. The API checks its own environment when a job is created; the workers' training
processes, which log the run, must be configured alike (they are the same process tree under
``tunehouse run``, and get the same environment in the compose and Kubernetes deployments).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from collections.abc import Mapping
from urllib.parse import urlparse

# WANDB_MODE values that need no key: nothing is sent to a W&B server.
WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")
_WANDB_HOST = "api.wandb.ai"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_configured(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE", "").strip().lower() in WANDB_LOCAL_MODES:
        return True
    if env.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "")).hostname or _WANDB_HOST
    return _netrc_has(host)


def wandb_unavailable() -> str | None:
    """Why a wandb integration cannot be honoured here, in words; None when it can."""
    if not wandb_installed():
        return (
            "A wandb integration needs the wandb package, which is not installed on this "
            "server; install it (pip install wandb, or the server's 'wandb' extra) or create "
            "the job without the integration."
        )
    if not wandb_configured():
        return (
            "A wandb integration needs W&B configured on this server, and it is not: set "
            "WANDB_API_KEY (or WANDB_MODE=offline to keep runs on the server's disk) in the "
            "environment of its API and workers, or create the job without the integration."
        )
    return None
