"""Static checks of docker-compose.yml (no Docker engine on CI machines).

What Compose itself would reject (schema), what would start but not work
(a mounted file missing, a scrape target naming a port nobody listens on, a
Locust host that is not the model server) and what would drift (the Dockerfile
installing the package differently from the README) all fail here instead.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
import yaml

from contract.slo import load_slo
from llmslo.catalogue import Ports, prometheus_config
from serve.engines.upstream import UpstreamOptions

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"  # compose-spec, via check-jsonschema 0.39.0
UI_PORTS = {8089, 3000, 9090, 9093}  # Locust, Grafana, Prometheus, Alertmanager
_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    """The variables .env.example documents (each under a comment line), with their values."""
    env, previous = {}, ""
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            assert previous.startswith("# "), f".env.example: {key} has no comment line"
            env[key.strip()] = value.strip()
        previous = line
    return env


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${X}, ${X:-d}, ${X-d}, ${X:?err}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        empty = current is None or (current == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else current
        if op in (":?", "?") and empty:
            raise ValueError(f"{name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def load_compose(**overrides: str) -> dict[str, Any]:
    env = env_example() | {"GF_ADMIN_PASSWORD": "s3cret", "LLMSLO_LOCUST_PASSWORD": "s3cret"} | overrides
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports a service listens on inside the network: expose + container side of ports."""
    ports = {int(p) for p in service.get("expose", [])}
    ports |= {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    return ports


def hosts(compose: dict[str, Any]) -> dict[str, set[int]]:
    """Every hostname on the compose network (service names and aliases) -> its ports."""
    table: dict[str, set[int]] = {}
    for name, service in compose["services"].items():
        names = [name]
        for net in (service.get("networks") or {}).values():
            names += (net or {}).get("aliases", [])
        for host in names:
            table.setdefault(host, set()).update(container_ports(service))
    return table


def assert_reachable(compose: dict[str, Any], hostport: str, where: str) -> None:
    host, _, port = hostport.rpartition(":")
    table = hosts(compose)
    assert host in table, f"{where}: {host!r} is not a service on the compose network"
    assert int(port) in table[host], f"{where}: {host} does not listen on {port} ({table[host]})"


def test_validates_against_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft202012Validator)


def test_schema_check_can_fail() -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = load_compose()
    broken["services"]["grafana"]["healthcheck"]["intervall"] = "5s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def test_every_variable_is_documented_in_env_example() -> None:
    used = {m.group("name") for m in _VAR.finditer(COMPOSE_FILE.read_text()) if m.group("name")}
    documented = set(env_example())
    assert used - documented == set(), "add these to .env.example"
    assert documented - used - {"COMPOSE_PROFILES"} == set(), ".env.example lists unused variables"


def test_grafana_admin_password_is_required() -> None:
    with pytest.raises(ValueError, match="GF_ADMIN_PASSWORD"):
        load_compose(GF_ADMIN_PASSWORD="")
    assert env_example()["GF_ADMIN_PASSWORD"] == ""


def test_locust_ui_requires_a_login_from_the_environment(compose: dict[str, Any]) -> None:
    master = compose["services"]["locust-master"]
    assert "--web-login" in master["command"], "the published UI must not start load tests for anyone"
    assert master["environment"]["LLMSLO_LOCUST_PASSWORD"] == "s3cret"
    assert master["environment"]["LLMSLO_LOCUST_USER"] == env_example()["LLMSLO_LOCUST_USER"]
    with pytest.raises(ValueError, match="LLMSLO_LOCUST_PASSWORD"):
        load_compose(LLMSLO_LOCUST_PASSWORD="")
    assert env_example()["LLMSLO_LOCUST_PASSWORD"] == ""
    assert (ROOT / "loadtest" / "web_login.py").exists(), "--web-login needs the login module in loadtest/"


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, service in compose["services"].items():
        raw_volumes = raw["services"][name].get("volumes", [])
        for raw_spec, spec in zip(raw_volumes, service.get("volumes", [])):
            if isinstance(spec, dict):
                assert spec["bind"].get("create_host_path"), f"{name}: long-form mounts are output folders"
                continue
            source = spec.split(":")[0]
            if not source.startswith(".") or "${" in raw_spec.split(":")[0]:
                continue  # named volume, or a host folder the user points at (e.g. weights)
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"


def test_only_ui_ports_are_published(compose: dict[str, Any]) -> None:
    published = set()
    for service in compose["services"].values():
        for spec in service.get("ports", []):
            bind, host_port, _ = str(spec).split(":")
            assert bind == "127.0.0.1", "UIs are published on loopback unless LLMSLO_BIND says otherwise"
            published.add(int(host_port))
    assert published == UI_PORTS


def test_prometheus_targets_are_services(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_path = next(v.split(":")[0] for v in prometheus["volumes"] if v.endswith("prometheus.yml:ro"))
    config = yaml.safe_load((ROOT / config_path).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert_ray_nodes_discovered(compose, config)
    for target in targets:
        if target.startswith("localhost:"):
            assert int(target.split(":")[1]) in container_ports(prometheus)
        else:
            assert_reachable(compose, target, f"prometheus target {target}")
    rules_mount = next(v for v in prometheus["volumes"] if "/etc/prometheus/rules" in v)
    rules_dir = ROOT / rules_mount.split(":")[0]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert list(rules_dir.glob("*.yml")), f"no rule files in {rules_dir}"


def assert_ray_nodes_discovered(compose: dict[str, Any], config: dict[str, Any]) -> None:
    """Job ``ray`` reads Ray's discovery file from the volume where every serve variant's Ray writes it."""
    [ray_job] = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    [sd_file] = [f for sd in ray_job["file_sd_configs"] for f in sd["files"]]
    folder = str(Path(sd_file).parent)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]}
    for name in ("serve-sim", "serve-gpu"):
        service = compose["services"][name]
        command = service["command"]
        assert command[command.index("--temp-dir") + 1] == folder, f"{name}: Ray must write {sd_file}"
        assert "--dashboard-port" in command, f"{name}: Ray's dashboard writes the discovery file"
        serve_mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert serve_mounts[folder] == mounts[folder], f"{name} and Prometheus must share {folder}"
    assert Path(sd_file).name == "prom_metrics_service_discovery.json"


def test_compose_prometheus_config_is_the_one_llmslo_up_writes() -> None:
    ports = Ports()
    expected = prometheus_config(
        ray_sd_file="/ray/prom_metrics_service_discovery.json",
        prometheus=f"localhost:{ports.prometheus}",
        rule_files=["/etc/prometheus/rules/*.yml"],
        alertmanager=f"alertmanager:{ports.alertmanager}",
        locust=f"locust-master:{ports.locust}",
    )
    assert yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text()) == expected


def test_grafana_datasources_point_at_prometheus(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = ROOT / next(v.split(":")[0] for v in grafana["volumes"] if "/etc/grafana/provisioning" in v)
    files = list((provisioning / "datasources").glob("*.y*ml"))
    assert files, "no Grafana datasource provisioning file"
    urls = []
    for path in files:
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            urls.append(interpolate(source["url"], grafana["environment"]))
    assert urls
    for url in urls:
        parts = urlsplit(url)
        assert_reachable(compose, f"{parts.hostname}:{parts.port}", f"Grafana datasource {url}")


def test_grafana_dashboard_provider_reads_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if isinstance(v, str)}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    paths = [p["options"]["path"] for f in (provisioning / "dashboards").glob("*.y*ml")
             for p in yaml.safe_load(f.read_text())["providers"]]
    assert paths
    for path in paths:
        assert path in mounts, f"Grafana's dashboard provider reads {path}, which nothing mounts"
        assert list((ROOT / mounts[path]).glob("*.json")), f"no dashboards in {mounts[path]}"


def test_locust_points_at_serve_and_master(compose: dict[str, Any]) -> None:
    master = compose["services"]["locust-master"]["command"]
    host = urlsplit(master[master.index("--host") + 1])
    assert host.hostname == "serve"
    assert_reachable(compose, f"{host.hostname}:{host.port}", "locust --host")
    server_metrics = urlsplit(master[master.index("--server-metrics-url") + 1])
    assert_reachable(compose, f"{server_metrics.hostname}:{server_metrics.port}", "--server-metrics-url")
    assert server_metrics.path == "/federate" and "job" in unquote(server_metrics.query), "every node, via Prometheus"
    worker = compose["services"]["locust-worker"]
    master_host = worker["command"][worker["command"].index("--master-host") + 1]
    assert_reachable(compose, f"{master_host}:5557", "locust worker --master-host")
    assert "ports" not in worker and "container_name" not in worker, "workers must scale"


def _engine_options(command: list[str]) -> dict[str, Any]:
    pairs = [command[i + 1].partition("=") for i, word in enumerate(command) if word == "--engine-option"]
    return {key: json.loads(value) for key, _, value in pairs}


def test_gpu_profiles_reserve_the_gpus_of_one_model_copy(compose: dict[str, Any]) -> None:
    for name in ("serve-gpu", "serve-hf"):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        gpu_command = compose["services"][name]["command"]
        per_replica = int(gpu_command[gpu_command.index("--gpus-per-replica") + 1])
        assert per_replica == int(devices[0]["count"]) == load_slo().service.gpus_per_replica
    assert "deploy" not in compose["services"]["serve-sim"]
    sim = compose["services"]["serve-sim"]["command"]
    assert sim[sim.index("--engine") + 1] == "simulated"
    for name in ("serve-sim", "serve-gpu", "serve-hf"):
        command = compose["services"][name]["command"]
        assert command[command.index("--metrics-port") + 1] == "8080" and "8080" in compose["services"][name]["expose"]


@pytest.mark.parametrize("per_replica", ["1", "2"])  # >= 40 GB cards, 24 GB cards (README journey 1)
def test_gpu_profile_serves_through_vllm_with_one_tensor_parallel_rank_per_gpu(per_replica: str) -> None:
    compose = load_compose(LLMSLO_GPUS_PER_REPLICA=per_replica, LLMSLO_MODEL_DIR="glm-4.1v")
    vllm, fallback = compose["services"]["serve-gpu"], compose["services"]["serve-hf"]
    assert vllm["profiles"] == ["gpu"] and fallback["profiles"] == ["gpu-hf"]
    assert vllm["build"]["target"] == "vllm" and vllm["build"]["args"]["VLLM_IMAGE"].startswith("vllm/vllm-openai:v")
    command = vllm["command"]
    assert command[command.index("--engine") + 1] == "upstream"
    launch = UpstreamOptions.model_validate(_engine_options(command)).launch
    assert launch is not None and launch.model_path == "/models/glm-4.1v"
    assert launch.tensor_parallel_size == int(command[command.index("--gpus-per-replica") + 1]) == int(per_replica)
    assert _engine_options(fallback["command"]) == {"model_path": "/models/glm-4.1v"}
    assert fallback["command"][fallback["command"].index("--engine") + 1] == "transformers"
    stages = re.findall(r"^FROM \S+(?: AS (\w+))?$", (ROOT / "Dockerfile").read_text(), re.M)
    assert stages == ["vllm", ""]  # the default build target (last stage) stays the plain image


def test_services_have_healthchecks_restart_and_dependencies(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy"
    assert set(compose["volumes"]) == {"prometheus-data", "grafana-data", "ray-sd"}
    assert "--web.enable-lifecycle" in compose["services"]["prometheus"]["command"]


def _pip_install_args(command: str) -> list[str]:
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w == "install" and words[i - 1].endswith("pip"))
    args = []
    for word in words[start + 1 :]:
        if word in ("&&", ";", "|"):
            break
        args.append(word)
    return args


def test_dockerfile_installs_the_package_as_the_readme_does() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```", readme, re.S)
    assert block, "README lost its main-command block"
    runs = [line[4:] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("RUN ")]
    installs = [_pip_install_args(r) for r in runs if r.startswith("pip install")]
    assert installs == [_pip_install_args(block.group(1))], "the base install must be the README's"

