"""Long responses hold no database connection. With a pool of 3 (2 + 1 overflow), a real server
follows 12 event streams, receives 4 uploads that trickle their bodies and sends 4 large
downloads to clients that do not read them, all at once, and meanwhile still answers other
requests promptly: the streams poll with a short session each time, the upload is
authenticated before its body with a session of its own, and the request's session closes
when the route returns. On SQLite and on PostgreSQL.

(Before, each of these held a pooled connection until its response ended: more of them than
the pool's 15 connections and every other request waited 30 s for one, then failed.)"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from app.core.db import dispose_engine, engine_urls, get_engine, session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.core.storage import Storage
from app.main import create_app
from app.services import files, keys
from tests.conftest import make_settings
from tests.served import served
from tests.support import BASE_MODEL, jsonl, sentiment_rows

STREAMS, UPLOADS, DOWNLOADS = 12, 4, 4  # 20 at once: more than the old pool's 15
DOWNLOAD_BYTES = 32 * 1024 * 1024  # far more than the socket buffers hold
PROMPT = 5.0  # seconds: a generous bound for a request while the others hang on
BOUNDARY = "pool-test-boundary"


@dataclass
class Server:
    base_url: str
    headers: dict[str, str]
    job_id: str
    download_id: str


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'tunehouse.db'}"
        return
    # A URL of its own (another application_name), so the small pool sized here is not the
    # one the other tests of this session use on the same database.
    url = request.getfixturevalue("postgres_url") + "?application_name=tunehouse-pool-test"
    yield url
    get_engine(url).dispose()


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    settings = make_settings(
        tmp_path / "data",
        database_url=database_url,
        db_pool_size=2,
        db_max_overflow=1,
        db_pool_timeout_seconds=10,
    )
    upgrade(settings.sqlalchemy_url)
    with served(create_app(settings)) as base_url:
        yield prepare(settings, base_url)


def prepare(settings: Settings, base_url: str) -> Server:
    """A queued job (no worker runs, so its event stream stays open) and a large file."""
    with session_scope(settings.sqlalchemy_url) as session:
        new = keys.create_key(session, f"pool-{uuid.uuid4().hex[:8]}")
        key, org_id = new.key, new.organization.id
        big = files.store_result_file(
            session, Storage(settings.storage_root), org_id, "big.csv", b"0" * DOWNLOAD_BYTES
        )
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        uploaded = client.post(
            "/v1/files",
            files={"file": ("t.jsonl", jsonl(sentiment_rows(20, seed=2)))},
            data={"purpose": "fine-tune"},
        )
        assert uploaded.status_code == 200, uploaded.text
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": BASE_MODEL, "training_file": uploaded.json()["id"]},
        )
        assert job.status_code == 200, job.text
    return Server(base_url, headers, job.json()["id"], big.id)


class Holders:
    """Clients that each start a long response (or a long request) and hold it open until
    ``release``; ``started`` is set by each once its response (or body) is under way."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.release = threading.Event()
        self.pool = ThreadPoolExecutor(STREAMS + UPLOADS + DOWNLOADS)
        self.futures: list[Future[int]] = []
        self.started: list[threading.Event] = []

    def start(self, hold: Callable[[httpx.Client, threading.Event], int]) -> None:
        started = threading.Event()
        self.started.append(started)

        def run() -> int:
            with httpx.Client(
                base_url=self.server.base_url, headers=self.server.headers, timeout=60
            ) as client:
                return hold(client, started)

        self.futures.append(self.pool.submit(run))

    def follow_events(self, client: httpx.Client, started: threading.Event) -> int:
        url = f"/v1/fine_tuning/jobs/{self.server.job_id}/events?stream=true"
        with client.stream("GET", url) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the job's first event: it follows
            started.set()
            self.release.wait(60)
            return response.status_code

    def download(self, client: httpx.Client, started: threading.Event) -> int:
        with client.stream("GET", f"/v1/files/{self.server.download_id}/content") as response:
            started.set()  # the headers came; the body waits in full socket buffers
            self.release.wait(60)
            return response.status_code

    def trickle_upload(self, client: httpx.Client, started: threading.Event) -> int:
        lines = itertools.cycle(jsonl(sentiment_rows(10, seed=3)).splitlines(keepends=True))

        def body() -> Iterator[bytes]:
            yield (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
                f'fine-tune\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                'filename="slow.jsonl"\r\n\r\n'
            ).encode()
            yield next(lines)
            started.set()
            while not self.release.wait(0.2):
                yield next(lines)  # a line now and then, well within the body timeout
            yield b"".join(next(lines) for _ in range(10)) + f"\r\n--{BOUNDARY}--\r\n".encode()

        response = client.post(
            "/v1/files",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert response.status_code == 200, response.text
        return response.status_code

    def finish(self) -> list[int]:
        self.release.set()
        try:
            return [future.result(timeout=60) for future in self.futures]
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


def test_long_responses_hold_no_database_connection(server: Server) -> None:
    holders = Holders(server)
    try:
        for _ in range(STREAMS):
            holders.start(holders.follow_events)
        for _ in range(UPLOADS):
            holders.start(holders.trickle_upload)
        for _ in range(DOWNLOADS):
            holders.start(holders.download)
        for index, started in enumerate(holders.started):
            assert started.wait(30), f"holder {index} never got going: the pool is exhausted"

        # Everything above is still open; other requests are answered at once.
        with httpx.Client(
            base_url=server.base_url, headers=server.headers, timeout=PROMPT
        ) as client:
            for _ in range(5):
                began = time.monotonic()
                listed = client.get("/v1/files")
                job = client.get(f"/v1/fine_tuning/jobs/{server.job_id}")
                assert listed.status_code == 200 and job.status_code == 200
                assert job.json()["status"] == "queued"
                assert time.monotonic() - began < PROMPT
    finally:
        statuses = holders.finish()
    assert statuses == [200] * (STREAMS + UPLOADS + DOWNLOADS)
    # The trickled uploads were stored whole once their bodies ended.
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:
        names = [f["filename"] for f in client.get("/v1/files").json()["data"]]
    assert names.count("slow.jsonl") == UPLOADS


def _open_files_of(database: Path) -> list[str]:
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            targets.append(str(fd.readlink()))
        except OSError:
            continue  # closed while we looked
    return [target for target in targets if target.startswith(str(database))]


def test_a_disposed_engine_closes_its_database_files_and_a_new_one_follows(
    tmp_path: Path,
) -> None:
    """A process that opens many databases in turn (the test run, one per test) closes each
    one's files when it is done with it; the URL still works afterwards."""
    database = tmp_path / "one.db"
    url = f"sqlite:///{database}"
    with ThreadPoolExecutor(4) as pool:  # several pooled connections, as under load
        list(pool.map(lambda _: _count_one(url), range(8)))
    assert _open_files_of(database), "the engine kept no connection open: nothing to dispose"

    dispose_engine(url)

    assert _open_files_of(database) == []
    assert url not in engine_urls()
    assert _count_one(url) == 1  # a new engine, built on demand


def _count_one(url: str) -> int:
    with session_scope(url) as session:
        return int(session.execute(text("SELECT 1")).scalar_one())
