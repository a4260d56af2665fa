"""The client half of the `tunehouse` command, run as a user runs it (`python -m app.cli`, the
installed entry point's module) against one real `tunehouse run` shared by the module: files,
jobs (followed live in a real terminal under tmux, and as plain lines in a pipe), models,
predictions and a streamed chat, each checked against what the HTTP API says."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stacks import embedded_stack
from tests.support import ROOT, fact_texts, jsonl, wait_until
from tests.tiny_models import build_causal_lm

pytestmark = pytest.mark.slow

TINY_LLAMA = "tiny-llama"
MLP = "tunehouse/mlp"


def tabular_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Rows whose label is the sign of the first two features' sum: an MLP learns it in a
    few steps, with no base model to load."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = [round(rng.uniform(-1, 1), 3) for _ in range(4)]
        rows.append({"features": x, "label": "up" if x[0] + x[1] > 0 else "down"})
    return rows


@dataclass(frozen=True)
class Server:
    base_url: str  # with /v1
    key: str
    env: dict[str, str]  # a user's environment: the URL and key, no config file
    data: Path  # where the test's local files are

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.request(
            method, f"{self.base_url}{path}", headers=headers, timeout=60, **kwargs
        )

    def cli(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`tunehouse ARGS` in a pipe (not a terminal), as a script runs it."""
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=ROOT,
            env=self.env if env is None else env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, f"tunehouse {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


def user_env(home: Path, **extra: str) -> dict[str, str]:
    # The terminal's size is its own (some libraries set COLUMNS in the test process).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TUNEHOUSE_", "OPENAI_")) and k not in ("TMUX", "COLUMNS", "LINES")
    }
    # No config file of the person running the tests is read.
    return {**env, "HOME": str(home), "TUNEHOUSE_CONFIG": str(home / "none.toml"), **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli")
    llama = build_causal_lm(tmp / "tiny-llama", fact_texts(), hidden_size=32)
    data = tmp / "files"
    data.mkdir()
    (data / "tab.jsonl").write_bytes(jsonl(tabular_rows(60, seed=1)))
    (data / "tab-valid.jsonl").write_bytes(jsonl(tabular_rows(20, seed=2)))
    bad = tabular_rows(4, seed=3)
    del bad[2]["label"]  # line 3
    (data / "bad.jsonl").write_bytes(jsonl(bad))
    settings = {
        "TUNEHOUSE_BASE_MODELS": json.dumps({TINY_LLAMA: str(llama)}),
        "TUNEHOUSE_WORKER_MAX_PROCESSES": "1",  # a job asking for 2 fails, at once
    }
    with embedded_stack(tmp, settings) as (stack, key):
        base_url = f"{stack.base_url}/v1"
        env = user_env(tmp, TUNEHOUSE_BASE_URL=base_url, TUNEHOUSE_API_KEY=key)
        yield Server(base_url, key, env, data)


# ---- following a job in a real terminal ------------------------------------------------------


@dataclass(frozen=True)
class Followed:
    job_id: str
    screens: list[str]  # what the terminal showed, polled while the command ran
    final: str  # the terminal once the command had exited


@pytest.fixture(scope="module")
def followed(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Followed]:
    """`tunehouse jobs create ... --follow` typed into a 120x30 terminal (tmux): a tabular job
    from local files, uploaded by the command, followed to its end."""
    assert shutil.which("tmux"), "the terminal test needs tmux (e.g. apt-get install tmux)"
    tmp = tmp_path_factory.mktemp("tmux")
    command = [
        sys.executable, "-m", "app.cli", "jobs", "create", str(server.data / "tab.jsonl"),
        "--validation-file", str(server.data / "tab-valid.jsonl"), "--model", MLP,
        "--epochs", "10", "--batch-size", "8", "--follow",
    ]  # fmt: skip
    script = tmp / "follow.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in server.env.items())
    script.write_text(
        f'{exports}cd {shlex.quote(str(ROOT))}\n{shlex.join(command)}\necho "exit=$?"\nsleep 600\n'
    )
    socket = str(tmp / "tmux.sock")

    def tmux(*args: str) -> str:
        # The user's environment (no COLUMNS): the terminal gives the width.
        return subprocess.run(
            ["tmux", "-S", socket, *args],
            env=server.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    tmux("new-session", "-d", "-x", "120", "-y", "30", "-s", "follow", f"bash {script}")
    try:
        screens: list[str] = []

        def ended() -> bool:
            screens.append(tmux("capture-pane", "-p", "-J", "-S", "-100", "-t", "follow"))
            return "exit=" in screens[-1]

        wait_until(ended, 240, interval=0.2, what="`jobs create --follow` to exit in tmux")
        final = screens.pop()
        print(final)  # shown when a test fails
        found = re.search(r"Created job (ftjob-\w+)", final)
        assert found, final
        yield Followed(found.group(1), screens, final)
    finally:
        subprocess.run(["tmux", "-S", socket, "kill-server"], capture_output=True)


def test_follow_in_a_terminal_shows_a_live_bar_then_the_outcome(
    server: Server, followed: Followed
) -> None:
    job = server.api("GET", f"/fine_tuning/jobs/{followed.job_id}").json()
    assert job["status"] == "succeeded", job
    total = job["total_steps"]
    assert total == 80  # 60 rows, batches of 8, 10 epochs

    # While the job ran, the bar was live: the status and a step count on one line.
    live = [s for s in followed.screens if re.search(r"running .*step \d+/", s)]
    assert live, followed.screens[-3:]
    # At the end: the bar at the last step with its loss and validation figures, the events
    # printed above it, and the outcome; the command exited 0.
    final = followed.final
    bar = next(line for line in final.splitlines() if f"step {total}/{total}" in line)
    assert bar.lstrip().startswith("succeeded"), final
    assert re.search(r"loss \d\.\d{4}  valid loss \d\.\d{4}  valid accuracy", final), final
    assert "samples/s" in final
    assert "The job has successfully completed" in final
    # Lines as wide as the terminal: this one (over 80 characters) is not wrapped.
    assert re.search(r"Validating training file: file-\w+, file-\w+\n", final), final
    assert f"Job {followed.job_id} succeeded: {job['fine_tuned_model']}" in final
    assert "exit=0" in final


def test_follow_prints_plain_lines_when_not_a_terminal(server: Server, followed: Followed) -> None:
    done = server.cli("jobs", "follow", followed.job_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines[:-1]), lines
    assert any(re.search(r"step 80/80  loss \d\.\d{4}  valid loss", line) for line in lines), lines
    assert "The job has successfully completed" in done.stdout
    assert lines[-1].startswith(f"Job {followed.job_id} succeeded: ft:{MLP}:")
    assert "━" not in done.stdout and "\x1b" not in done.stdout  # no bar, no colours
    # Each metrics line says its own step (the job had long finished when this ran).
    listed = server.api("GET", f"/fine_tuning/jobs/{followed.job_id}/events?limit=100").json()
    events = list(reversed(listed["data"]))  # oldest first, as they happened
    steps = [int(n) for n in re.findall(r" step (\d+)/80  loss", done.stdout)]
    assert steps == [e["data"]["step"] for e in events if e["type"] == "metrics"]

    # --json: the events as the stream gives them.
    printed = server.ok("jobs", "follow", followed.job_id, "--json")
    assert [json.loads(line) for line in printed.splitlines()] == events


def test_jobs_list_and_show_match_the_api(server: Server, followed: Followed) -> None:
    job = server.api("GET", f"/fine_tuning/jobs/{followed.job_id}").json()
    assert server.json("jobs", "show", followed.job_id) == job
    assert followed.job_id in [j["id"] for j in server.json("jobs", "list")["data"]]
    shown = server.ok("jobs", "show", followed.job_id)
    assert "succeeded" in shown and job["fine_tuned_model"] in shown and "n_epochs=10" in shown
    listed = server.ok("jobs", "list")
    assert re.search(rf"{followed.job_id} +│ succeeded +│ {re.escape(MLP)} +│ 80/80", listed)


def test_predict_answers_as_the_api_does(server: Server, followed: Followed) -> None:
    model = server.api("GET", f"/fine_tuning/jobs/{followed.job_id}").json()["fine_tuned_model"]
    rows = [[0.9, 0.5, 0.0, 0.0], [-0.8, -0.6, 0.1, 0.0]]
    answer = server.api("POST", "/predictions", json={"model": model, "input": rows}).json()
    printed = server.json("predict", model, "--features", "0.9,0.5,0,0", "[-0.8, -0.6, 0.1, 0]")
    assert [p["label"] for p in printed["data"]] == [p["label"] for p in answer["data"]]
    assert [p["label"] for p in printed["data"]] == ["up", "down"]
    table = server.ok("predict", model, "--features", "0.9,0.5,0,0")
    assert re.search(r"│ 0 +│ 0\.9,0\.5,0,0 +│ up +│ 0\.\d{4} │", table), table
    # One input per line of standard input.
    piped = server.cli("predict", model, "--features", "--json", stdin="0.9,0.5,0,0\n-1,-1,0,0\n")
    assert [p["label"] for p in json.loads(piped.stdout)["data"]] == ["up", "down"]


def test_chat_streams_the_answer_the_api_gives(server: Server) -> None:
    # A seeded sample: the same answer every time, and words rather than the blank lines a
    # random model's greedy answer tends to be.
    options = {"max_tokens": 12, "temperature": 1.0, "seed": 1}
    question = [{"role": "user", "content": "what is the code for apple?"}]
    whole = server.api(
        "POST", "/chat/completions", json={"model": TINY_LLAMA, "messages": question, **options}
    ).json()
    answer = whole["choices"][0]["message"]["content"]
    assert answer.strip()
    args = ("--max-tokens", "12", "--temperature", "1", "--seed", "1")
    assert server.ok("chat", TINY_LLAMA, "what is the code for apple?", *args) == answer + "\n"

    # No message: a conversation, one message per line of standard input, with its history.
    talk = server.cli("chat", TINY_LLAMA, *args, stdin="what is the code for apple?\nand river?\n")
    assert talk.returncode == 0, talk.stderr
    followup = [
        *question,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and river?"},
    ]
    second = server.api(
        "POST", "/chat/completions", json={"model": TINY_LLAMA, "messages": followup, **options}
    ).json()
    assert talk.stdout == f"{answer}\n{second['choices'][0]['message']['content']}\n"
    # The second turn sent the whole conversation (a random model's sample may not show it).
    turns = server.cli(
        "chat", TINY_LLAMA, *args, "--json", stdin="what is the code for apple?\nand river?\n"
    )
    usages = [json.loads(line)["usage"] for line in turns.stdout.splitlines()]
    assert usages == [whole["usage"], second["usage"]]

    # A model that cannot chat: the server's message, exit 1.
    refused = server.cli("chat", "sentence-transformers/all-MiniLM-L6-v2", "hi")
    assert refused.returncode == 1 and "causal-lm" in refused.stderr, refused.stderr


def test_cancel_pause_resume_then_follow_exits_nonzero(server: Server) -> None:
    file = server.json("files", "upload", str(server.data / "tab.jsonl"))
    job = server.json("jobs", "create", file["id"], "--model", MLP, "--epochs", "50")
    assert job["training_file"] == file["id"] and job["hyperparameters"]["n_epochs"] == 50
    wait_until(
        lambda: (
            server.api("GET", f"/fine_tuning/jobs/{job['id']}").json()["status"]
            in ("queued", "running")
        ),
        60,
        what="the job to leave validating_files",
    )
    assert server.ok("jobs", "pause", job["id"]).strip() == f"Job {job['id']} is paused"
    assert server.ok("jobs", "resume", job["id"]).strip() == f"Job {job['id']} is queued"
    assert server.json("jobs", "cancel", job["id"])["status"] == "cancelled"

    done = server.cli("jobs", "follow", job["id"])
    assert done.returncode == 1, done.stdout
    assert "Fine-tuning job cancelled" in done.stdout
    assert f"Job {job['id']} cancelled" in done.stderr
    # Resuming a cancelled job is the server's 409, shown as its message.
    again = server.cli("jobs", "resume", job["id"])
    assert again.returncode == 1 and "only a paused job can be resumed" in again.stderr


def test_follow_of_a_failed_job_prints_its_error_and_exits_nonzero(server: Server) -> None:
    file_id = server.api("GET", "/files?purpose=fine-tune").json()["data"][0]["id"]
    done = server.cli("jobs", "create", file_id, "--model", MLP, "--processes", "2", "--follow")
    assert done.returncode == 1, done.stdout + done.stderr
    created = re.search(r"Created job (ftjob-\w+)", done.stdout)
    assert created, done.stdout
    job_id = created.group(1)
    error = server.api("GET", f"/fine_tuning/jobs/{job_id}").json()["error"]
    assert error["code"] == "invalid_resources"
    assert f"Job {job_id} failed: {error['message']} (invalid_resources)" in done.stderr


def test_files_upload_list_show_delete_match_the_api(server: Server) -> None:
    uploaded = server.json("files", "upload", str(server.data / "tab-valid.jsonl"))
    assert uploaded == server.api("GET", f"/files/{uploaded['id']}").json()
    assert (uploaded["filename"], uploaded["format"], uploaded["stats"]["rows"]) == (
        "tab-valid.jsonl",
        "tabular",
        20,
    )
    assert server.json("files", "show", uploaded["id"]) == uploaded
    assert server.json("files", "list") == server.api("GET", "/files?limit=100").json()
    listed = server.ok("files", "list")
    assert re.search(rf"{uploaded['id']} +│ tab-valid\.jsonl +│ fine-tune +│ tabular +│ 20", listed)

    deleted = server.json("files", "delete", uploaded["id"])
    assert deleted == {"id": uploaded["id"], "object": "file", "deleted": True}
    assert server.api("GET", f"/files/{uploaded['id']}").status_code == 404
    gone = server.cli("files", "show", uploaded["id"])
    assert gone.returncode == 1
    assert gone.stderr.strip() == f"Error: No such File object: {uploaded['id']} (HTTP 404)"


def test_a_bad_file_prints_the_servers_line_and_stores_nothing(server: Server) -> None:
    before = server.api("GET", "/files").json()["data"]
    for args in (["files", "upload"], ["jobs", "create", "--model", MLP]):
        done = server.cli(*args, str(server.data / "bad.jsonl"))
        assert done.returncode == 1, done.stdout
        assert re.search(r"line 3: .*'label'", done.stderr), done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert server.api("GET", "/files").json()["data"] == before
    missing = server.cli("jobs", "create", "no-such.jsonl", "--model", MLP)
    assert missing.returncode == 1
    assert "no-such.jsonl is neither a local file nor a file id" in missing.stderr


def test_a_wrong_key_or_unknown_job_is_the_servers_message(server: Server) -> None:
    wrong = server.cli("jobs", "list", "--api-key", "sk-th-wrong")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == "Error: Incorrect API key provided. (HTTP 401)"
    unknown = server.cli("jobs", "show", "ftjob-nope")
    assert unknown.returncode == 1
    assert "No fine-tuning job with id 'ftjob-nope'" in unknown.stderr


def test_login_saves_a_config_file_the_commands_read(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "conf" / "tunehouse.toml"
    env = user_env(tmp_path, TUNEHOUSE_CONFIG=str(config))
    refused = server.cli("login", "--base-url", server.base_url, "--api-key", "sk-th-no", env=env)
    assert refused.returncode == 1 and not config.exists()

    signed = server.cli("login", "--base-url", server.base_url, "--api-key", server.key, env=env)
    assert signed.returncode == 0, signed.stderr
    assert tomllib.loads(config.read_text()) == {"base_url": server.base_url, "api_key": server.key}
    assert config.stat().st_mode & 0o777 == 0o600
    listed = server.cli("models", "list", "--json", env=env)  # neither flags nor variables
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout and json.loads(listed.stdout) == server.api("GET", "/models").json()


def test_models_list_show_and_delete(server: Server, followed: Followed) -> None:
    model = server.api("GET", f"/fine_tuning/jobs/{followed.job_id}").json()["fine_tuned_model"]
    assert server.json("models", "list") == server.api("GET", "/models").json()
    assert server.json("models", "show", model) == server.api("GET", f"/models/{model}").json()
    shown = server.ok("models", "show", model)
    assert "tabular" in shown and "down, up" in shown and followed.job_id in shown
    listed = server.ok("models", "list")
    assert re.search(rf"{re.escape(model)} +│ default +│ tabular +│ {re.escape(MLP)}", listed)

    assert server.ok("models", "delete", model).strip() == f"Deleted {model}"
    assert server.api("GET", f"/models/{model}").status_code == 404
    base = server.cli("models", "delete", TINY_LLAMA)
    assert base.returncode == 1 and "cannot be deleted" in base.stderr
