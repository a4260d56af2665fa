"""The deployment files: docker-compose.yml as Debian's `docker-compose config` renders it (with
and without its profiles) and the topology it describes, deploy/prometheus.yml against it, the
Dockerfile, and the image's build-time smoke check run as the image runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.settings import Settings
from tests.conftest import _missing
from tests.deploy_support import compose_config, docker_compose
from tests.support import ROOT

DEFAULT_SERVICES = {"postgres", "redis", "migrate", "api", "inference", "worker"}
PROFILED_SERVICES = {"worker-gpu0": ["gpu"], "worker-gpu1": ["gpu"], "prometheus": ["monitoring"]}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """The services `docker-compose config` renders: on a plain host, and with every profile."""
    if docker_compose() is None:
        _missing("docker-compose (Debian's package) to check docker-compose.yml")
    services = {}
    for name, profiles in (("default", ()), ("all", ("gpu", "monitoring"))):
        checked = compose_config(*profiles, quiet=True)
        assert checked.returncode == 0, checked.stderr
        # No warning either: every variable the file uses has a default.
        assert checked.stderr.strip() == "", checked.stderr
        shown = compose_config(*profiles)
        assert shown.returncode == 0, shown.stderr
        services[name] = yaml.safe_load(shown.stdout)["services"]
    return services


def tunehouse_services(services: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in services.items() if v.get("image", "").startswith("tunehouse:")}


def command_of(service: dict[str, Any]) -> list[str]:
    return [str(part) for part in service["command"]]


def seconds(duration: str) -> int:
    """A compose duration ("90s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_a_cpu_host_gets_the_core_services_and_profiles_add_gpu_workers_and_prometheus(
    rendered: dict[str, dict[str, Any]],
) -> None:
    # Debian's docker-compose (1.29) renders every service whatever the profiles; a plain `up`
    # starts those with no profile, which need nothing that a profile holds.
    for services in rendered.values():
        plain = {name for name, service in services.items() if not service.get("profiles")}
        assert plain == DEFAULT_SERVICES
        assert {k: v["profiles"] for k, v in services.items() if k not in plain} == (
            PROFILED_SERVICES
        )
        for name in plain:
            assert set(services[name].get("depends_on", {})) <= plain, name


def test_every_service_has_a_healthcheck_and_starts_after_what_it_needs(
    rendered: dict[str, dict[str, Any]],
) -> None:
    services = rendered["all"]
    for name, service in services.items():
        if name == "migrate":
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), (name, check)
    # The one-shot migration's health is its exit status: the others wait for it to succeed.
    migrate = services["migrate"]
    assert command_of(migrate) == ["tunehouse", "migrate"] and migrate["restart"] == "no"
    assert migrate["healthcheck"] in ({"disable": True}, {"test": ["NONE"]})  # v2, v1
    for name, service in tunehouse_services(services).items():
        needs = {k: v["condition"] for k, v in service["depends_on"].items()}
        expected = {"postgres": "service_healthy", "redis": "service_healthy"}
        if name != "migrate":
            expected["migrate"] = "service_completed_successfully"
        assert needs == expected, name


def test_redis_keeps_its_queue_on_disk_and_never_evicts(
    rendered: dict[str, dict[str, Any]],
) -> None:
    redis = rendered["default"]["redis"]
    command = command_of(redis)
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\d+(mb|gb)", options["--maxmemory"]), options
    assert any(str(v).endswith(":/data:rw") for v in redis["volumes"]), redis["volumes"]


def test_roles_queues_and_devices(rendered: dict[str, dict[str, Any]]) -> None:
    services = rendered["all"]
    assert command_of(services["api"])[:4] == ["tunehouse", "api", "--role", "control"]
    assert command_of(services["inference"])[:4] == ["tunehouse", "api", "--role", "inference"]
    # Inference scales with --scale: each replica takes a port of a range, never a fixed one.
    (published,) = [str(p["published"]) for p in services["inference"]["ports"]]
    first, last = (int(port) for port in published.split("-"))
    assert last - first >= 4, published
    api_ports = {str(p["published"]) for p in services["api"]["ports"]}
    assert not any(first <= int(port) <= last for port in api_ports)

    assert command_of(services["worker"]) == ["tunehouse", "worker", "--queue", "cpu"]
    assert "deploy" not in services["worker"]
    reserved = []
    for name in ("worker-gpu0", "worker-gpu1"):
        service = services[name]
        assert command_of(service) == [
            "tunehouse", "worker", "--queue", "gpu", "--devices", "0",
        ], name  # fmt: skip
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], device
        reserved += device["device_ids"]
        assert service["image"] != services["worker"]["image"], "GPU workers need the CUDA build"
        assert "TORCH_INDEX" in service["build"]["args"]
    assert reserved == ["0", "1"], "one GPU per worker"
    for name, service in tunehouse_services(services).items():
        if command_of(service)[1] == "worker":
            assert service["environment"]["TUNEHOUSE_WORKER_METRICS_PORT"] == "9101", name
            # A warm shutdown (checkpoint, back to the queue) gets its 60 s before SIGKILL.
            assert seconds(service["stop_grace_period"]) >= 60 + 15, name


def test_api_inference_and_workers_share_storage_database_and_broker(
    rendered: dict[str, dict[str, Any]],
) -> None:
    services = tunehouse_services(rendered["all"])
    assert {"migrate", "api", "inference", "worker", "worker-gpu0", "worker-gpu1"} == set(services)
    for name, service in services.items():
        env = service["environment"]
        data_dir = env["TUNEHOUSE_DATA_DIR"]
        assert service["volumes"] == [f"storage:{data_dir}:rw"], name
        assert env["TUNEHOUSE_STORAGE_DIR"].startswith(data_dir + "/"), name
        assert "@postgres:5432/" in env["TUNEHOUSE_DATABASE_URL"], name
        assert env["TUNEHOUSE_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert env["TUNEHOUSE_LOG_FORMAT"] == "json", name


def test_every_tunehouse_variable_is_a_setting(rendered: dict[str, dict[str, Any]]) -> None:
    """A misspelt variable would be ignored silently (the settings ignore unknown names)."""
    known = {f"TUNEHOUSE_{name.upper()}" for name in Settings.model_fields}
    for name, service in rendered["all"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("TUNEHOUSE_"):
                assert variable in known, (name, variable)


def test_prometheus_scrapes_every_process_that_does_work(
    rendered: dict[str, dict[str, Any]],
) -> None:
    services = rendered["all"]
    prometheus = services["prometheus"]
    config_path = next(
        p for p in " ".join(command_of(prometheus)).split() if p.startswith("--config.file=")
    ).split("=", 1)[1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in map(str, prometheus["volumes"])}
    assert Path(mounts[config_path]) == ROOT / "deploy" / "prometheus.yml"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    def port_of(name: str) -> int:
        command = command_of(services[name])
        return int(command[command.index("--port") + 1])

    assert jobs["tunehouse-control"]["static_configs"][0]["targets"] == [f"api:{port_of('api')}"]
    (inference,) = jobs["tunehouse-inference"]["dns_sd_configs"]
    assert (inference["names"], inference["port"]) == (["inference"], port_of("inference"))
    workers = {
        name for name, service in tunehouse_services(services).items()
        if command_of(service)[:2] == ["tunehouse", "worker"]
    }  # fmt: skip
    (worker,) = jobs["tunehouse-worker"]["dns_sd_configs"]
    assert set(worker["names"]) == workers
    assert all(
        str(worker["port"]) == services[name]["environment"]["TUNEHOUSE_WORKER_METRICS_PORT"]
        for name in workers
    )
    # Each Tunehouse job sends the token file the Prometheus service writes at its start.
    started = " ".join(command_of(prometheus))
    for name in ("tunehouse-control", "tunehouse-inference", "tunehouse-worker"):
        token_file = jobs[name]["authorization"]["credentials_file"]
        assert f"> {token_file}" in started, (name, token_file)


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def test_the_dockerfile_builds_a_slim_non_root_cpu_image_with_a_smoke_check() -> None:
    steps = dockerfile()
    keywords = [keyword for keyword, _ in steps]
    # A base image argument (a CUDA image instead) before the first stage, CPU by default.
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert stages[0] == "${BASE_IMAGE} AS base" and len(stages) >= 3, stages
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch=={args['TORCH_VERSION']}" in project["dependencies"], "the pinned torch"

    # The runtime stage: the builder's venv, a numeric non-root user, the smoke check as it.
    runtime = steps[max(i for i, k in enumerate(keywords) if k == "FROM") :]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    (user,) = [args for keyword, args in runtime if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid == "${TUNEHOUSE_UID}" and int(args["TUNEHOUSE_UID"]) >= 1000, user
    after_user = runtime[[k for k, _ in runtime].index("USER") :]
    assert ("COPY", "tests/smoke.py /opt/tunehouse/smoke.py") in after_user
    assert ("RUN", "python /opt/tunehouse/smoke.py") in after_user
    assert any(k == "HEALTHCHECK" and "/healthz" in a for k, a in runtime)
    assert ("CMD", '["tunehouse", "run"]') in runtime

    # The build context lets in what the image copies and mounts, and nothing else.
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored
    for kept in ("pyproject.toml", "README.md", "app/", "worker/", "migrations/", "tests/smoke.py"):
        assert f"!{kept}" in ignored, kept


def test_the_smoke_check_the_image_runs_at_build_time_passes(tmp_path: Path) -> None:
    """As the image runs it (and as an operator may inside a deployment, whose settings it
    leaves alone: here a database that does not answer)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env["PYTHONPATH"] = str(ROOT)
    env["TUNEHOUSE_DATABASE_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    env["TUNEHOUSE_DATA_DIR"] = str(tmp_path / "deployment")
    ran = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "smoke.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "smoke check passed" in ran.stdout
    assert list(tmp_path.iterdir()) == [], "it writes only in its own temporary directory"
