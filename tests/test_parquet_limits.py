"""Parquet files that hold far more than they weigh (issue 9, A4): a 939-byte zstd file of 32
cells of 8 MiB passed the 1 MiB row limit and cost ~480 MB to validate. The footer's sizes are
checked before any data is read, each row's size is measured before it becomes Python objects,
and the file as a whole has a limit (max_dataset_uncompressed_bytes): a 400 naming the row, and
nothing stored."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.services.datasets import DatasetError, DatasetLimits, validate_dataset
from tests.support import ROOT
from tests.test_bad_input import assert_error, changes_nothing

MiB = 1024 * 1024


def bomb(rows: int = 32, cell_bytes: int = 8 * MiB, **write_options: Any) -> bytes:
    """``rows`` text cells of ``cell_bytes`` of one repeated character, zstd: the stored file
    keeps the value once (a dictionary), so it weighs under a kilobyte. Built from a
    dictionary array, so the test itself never holds the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), ["a" * cell_bytes])
    labels = pa.array(["x", "y"] * (rows // 2))
    sink = io.BytesIO()
    pq.write_table(
        pa.table({"text": text, "label": labels}), sink, compression="zstd", **write_options
    )
    return sink.getvalue()


def parquet_bytes(table: Any, **write_options: Any) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", **write_options)
    return sink.getvalue()


def refusal(tmp_path: Path, content: bytes, limits: DatasetLimits | None = None) -> str:
    path = tmp_path / "data.parquet"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        validate_dataset(path, limits=limits)
    return str(info.value)


# The API in a process of its own, so that its peak memory is the upload's alone: a small
# Parquet upload first (imports and pools warmed), then the bomb, then four bombs at once,
# measured by ru_maxrss (the process's peak resident memory).
PROBE = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from fastapi.testclient import TestClient
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import keys
from tests.conftest import make_settings

data_dir, bomb_path, warm_path = (Path(arg) for arg in sys.argv[1:4])
settings = make_settings(data_dir)
upgrade(settings.sqlalchemy_url)
with session_scope(settings.sqlalchemy_url) as session:
    key = keys.create_key(session, "org-a").key
headers = {"Authorization": f"Bearer {key}"}

def upload(path):
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    return client.post("/v1/files", headers=headers, files=files, data={"purpose": "fine-tune"})

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

with TestClient(create_app(settings)) as client:
    warm = upload(warm_path)
    assert warm.status_code == 200, warm.text
    stored = sorted(str(p) for p in settings.storage_root.rglob("*") if p.is_file())
    before = peak_mb()
    response = upload(bomb_path)
    growth = peak_mb() - before
    # Then four at once: each is bounded, so together they are too.
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda _: upload(bomb_path).status_code, range(4)))
    growth_together = peak_mb() - before
    after = sorted(str(p) for p in settings.storage_root.rglob("*") if p.is_file())
    listed = client.get("/v1/files", headers=headers).json()["data"]
print(json.dumps({
    "status": response.status_code, "body": response.json(), "growth_mb": growth,
    "together": together, "growth_together_mb": growth_together,
    "stored_same": stored == after, "listed": len(listed),
}))
"""


def test_the_939_byte_bomb_is_refused_by_its_row_with_memory_to_spare(tmp_path: Path) -> None:
    import pyarrow as pa

    content = bomb()
    assert len(content) < 2048, len(content)  # the file weighs 939 bytes
    (tmp_path / "bomb.parquet").write_bytes(content)
    warm = pa.table({"text": ["good film", "bad film"] * 4, "label": ["pos", "neg"] * 4})
    (tmp_path / "warm.parquet").write_bytes(parquet_bytes(warm))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            str(tmp_path / "data"),
            *(str(tmp_path / name) for name in ("bomb.parquet", "warm.parquet")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 400, outcome
    error = outcome["body"]["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "file",
        "invalid_file",
    )
    assert error["message"].startswith("Invalid file 'bomb.parquet': row 1: "), error
    assert "max_dataset_line_bytes" in error["message"]
    # Nothing stored: the warm-up file is the only one, on disk and in the listing.
    assert outcome["stored_same"] and outcome["listed"] == 1, outcome
    # Before the fix the upload grew the process by ~480 MB (32 x 8 MiB, twice over).
    assert outcome["growth_mb"] < 100, outcome
    assert outcome["together"] == [400] * 4, outcome
    assert outcome["growth_together_mb"] < 200, outcome
    print(
        f"peak memory growth: one bomb {outcome['growth_mb']:.0f} MB, "
        f"four at once {outcome['growth_together_mb']:.0f} MB"
    )


def test_a_bomb_without_dictionaries_is_refused_from_the_footer(tmp_path: Path) -> None:
    """Plain-encoded, the 256 MiB are in the footer's uncompressed size: refused before any
    page is read, naming the first row of the row group (the footer knows no finer)."""
    message = refusal(tmp_path, bomb(use_dictionary=False))
    assert message.startswith("row 1: the row group starting at this row holds at least "), message
    assert "(the Parquet metadata tells row groups only)" in message


def test_a_list_of_two_million_numbers_is_refused_from_the_footer(tmp_path: Path) -> None:
    """Rows of 2,000,000 zeros are stored as one dictionary value and runs of indices: the
    footer's count of values shows 16 MB a row, far over the 1 MiB a row may hold."""
    import pyarrow as pa

    values = pa.repeat(0.0, 4_000_000)
    zeros = pa.ListArray.from_arrays([0, 2_000_000, 4_000_000], values)
    content = parquet_bytes(pa.table({"features": zeros, "label": ["a", "b"]}))
    assert len(content) < 64 * 1024
    message = refusal(tmp_path, content)
    assert message.startswith(
        "row 1: the row group starting at this row holds at least 32000000 "
    ), message


def test_many_rows_each_under_the_row_limit_are_refused_by_the_file_limit(
    tmp_path: Path,
) -> None:
    """2,000 rows of 900 KiB, each within the row limit, are 1.8 GB once read: refused at the
    row where the running total passes max_dataset_uncompressed_bytes."""
    content = bomb(rows=2000, cell_bytes=900 * 1024)
    assert len(content) < 64 * 1024
    limits = DatasetLimits(max_uncompressed_bytes=64 * MiB)
    message = refusal(tmp_path, content, limits)
    # 64 MiB / 900 KiB: the 73rd row passes it.
    assert message.startswith("row 73: the file's rows up to this one hold more than 67108864 "), (
        message
    )
    assert "max_dataset_uncompressed_bytes" in message


def test_the_file_limit_is_checked_from_the_footer_first(tmp_path: Path) -> None:
    content = bomb(rows=8, cell_bytes=512 * 1024, use_dictionary=False, row_group_size=2)
    limits = DatasetLimits(max_uncompressed_bytes=5 * MiB // 2)
    message = refusal(tmp_path, content, limits)
    # Row groups of 2 rows x 512 KiB: the third group (rows 5-6) takes the file past 2.5 MiB.
    assert message.startswith("row 5: the file holds more than 2621440 bytes"), message
    assert "(the Parquet metadata)" in message


def test_the_file_limit_is_the_setting(api, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.settings import Settings

    assert api.settings.max_dataset_uncompressed_bytes is None  # default: max_upload_bytes
    assert DatasetLimits.from_settings(api.settings).max_uncompressed_bytes == (
        api.settings.max_upload_bytes
    )
    monkeypatch.setenv("TUNEHOUSE_MAX_DATASET_UNCOMPRESSED_BYTES", "1000")
    assert DatasetLimits.from_settings(Settings(_env_file=None)).max_uncompressed_bytes == 1000


def test_the_bomb_through_the_api_stores_nothing(api) -> None:
    with changes_nothing(api):
        response = api.client.post(
            "/v1/files",
            headers=api.headers(),
            files={"file": ("b.parquet", bomb(), "application/octet-stream")},
            data={"purpose": "fine-tune"},
        )
        error = assert_error(response, 400, param="file", words="row 1: the row holds 8388609")
    assert error["code"] == "invalid_file"


def test_rows_are_numbered_across_row_groups_batches_and_slices(tmp_path: Path) -> None:
    """Many row groups, rows of mixed sizes (some batches turn into Python objects in several
    slices): a fine file reads whole, and a bad row is still named exactly."""
    import pyarrow as pa

    texts = [("w" * (300 * 1024) if i % 7 == 0 else f"row {i}") for i in range(3000)]
    labels: list[str | None] = ["a", "b"] * 1500
    path = tmp_path / "fine.parquet"
    path.write_bytes(parquet_bytes(pa.table({"text": texts, "label": labels}), row_group_size=700))
    info = validate_dataset(path)
    assert (info.format, info.rows, info.stats["label_counts"]) == (
        "classification",
        3000,
        {"a": 1500, "b": 1500},
    )
    labels[2499] = None
    bad = parquet_bytes(pa.table({"text": texts, "label": labels}), row_group_size=700)
    assert refusal(tmp_path, bad) == (
        "row 2500: field 'label' must be a string or an integer, got null"
    )


def test_a_long_row_after_good_ones_is_named_after_them(tmp_path: Path) -> None:
    """A row over the limit is refused at its own number, after the rows before it were
    checked (a bad row before it is the one reported)."""
    import pyarrow as pa

    texts = ["fine"] * 10 + ["x" * (2 * MiB)] + ["fine"] * 5
    labels = ["a", "b"] * 8
    content = parquet_bytes(pa.table({"text": texts, "label": labels}))
    assert refusal(tmp_path, content).startswith("row 11: the row holds 2097153 bytes, more than")
    labels[3] = ""
    content = parquet_bytes(pa.table({"text": texts, "label": labels}))
    assert refusal(tmp_path, content) == "row 4: field 'label' is empty"


def test_nested_chat_strings_are_measured_too(tmp_path: Path) -> None:
    import pyarrow as pa

    content_column = pa.DictionaryArray.from_arrays(
        pa.array([0, 1] * 16, pa.int32()),
        [
            "a" * (8 * MiB),
            "hi",
        ],
    )
    roles = pa.array(["assistant", "user"] * 16)
    message = pa.StructArray.from_arrays([roles, content_column], names=["role", "content"])
    messages = pa.ListArray.from_arrays(pa.array(range(0, 33, 2), pa.int32()), message)
    message_text = refusal(tmp_path, parquet_bytes(pa.table({"messages": messages})))
    assert message_text.startswith("row 1: the row holds 8388623 bytes"), message_text
