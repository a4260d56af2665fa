"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a running
`tunehouse run`: a bad key, signing in, uploading, starting a job and watching its curves grow
from the events stream, with the drawn points equal to the job's metrics events, a prediction
from the page equal to the API's, the job buttons, models, keys, and a phone's width.

Screenshots go to tests/artifacts/dashboard/ (ignored by git); with UPDATE_DASHBOARD_SCREENSHOT=1
the job page's also replaces docs/dashboard.png, the README's picture."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.stacks import embedded_stack
from tests.support import ROOT, Stack, jsonl, tunehouse, wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, ViewportSize

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("TUNEHOUSE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
TERMINAL = ("succeeded", "failed", "cancelled")
# Each training step waits this long, so the curve is seen growing while the job runs.
STEP_DELAY = "0.15"


def tabular_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Rows a small MLP learns in seconds: the label is the sign of a linear function."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = [round(rng.uniform(-1, 1), 4) for _ in range(6)]
        rows.append({"features": x, "label": "up" if x[0] + 0.5 * x[1] - x[2] > 0 else "down"})
    return rows


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


class Running:
    def __init__(self, stack: Stack, key: str):
        self.stack, self.key, self.base_url = stack, key, stack.base_url
        self.http = httpx.Client(base_url=f"{stack.base_url}/v1", timeout=60)

    def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return self.http.request(method, path, headers=headers, **kwargs)

    def metrics_events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's metrics events' data, oldest first (the API pages them newest first)."""
        events: list[dict[str, Any]] = []
        after = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = self.api("GET", f"/fine_tuning/jobs/{job_id}/events", params=params).json()
            events += page["data"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        return [e["data"] for e in reversed(events) if e["type"] == "metrics"]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("dashboard")
    with embedded_stack(tmp, {"TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS": STEP_DELAY}) as (stack, key):
        yield Running(stack, key)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python (the `test` extra)")
    if not CHROMIUM.exists():
        _missing(f"Chromium at {CHROMIUM} (Debian's `chromium` package)")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's pictures only
    ARTIFACTS.mkdir(parents=True)
    print(f"\ndashboard screenshots: {ARTIFACTS}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() of a delete or revoke
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def shoot(page: Page, name: str, **kwargs: Any) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path


def sign_in(page: Page, running: Running, key: str | None = None) -> None:
    page.goto(f"{running.base_url}/")
    page.get_by_label("API key").fill(key or running.key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Fine-tuning jobs").wait_for()


def nav(page: Page, section: str) -> Locator:
    return page.get_by_role("navigation").get_by_role("link", name=section)


def no_horizontal_overflow(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_a_bad_key_shows_the_api_message(page: Page, running: Running) -> None:
    from playwright.sync_api import expect

    refused = running.api("GET", "/models", key="sk-th-not-a-key")
    assert refused.status_code == 401
    page.goto(f"{running.base_url}/")
    page.get_by_label("API key").fill("sk-th-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert").locator(".error-message")).to_have_text(
        refused.json()["error"]["message"]
    )
    expect(page.get_by_role("navigation")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
    shoot(page, "sign-in-refused")


def test_upload_train_watch_and_predict(page: Page, running: Running, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    sign_in(page, running)
    expect(nav(page, "API keys")).to_be_hidden()  # not an admin key

    # A bad file: the page shows the API's message, line number included.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([{"features": [1, 2], "label": "up"}, {"features": [1, 2]}]))
    expected = running.api(
        "POST",
        "/files",
        files={"file": ("bad.jsonl", bad.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert expected.status_code == 400 and "line 2" in expected.json()["error"]["message"]
    nav(page, "Files").click()
    page.get_by_label("File", exact=True).set_input_files(bad)
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-error .error-message")).to_have_text(
        expected.json()["error"]["message"]
    )

    # A good one: its stats and first rows.
    rows = tabular_rows(240, seed=3)
    good = tmp_path / "train.jsonl"
    good.write_bytes(jsonl(rows))
    page.get_by_label("File", exact=True).set_input_files(good)
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#file-stats")).to_contain_text("240")
    first = page.locator("#preview-table tbody tr").first
    expect(first).to_contain_text(str(rows[0]["features"]).replace(" ", ""))
    expect(first).to_contain_text(rows[0]["label"])
    shoot(page, "files")
    file_id = page.locator("#file-detail dd").first.inner_text()
    assert file_id.startswith("file-")

    # Start a job from the form; a second one, made through the API, waits behind it.
    nav(page, "Jobs").click()
    page.get_by_text("Start a fine-tuning job").click()
    page.get_by_label("Base model").select_option("tunehouse/mlp")
    page.get_by_label("Training file").select_option(file_id)
    page.get_by_label("Epochs").fill("2")
    page.get_by_label("Batch size").fill("8")
    page.get_by_label("Evaluate every (steps)").fill("3")
    page.get_by_label("Suffix").fill("dashboard")
    page.get_by_role("button", name="Start job").click()
    expect(page.locator("#job-status")).to_be_visible()
    job_id = page.url.rsplit("/", 1)[1]
    assert job_id.startswith("ftjob-")
    # It must still be queued or running when its buttons are clicked, after the first job's
    # checks: 50 epochs of the 240 rows took under 30 s in CI and left no Pause button. 50 epochs
    # of 2,000 rows one at a time are 100,000 steps, minutes even on a fast machine; it is
    # cancelled below.
    long_file = running.api(
        "POST",
        "/files",
        files={"file": ("long.jsonl", jsonl(tabular_rows(2000, seed=4)))},
        data={"purpose": "fine-tune"},
    ).json()["id"]
    second = running.api(
        "POST",
        "/fine_tuning/jobs",
        json={
            "model": "tunehouse/mlp",
            "training_file": long_file,
            "hyperparameters": {"n_epochs": 50, "batch_size": 1},
        },
    ).json()["id"]

    # The curve grows while the job runs: two readings with the job running, the second longer.
    def reading() -> tuple[str, int]:
        status, points = page.evaluate(
            """() => [document.querySelector('#job-status').dataset.status,
                      window.tunehouse.charts.loss?.data[0].length ?? 0]"""
        )
        return status, points

    first_reading = wait_until(
        lambda: (r := reading())[0] == "running" and r[1] >= 1 and r,
        120,
        interval=0.1,
        what="the loss curve's first points while the job runs",
    )
    grown = wait_until(
        lambda: (r := reading())[1] > first_reading[1] and r,
        60,
        interval=0.1,
        what="the loss curve to grow",
    )
    assert grown[0] == "running", grown
    shoot(page, "job-running")

    # It finishes; what is drawn is exactly the job's metrics events.
    expect(page.locator("#job-status")).to_have_attribute(
        "data-status", "succeeded", timeout=120_000
    )
    events = running.metrics_events(job_id)
    assert len(events) > grown[1]  # the second reading was taken before the end

    def drawn(chart: str) -> dict[str, Any]:
        return page.evaluate(
            """(name) => { const u = window.tunehouse.charts[name];
                           return {labels: u.series.map(s => s.label), data: u.data}; }""",
            chart,
        )

    steps = sorted({e["step"] for e in events})
    by_step = {e["step"]: e for e in events}
    wait_until(lambda: drawn("loss")["data"][0] == steps, 10, what="every event to be drawn")
    for chart, series in {
        "loss": {"train loss": "train_loss", "validation loss": "valid_loss"},
        "accuracy": {"validation accuracy": "valid_accuracy"},
        "learning_rate": {"learning rate": "learning_rate"},
        "throughput": {"samples/s": "samples_per_second", "tokens/s": "tokens_per_second"},
    }.items():
        plotted = drawn(chart)
        assert plotted["labels"] == ["step", *series], chart
        assert plotted["data"][0] == steps
        for values, key in zip(plotted["data"][1:], series.values(), strict=True):
            assert values == [by_step[s].get(key) for s in steps], (chart, key)
    assert any(by_step[s].get("valid_loss") is not None for s in steps)

    # A prediction from the page equals the API's.
    inputs = [[0.9, 0.1, -0.8, 0.0, 0.2, 0.0], [-0.7, -0.2, 0.6, 0.1, 0.0, 0.3]]
    model = page.locator("#try .model").first.inner_text().split()[0]
    answer = running.api("POST", "/predictions", json={"model": model, "input": inputs}).json()
    page.get_by_label("Rows of features").fill("\n".join(", ".join(map(str, x)) for x in inputs))
    page.get_by_role("button", name="Predict").click()
    result_rows = page.locator("#prediction tbody tr")
    expect(result_rows).to_have_count(len(inputs))
    for index, expected_row in enumerate(answer["data"]):
        row = result_rows.nth(index)
        assert row.locator(".label").inner_text() == expected_row["label"]
        assert float(row.locator(".score").inner_text()) == pytest.approx(
            expected_row["score"], abs=6e-5
        )
    assert {p["label"] for p in answer["data"]} == {"up", "down"}  # it learned the rule

    page.evaluate("window.scrollTo(0, 0)")
    # The README's picture: the job's summary, metrics and curves.
    picture = shoot(
        page, "job", full_page=True, clip={"x": 0, "y": 0, "width": 1280, "height": 1120}
    )
    shoot(page, "job-full", full_page=True)
    if os.environ.get("UPDATE_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(picture, ROOT / "docs" / "dashboard.png")

    # The job buttons, on the waiting job's row: pause, resume, cancel.
    nav(page, "Jobs").click()
    row = page.locator(f'tr[data-job-id="{second}"]')
    for verb, status in (
        ("Pause", "paused"),
        ("Resume", ("queued", "running")),
        ("Cancel", "cancelled"),
    ):
        row.get_by_role("button", name=verb).click()
        wait_until(
            lambda status=status: (
                running.api("GET", f"/fine_tuning/jobs/{second}").json()["status"] in status
            ),
            30,
            what=f"the second job to be {status}",
        )
    expect(row).to_have_attribute("data-status", "cancelled")
    expect(row.get_by_role("button")).to_have_count(0)  # nothing left to do to a cancelled job
    page.get_by_label("Status").select_option("succeeded")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    total = running.api("GET", f"/fine_tuning/jobs/{job_id}").json()["total_steps"]
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_contain_text(f"{total} / {total} steps")
    shoot(page, "jobs")

    # A phone's width: no page wider than the screen.
    page.set_viewport_size(PHONE)
    for name, section in (
        ("jobs", "jobs"),
        ("job", f"jobs/{job_id}"),
        ("files", "files"),
        ("models", "models"),
    ):
        page.goto(f"{running.base_url}/#/{section}")
        page.locator("main h1").first.wait_for()
        page.wait_for_load_state("networkidle")
        assert no_horizontal_overflow(page), section
        shoot(page, f"phone-{name}", full_page=True)
    page.set_viewport_size(DESKTOP)

    # Models: the base ones and the fine-tuned one, with their kinds; delete it.
    page.goto(f"{running.base_url}/#/models")
    expect(page.locator("#base-models")).to_contain_text("tunehouse/mlp")
    tuned = page.locator(f'tr[data-model="{model}"]')
    expect(tuned).to_contain_text("tabular")
    shoot(page, "models")
    tuned.get_by_role("button", name="Delete").click()
    expect(tuned).to_have_count(0)
    assert running.api("GET", f"/models/{model}").status_code == 404

    # Files: delete the training file (its job has ended).
    nav(page, "Files").click()
    listed = page.locator(f'tr[data-file-id="{file_id}"]')
    listed.get_by_role("button", name="Delete").click()
    expect(listed).to_have_count(0)
    assert running.api("GET", f"/files/{file_id}").status_code == 404


def test_admin_keys_and_sign_out(page: Page, running: Running) -> None:
    from playwright.sync_api import expect

    admin = tunehouse("keys", "create", "--admin", "--name", "admin", env=running.stack.env)
    sign_in(page, running, admin.stdout.strip())
    nav(page, "API keys").click()
    page.get_by_label("Name").fill("from-the-dashboard")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-value").inner_text()
    assert secret.startswith("sk-th-")
    assert running.api("GET", "/models", key=secret).status_code == 200
    row = page.locator("tr", has_text="from-the-dashboard")
    expect(row).to_contain_text(secret[:12])
    assert secret not in row.inner_text()  # the table shows its prefix only
    shoot(page, "keys")
    row.get_by_role("button", name="Revoke").click()
    expect(row).not_to_contain_text("Revoke")
    wait_until(
        lambda: running.api("GET", "/models", key=secret).status_code == 401,
        10,
        what="the revoked key to be refused",
    )

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()  # nothing remembers the key
    expect(page.get_by_label("API key")).to_be_visible()
