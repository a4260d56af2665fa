"""What a soak saw: every request with its status and latency, and every violation of what a
user or an operator may expect (no 5xx, no answer slower than the bound, the right status and
the OpenAI error envelope), named so that it can be found in the server's log (each request
carries its own ``x-request-id``)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import httpx

# A 503 is the only 5xx a user may see, and only as load shedding: an inference concurrency
# limit that answers at once "busy, retry after N s" (OpenAI's envelope and Retry-After) is
# what keeps control routes fast while inference is saturated (issue 9, A.12). Such answers are
# counted and reported, not failed.
SHED_STATUS = 503


@dataclass(frozen=True)
class Call:
    request_id: str
    client: str
    op: str  # what the client did: "chat", "upload-bad", "events-follow", ...
    target: str  # method, path and model
    status: int | None  # None: no answer (timeout, connection refused or reset)
    seconds: float  # until the answer; for a stream, until its headers
    at: float  # seconds since the soak began
    baseline: bool
    problem: str | None = None
    kind: str | None = None  # the kind of problem: "5xx", "timeout", "slow", "status", ...

    def describe(self) -> str:
        status = self.status if self.status is not None else "no answer"
        return (
            f"{self.target} -> {status} after {self.seconds:.1f} s "
            f"(client {self.client}, request {self.request_id}, at {self.at:+.1f} s): "
            f"{self.problem}"
        )


@dataclass(frozen=True)
class Violation:
    kind: str  # "5xx", "timeout", "slow", "status", "envelope", "stream", "job", "resource", ...
    text: str


def envelope_error(body: bytes) -> str | None:
    """Why ``body`` is not OpenAI's error envelope; None when it is."""
    try:
        data = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:120]!r}"
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return f"not an error envelope: {body[:160]!r}"
    return None


def error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class Recorder:
    """Thread-safe log of calls and violations, shared by every client of one soak."""

    def __init__(self, bound: float):
        self.bound = bound
        # One clock for the whole soak: seconds since it began (warm-up and baseline first).
        self.origin = time.monotonic()
        self.load_started: float | None = None
        self.calls: list[Call] = []
        self.violations: list[Violation] = []
        self.shed = 0
        self._lock = threading.Lock()

    def start_load(self) -> float:
        self.load_started = self.now()
        return self.load_started

    def now(self) -> float:
        return time.monotonic() - self.origin

    def answered(
        self,
        *,
        request_id: str,
        client: str,
        op: str,
        target: str,
        started: float,
        response: httpx.Response | None,
        expect: tuple[int, ...],
        error: str | None = None,
        body: bytes | None = None,
        bound: float | None = None,
    ) -> Call:
        """Record one request; ``body`` is the body read so far (None for a stream's);
        ``bound`` replaces the soak's for this request."""
        seconds = time.monotonic() - started
        status = response.status_code if response is not None else None
        kind, problem = self._judge(response, body, expect, seconds, error, bound or self.bound)
        call = Call(
            request_id,
            client,
            op,
            target,
            status,
            seconds,
            started - self.origin,
            self.load_started is None,
            problem,
            kind,
        )
        with self._lock:
            self.calls.append(call)
            if status == SHED_STATUS and problem is None:
                self.shed += 1
            if problem is not None and kind is not None:
                self.violations.append(Violation(kind, call.describe()))
        return call

    def violation(self, kind: str, text: str) -> None:
        with self._lock:
            self.violations.append(Violation(kind, text))

    def _judge(
        self,
        response: httpx.Response | None,
        body: bytes | None,
        expect: tuple[int, ...],
        seconds: float,
        error: str | None,
        bound: float,
    ) -> tuple[str | None, str | None]:
        if response is None:
            if error and "timeout" in error.lower():
                return "timeout", f"no answer within {bound:.0f} s ({error})"
            return "connection", f"no answer: {error}"
        status = response.status_code
        if status >= 400 and body is not None and (why := envelope_error(body)):
            return "envelope", f"{status} without OpenAI's error envelope: {why}"
        if status == SHED_STATUS and "retry-after" in response.headers:
            return None, None  # load shed the documented way (see SHED_STATUS)
        if status >= 500:
            detail = error_message(body) if body is not None else ""
            return "5xx", f"server error {status}: {detail}"
        if status not in expect:
            detail = f": {error_message(body)}" if body is not None and status >= 400 else ""
            return "status", f"answered {status}, expected {'/'.join(map(str, expect))}{detail}"
        if seconds > bound:
            return "slow", f"took {seconds:.1f} s, over the {bound:.0f} s bound"
        return None, None


# -- figures ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of ``values``; nan when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class OpFigures:
    op: str
    count: int
    p50: float
    p99: float
    worst: float
    statuses: dict[str, int]


def op_figures(calls: list[Call]) -> dict[str, OpFigures]:
    by_op: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        by_op[call.op].append(call)
    figures = {}
    for op, op_calls in sorted(by_op.items()):
        answered = [c.seconds for c in op_calls if c.status is not None]
        statuses = Counter(str(c.status or "none") for c in op_calls)
        figures[op] = OpFigures(
            op,
            len(op_calls),
            percentile(answered, 50),
            percentile(answered, 99),
            max(answered, default=math.nan),
            dict(sorted(statuses.items())),
        )
    return figures


def latency_table(load: list[Call], baseline: list[Call]) -> str:
    """p50/p99 of each kind of request under the mixed load, beside the same requests made one
    at a time on the idle server (the baseline), as a ratio."""
    under, idle = op_figures(load), op_figures(baseline)
    lines = [
        f"{'request':<22}{'n':>6}{'p50 s':>9}{'idle':>8}{'ratio':>7}"
        f"{'p99 s':>9}{'idle':>8}{'ratio':>7}{'max s':>8}  statuses"
    ]
    for op, fig in under.items():
        base = idle.get(op)
        p50b, p99b = (base.p50, base.p99) if base else (math.nan, math.nan)
        lines.append(
            f"{op:<22}{fig.count:>6}{fig.p50:>9.3f}{p50b:>8.3f}{_ratio(fig.p50, p50b):>7}"
            f"{fig.p99:>9.3f}{p99b:>8.3f}{_ratio(fig.p99, p99b):>7}{fig.worst:>8.2f}  "
            + " ".join(f"{k}:{v}" for k, v in fig.statuses.items())
        )
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base <= 0:
        return "-"
    return f"{value / base:.1f}x"


def violations_text(violations: list[Violation], limit: int = 40) -> str:
    kinds = Counter(v.kind for v in violations)
    lines = [
        f"{len(violations)} violation(s): "
        + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
    ]
    # The first of each kind first, so one flood does not hide the others.
    firsts = {v.kind: v for v in reversed(violations)}
    ordered = list(firsts.values()) + [v for v in violations if v not in firsts.values()]
    lines += [f"  [{v.kind}] {v.text}" for v in ordered[:limit]]
    if len(violations) > limit:
        lines.append(f"  ... and {len(violations) - limit} more")
    return "\n".join(lines)


def hung_routes(calls: list[Call], at_least: int = 3) -> list[str]:
    """Kinds of request that stopped being answered for good: from some request on, every one
    went unanswered (at least ``at_least`` of them). A deadlock looks like this from outside."""
    by_op: dict[str, list[Call]] = defaultdict(list)
    for call in sorted(calls, key=lambda c: c.at):
        by_op[call.op].append(call)
    hung = []
    for op, op_calls in sorted(by_op.items()):
        tail = 0
        while tail < len(op_calls) and op_calls[-1 - tail].status is None:
            tail += 1
        if tail >= at_least:
            first = op_calls[-tail]
            hung.append(
                f"{op} ({first.target.split(' model=')[0]}): the last {tail} requests, from "
                f"+{first.at:.1f} s on, got no answer"
            )
    return hung
