"""docker-compose.yml: valid against the Compose Specification's JSON schema, and the stack it
describes hangs together (health-gated start order, GPU and CPU workers, files it mounts, ports)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.deploy.repo import (
    CACHE_VARIABLES,
    COMPOSE,
    REPO,
    active_services,
    compose,
    dockerfile_env,
    dotenv,
    interpolate,
    is_within,
    service_environment,
    tool,
)

# check-jsonschema ships the Compose Specification's schema (compose-spec/compose-spec, schema/
# compose-spec.json), pinned with the package version in the test extra.
SCHEMA = ["--builtin-schema", "vendor.compose-spec"]


def check_schema(path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), *SCHEMA, str(path)], capture_output=True, text=True)


def test_valid_against_the_compose_schema():
    run = check_schema(COMPOSE)
    assert run.returncode == 0, run.stdout + run.stderr


def test_schema_check_catches_mistakes(tmp_path):
    spec = compose()
    spec["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"
    spec["services"]["api"]["helthcheck"] = spec["services"]["api"].pop("healthcheck")
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump(spec))
    run = check_schema(broken)
    assert run.returncode != 0 and "service_ready" in run.stdout and "helthcheck" in run.stdout


def test_start_order_waits_for_health():
    services = compose()["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert set(services["api"]["depends_on"]) == {"redis"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def test_gpu_worker_reserves_a_gpu_and_cpu_worker_needs_none():
    services = compose()["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in cpu
    assert gpu["command"] == cpu["command"] == ["worker"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert service_environment("worker")["DDPM_DEVICE"] == "cuda"
    assert service_environment("worker-cpu")["DDPM_DEVICE"] == "cpu"
    for name in ("redis", "api", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start with either profile"


STACK = {"redis", "api", "prometheus", "grafana"}


def test_plain_compose_up_starts_the_whole_stack_with_the_cpu_worker():
    """`.env` makes `cpu` the default profile, so `docker compose up` with no flag runs a worker that needs
    no GPU; `--profile gpu` (which replaces that default) runs the GPU worker, with its reservation."""
    env = dotenv()
    assert set(env) == {"COMPOSE_PROFILES"}  # compose's setting only: no DDPM_ variable, no secret
    default = {profile.strip() for profile in env["COMPOSE_PROFILES"].split(",")}
    assert default == {"cpu"}
    assert active_services(default) == STACK | {"worker-cpu"}
    assert active_services({"gpu"}) == STACK | {"worker"}
    assert active_services(set()) == STACK  # an emptied COMPOSE_PROFILES: no worker (/readyz says so)
    services = compose()["services"]
    for profiles in (default, {"gpu"}):  # compose refuses a depends_on on a service it does not start
        for name in active_services(profiles):
            assert set(services[name].get("depends_on", {})) <= active_services(profiles), name
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-cpu"]
    guide = (REPO / "docs" / "deployment.md").read_text()
    assert "docker compose up -d --build" in guide and "COMPOSE_PROFILES=cpu" in guide
    assert "docker compose --profile gpu up -d --build" in guide and "COMPOSE_PROFILES=gpu" in guide


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_workers_get_time_to_finish_their_jobs(name):
    grace = float(service_environment(name)["DDPM_WORKER_GRACE_SECONDS"])
    assert _seconds(compose()["services"][name]["stop_grace_period"]) >= grace + 10


def _tmpfs(service: dict) -> dict[str, set[str]]:
    """A service's tmpfs mounts (short syntax, `PATH[:OPTIONS]`) -> their options."""
    entries = service.get("tmpfs", [])
    entries = [entries] if isinstance(entries, str) else entries
    mounts = {}
    for entry in entries:
        path, _, options = entry.partition(":")
        mounts[path] = set(options.split(",")) - {""}
    return mounts


@pytest.mark.parametrize("name", ["api", "worker", "worker-cpu"])
def test_caches_are_on_a_tmpfs(name):
    service = compose()["services"][name]
    assert service["read_only"] is True
    env = dockerfile_env(service["build"]["args"]["VARIANT"]) | service_environment(name)
    for variable in CACHE_VARIABLES:
        assert any(is_within(env[variable], mount) for mount in _tmpfs(service)), f"{name}: {variable}"


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_workers_can_load_what_torch_compile_builds(name):
    """Docker mounts a tmpfs noexec unless told `exec`: inductor's kernels (.so files under
    TORCHINDUCTOR_CACHE_DIR) and Triton's would fail to load, and DDPM_COMPILE=true with them."""
    service = compose()["services"][name]
    env = dockerfile_env(service["build"]["args"]["VARIANT"]) | service_environment(name)
    mounts = _tmpfs(service)
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        mount = max((m for m in mounts if is_within(env[variable], m)), key=len)
        assert "exec" in mounts[mount] and "noexec" not in mounts[mount], f"{name}: {mount} {mounts[mount]}"


def test_cpu_worker_threads_match_its_cpu_limit():
    """`--scale worker-cpu=N`: without a CPU limit and OMP_NUM_THREADS, each replica's engine starts a
    thread per host core, and libgomp slows the oversubscribed teams down (2.2–2.3× longer steps)."""
    raw = compose(interpolated=False)["services"]["worker-cpu"]
    variable = re.fullmatch(r"\$\{([A-Z][A-Z0-9_]*):-(\d+)\}", str(raw["cpus"]))
    assert variable, f"cpus: {raw['cpus']!r} is not ${{NAME:-default}} with a whole default"
    assert raw["environment"]["OMP_NUM_THREADS"] == raw["cpus"], "the threads follow the limit"
    assert not variable[1].startswith("DDPM_"), "DDPM_* variables are the settings of app/settings.py"
    worker = compose()["services"]["worker-cpu"]
    assert worker["cpus"] == service_environment("worker-cpu")["OMP_NUM_THREADS"] == variable[2]
    assert int(variable[2]) >= 1
    assert interpolate(raw["cpus"], {variable[1]: "6"}) == "6"
    assert variable[1] in (REPO / "docs" / "deployment.md").read_text()


def test_api_key_comes_from_an_env_file():
    api = compose()["services"]["api"]
    assert api["env_file"] == [{"path": "./ddpm.env", "required": False}]
    assert "DDPM_API_KEYS" not in service_environment("api")
    example = (REPO / "ddpm.env.example").read_text()
    assert re.search(r"^DDPM_API_KEYS=$", example, re.MULTILINE)


def test_api_port_is_published_on_loopback():
    port = service_environment("api")["DDPM_PORT"]
    assert compose()["services"]["api"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_mounted_files_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./docker"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is missing"


def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = compose()["services"]["redis"]
    assert "redis-data:/data" in redis["volumes"]
    assert "/usr/local/etc/redis/redis.conf" in redis["command"]
    assert redis["image"].startswith("redis:7"), "KEDA's lag trigger and XINFO lag need Redis 7"


def test_prometheus_scrapes_the_api_and_every_worker():
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api, workers = jobs["ddpm-api"]["dns_sd_configs"][0], jobs["ddpm-worker"]["dns_sd_configs"][0]
    assert api["names"] == ["api"] and str(api["port"]) == service_environment("api")["DDPM_PORT"]
    assert set(workers["names"]) == {"worker", "worker-cpu"} <= set(compose()["services"])
    for name in workers["names"]:
        assert str(workers["port"]) == service_environment(name)["DDPM_WORKER_METRICS_PORT"]
    assert jobs["ddpm-api"]["metrics_path"] == jobs["ddpm-worker"]["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    provisioning = REPO / "docker" / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    grafana = compose()["services"]["grafana"]
    assert "./docker/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load((provisioning / "dashboards" / "ddpm.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
