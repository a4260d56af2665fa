"""One soak client's HTTP: every request goes to one of the API processes picked at random (no
proxy in front, as with replicas behind DNS), carries a request id of its own (the server logs
it), and is recorded with its status and latency. A stream that the server cuts, or that stays
silent longer than the bound, is a violation too."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import httpx

from tests.soak.record import Recorder


@dataclass(frozen=True)
class _Sent:
    """A request on its way: what the recorder needs once it is answered."""

    url: str
    request_id: str
    op: str
    target: str
    expect: tuple[int, ...]
    started: float


class Http:
    def __init__(
        self,
        name: str,
        urls: list[str],
        key: str,
        recorder: Recorder,
        rng: random.Random,
        transport: httpx.BaseTransport | None = None,  # the harness's own tests mock the server
    ):
        self.name, self.urls, self.recorder, self.rng = name, urls, recorder, rng
        self.client = httpx.Client(
            timeout=httpx.Timeout(recorder.bound, connect=10),
            headers={"Authorization": f"Bearer {key}"},
            transport=transport,
        )
        self.sent = 0
        # What the client is waiting for now: named in the report if it never comes back.
        self.waiting_on: str | None = None
        # The last stream broke (a timeout or a reset) rather than ended.
        self.broken = False

    def close(self) -> None:
        self.client.close()

    def _send(
        self, op: str, method: str, path: str, model: str | None, expect: tuple[int, ...]
    ) -> _Sent:
        self.sent += 1
        request_id = f"soak-{self.name}-{self.sent}"
        target = f"{method} {path}" + (f" model={model}" if model else "")
        self.waiting_on = f"{target} (request {request_id}, since {self.recorder.now():+.1f} s)"
        url = self.rng.choice(self.urls) + path
        return _Sent(url, request_id, op, target, expect, time.monotonic())

    def _record(
        self,
        sent: _Sent,
        response: httpx.Response | None,
        *,
        body: bytes | None = None,
        error: str | None = None,
        bound: float | None = None,
    ) -> None:
        self.recorder.answered(
            request_id=sent.request_id,
            client=self.name,
            op=sent.op,
            target=sent.target,
            started=sent.started,
            response=response,
            expect=sent.expect,
            body=body,
            error=error,
            bound=bound,
        )

    def call(
        self,
        op: str,
        method: str,
        path: str,
        *,
        expect: tuple[int, ...] = (200,),
        model: str | None = None,
        headers: dict[str, str] | None = None,
        bound: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response | None:
        """One request, read whole; None when no answer came (recorded as a violation).
        ``bound`` replaces the soak's bound for this request."""
        sent = self._send(op, method, path, model, expect)
        headers = {"x-request-id": sent.request_id, **(headers or {})}
        if bound is not None:
            kwargs["timeout"] = httpx.Timeout(bound, connect=10)
        try:
            response = self.client.request(method, sent.url, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            self._record(sent, None, error=_describe(exc), bound=bound)
            return None
        finally:
            self.waiting_on = None
        self._record(sent, response, body=response.content, bound=bound)
        _back_off(response)
        return response

    def stream(
        self, op: str, method: str, path: str, *, model: str | None = None, **kwargs: Any
    ) -> Generator[str, None, None]:
        """The lines of a streamed 200 answer (none for any other answer, which is recorded
        with its body). The caller may stop early: that closes the connection, as a client
        that goes away does."""
        sent = self._send(op, method, path, model, (200,))
        self.broken = streaming = False
        try:
            headers = {"x-request-id": sent.request_id}
            with self.client.stream(method, sent.url, headers=headers, **kwargs) as response:
                if response.status_code != 200:
                    self._record(sent, response, body=response.read())
                    _back_off(response)
                    return
                self._record(sent, response)
                streaming = True
                self.waiting_on = f"the next line of {sent.target} (request {sent.request_id})"
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            if not streaming:
                self._record(sent, None, error=_describe(exc))
                return
            self.broken = True
            self.recorder.violation(
                "stream",
                f"{sent.target} (client {self.name}, request {sent.request_id}): the stream "
                f"broke after {time.monotonic() - sent.started:.1f} s: {_describe(exc)}",
            )
        finally:
            self.waiting_on = None

    def stream_violation(self, what: str, text: str) -> None:
        self.recorder.violation(
            "stream", f"{what} (client {self.name}, request soak-{self.name}-{self.sent}): {text}"
        )


def _back_off(response: httpx.Response) -> None:
    """A client told "busy, retry after N s" (a shed 503) waits, up to 2 s, as the SDK does."""
    if response.status_code == 503:
        with contextlib.suppress(ValueError):
            time.sleep(min(float(response.headers.get("retry-after", "0")), 2.0))


def _describe(exc: httpx.HTTPError) -> str:
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({name})"
    return f"{name}: {exc}"[:200]
