"""The roles an API process can serve: its own module, so the CLI names them without loading
the settings (pydantic) when it only talks to a server."""

from __future__ import annotations

from typing import Literal

Role = Literal["control", "inference", "all"]
