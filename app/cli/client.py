"""The client commands' connection to a Tunehouse server: where it is and which key to send
(flags, then the environment, then the config file), and an HTTP client that turns the
server's error envelope into a one-line error.

Nothing here imports the server's own modules: the client commands start fast and work from
any machine that can reach the API."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from httpx_sse import connect_sse

from app import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# A stream may be quiet a while (a model loading, a job queued), but the server sends a
# keep-alive at least every 15 s: a minute of silence means the connection is gone.
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)

BaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        help="The API's base URL [default: $TUNEHOUSE_BASE_URL, $OPENAI_BASE_URL, the config "
        f"file, {DEFAULT_BASE_URL}]",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key [default: $TUNEHOUSE_API_KEY, $OPENAI_API_KEY, the config file]",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON (for scripts) instead of a table")
]


class ClientError(Exception):
    """An error to show the user as one line, with no traceback (`main` does), and exit 1."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# ---- where the server is ----------------------------------------------------------------------


def config_path(environ: Mapping[str, str]) -> Path:
    """$TUNEHOUSE_CONFIG, else tunehouse/config.toml in $XDG_CONFIG_HOME (~/.config)."""
    if environ.get("TUNEHOUSE_CONFIG"):
        return Path(environ["TUNEHOUSE_CONFIG"]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "tunehouse" / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"Cannot read the config file {path}: {exc}") from None


@dataclass(frozen=True)
class Connection:
    base_url: str
    api_key: str | None


def resolve(
    base_url: str | None,
    api_key: str | None,
    environ: Mapping[str, str],
    config: Mapping[str, Any],
) -> Connection:
    """Each of the base URL and the key from the first that has it: the flag, the
    TUNEHOUSE_ variable, the OPENAI_ one, the config file."""

    def first(flag: str | None, name: str) -> str | None:
        found = flag or environ.get(f"TUNEHOUSE_{name.upper()}")
        found = found or environ.get(f"OPENAI_{name.upper()}") or config.get(name)
        return str(found) if found else None

    url = first(base_url, "base_url") or DEFAULT_BASE_URL
    return Connection(url.rstrip("/"), first(api_key, "api_key"))


def connection(base_url: str | None, api_key: str | None) -> Connection:
    """The connection the flags, this process's environment and the config file give."""
    if base_url and api_key:  # the config file is not read when the flags say everything
        return Connection(base_url.rstrip("/"), api_key)
    return resolve(base_url, api_key, os.environ, read_config(config_path(os.environ)))


# ---- talking to it ----------------------------------------------------------------------------


def path_of(*parts: str) -> str:
    """A URL path from ids (model ids hold '/' and ':', which the routes take as they are)."""
    return "/".join(quote(part, safe="/:@") for part in parts)


def error_message(response: httpx.Response) -> str:
    """The message of the OpenAI error envelope, or what the response says otherwise."""
    try:
        error = response.json()["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    return f"{message} (HTTP {response.status_code})"


class Api:
    """The HTTP API at one base URL, with one key. Every failure is a ClientError."""

    def __init__(self, conn: Connection):
        if not conn.api_key:
            raise ClientError(
                "No API key: pass --api-key, set TUNEHOUSE_API_KEY (or OPENAI_API_KEY), "
                "or save one with `tunehouse login`."
            )
        self.base_url = conn.base_url
        self.http = httpx.Client(
            base_url=self.base_url + "/",
            headers={
                "Authorization": f"Bearer {conn.api_key}",
                "User-Agent": f"tunehouse-cli/{__version__}",
            },
            timeout=TIMEOUT,
        )

    def close(self) -> None:
        self.http.close()

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise ClientError(f"{self.base_url} did not answer in time.") from None
        except httpx.TransportError as exc:
            raise ClientError(f"Could not reach {self.base_url}: {exc}") from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a successful answer."""
        with self._reaching():
            response = self.http.request(method, path.lstrip("/"), **kwargs)
        if not response.is_success:
            raise ClientError(error_message(response))
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def stream(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The JSON objects of a server-sent event stream, until its `[DONE]`. An error sent
        in the stream becomes a ClientError."""
        with (
            self._reaching(),
            connect_sse(
                self.http,
                method,
                path.lstrip("/"),
                json=body,
                params=params,
                timeout=STREAM_TIMEOUT,
            ) as source,
        ):
            if not source.response.is_success:
                source.response.read()
                raise ClientError(error_message(source.response))
            for event in source.iter_sse():
                if event.data == "[DONE]":
                    return
                payload = json.loads(event.data)
                if isinstance(payload, dict) and "error" in payload:
                    raise ClientError(str(payload["error"].get("message", payload["error"])))
                yield payload


@contextmanager
def api(base_url: str | None, api_key: str | None) -> Iterator[Api]:
    client = Api(connection(base_url, api_key))
    try:
        yield client
    finally:
        client.close()
