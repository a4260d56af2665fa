"""What an operator watches on the API processes: resident memory (VmRSS) and open file
descriptors, sampled from /proc every second, with named moments to compare."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic
    pid: int
    rss_mib: float
    fds: int


def read_sample(pid: int) -> Sample | None:
    """None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
    )
    return Sample(time.monotonic(), pid, rss_kib / 1024, fds)


@dataclass
class ResourceSampler:
    pids: list[int]
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def mark(self, name: str) -> None:
        """A named moment; sampled at once, so that it has a sample of its own."""
        self._sample_all()
        self.marks[name] = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_all()

    def _sample_all(self) -> None:
        for pid in self.pids:
            sample = read_sample(pid)
            if sample is not None:
                self.samples.append(sample)

    def at(self, pid: int, mark: str) -> Sample | None:
        """The sample taken at a mark."""
        moment = self.marks.get(mark)
        mine = [s for s in self.samples if s.pid == pid and moment is not None and s.at <= moment]
        return mine[-1] if mine else None

    def median_rss_before(self, pid: int, mark: str, span: float = 5.0) -> float | None:
        """Median RSS over the ``span`` seconds before a mark: one sample is noisy."""
        moment = self.marks.get(mark)
        if moment is None:
            return None
        window = [
            s.rss_mib for s in self.samples if s.pid == pid and moment - span <= s.at <= moment
        ]
        return statistics.median(window) if window else None

    def peak(self, pid: int) -> Sample | None:
        mine = [s for s in self.samples if s.pid == pid]
        return max(mine, key=lambda s: s.rss_mib) if mine else None

    def table(self) -> str:
        lines = []
        for pid in self.pids:
            row = []
            for mark in self.marks:
                sample = self.at(pid, mark)
                if sample is not None:
                    row.append(f"{mark} {sample.rss_mib:.0f} MiB/{sample.fds} fds")
            if (peak := self.peak(pid)) is not None:
                row.append(f"peak {peak.rss_mib:.0f} MiB")
            most_fds = max((s.fds for s in self.samples if s.pid == pid), default=0)
            row.append(f"most fds {most_fds}")
            warm, end_of_load = (self.median_rss_before(pid, m) for m in ("warm", "load end"))
            if warm is not None and end_of_load is not None:
                row.append(f"under load after warm-up {warm:.0f} -> {end_of_load:.0f} MiB")
            start, end = self.at(pid, "idle start"), self.at(pid, "idle end")
            if start and end:
                row.append(
                    f"idle end vs idle start: memory {end.rss_mib / start.rss_mib:.2f}x, "
                    f"descriptors {end.fds - start.fds:+d}"
                )
            lines.append(f"  API pid {pid}: " + ", ".join(row))
        return "\n".join(lines)
