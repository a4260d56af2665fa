"""The soak harness (issue 9, B): mixed concurrent clients against a real Tunehouse for a
bounded time, with every violation a user or an operator would see reported by request, status
and latency. tests/test_soak.py runs its short form; bench/soak.py its long one."""

from tests.soak.deploy import distributed, embedded
from tests.soak.run import SoakConfig, SoakReport, Target, run_soak
from tests.soak.zoo import ModelFiles, Zoo, build_models

__all__ = [
    "ModelFiles",
    "SoakConfig",
    "SoakReport",
    "Target",
    "Zoo",
    "build_models",
    "distributed",
    "embedded",
    "run_soak",
]
