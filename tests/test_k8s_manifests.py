"""deploy/k8s/ checked statically: schemas of every kind, and agreement with the rest of the repo.

No cluster here (and no kubeconform binary): Kubernetes' own kinds are validated
by kubernetes-validate (its bundled, strict schemas of Kubernetes 1.33), the
custom resources by jsonschema against the CRDs' openAPIV3Schema vendored in
tests/data/crds/ (KubeRay v1.7.0 RayService, prometheus-operator v0.93.0
PodMonitor / ServiceMonitor / PrometheusRule; descriptions stripped). Like
kubeconform's strict mode, an unknown field is an error wherever the CRD does
not say ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llmslo.generate import kubernetes as k8s_rules
from llmslo.generate import rules
from contract.names import CLIENT_JOB, SERVER_JOB
from contract.slo import load_slo
from serve.settings import AppSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT / "tests" / "data" / "crds"
KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice-ray-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}


def strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden where it lists properties (kubeconform -strict)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    schema = strict(json.loads((CRDS / CRD_SCHEMAS[(api_version, kind)]).read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by the API server, not the CRD
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> None:
    """Raise a ValidationError when ``doc`` does not fit its kind's schema."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_fits_its_schema(doc: dict[str, Any]) -> None:
    validate(doc)


@pytest.mark.parametrize("kind,name,path,bad", [
    ("RayService", "llmslo", ("spec", "rayClusterConfig", "workerGroupSpecs", 0), {"replicsa": 2}),
    ("RayService", "llmslo", ("spec", "rayClusterConfig", "workerGroupSpecs", 0), {"maxReplicas": "four"}),
    ("Deployment", "locust-master", ("spec", "template", "spec", "containers", 0), {"port": 8089}),
    ("PodMonitor", "llmslo-ray", ("spec", "podMetricsEndpoints", 0), {"intervall": "5s"}),
    ("PrometheusRule", "llmslo", ("spec", "groups", 0), {"rulez": []}),
])
def test_the_schema_check_can_fail(kind: str, name: str, path: tuple, bad: dict[str, Any]) -> None:
    doc = copy.deepcopy(find(kind, name))
    node = doc
    for step in path:
        node = node[step]
    node.update(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _serve_app() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the RayService's application, serve/config.yaml's application)."""
    cluster_app = yaml.safe_load(find("RayService", "llmslo")["spec"]["serveConfigV2"])["applications"][0]
    local_app = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    return cluster_app, local_app


def test_serve_app_is_the_local_one_with_the_gpu_engine() -> None:
    cluster_app, local_app = _serve_app()
    for key in ("name", "route_prefix", "import_path", "runtime_env"):
        assert cluster_app[key] == local_app[key], key
    settings = AppSettings(**cluster_app["args"])
    assert settings.engine == "transformers"
    assert settings.gpus_per_replica == load_slo().service.gpus_per_replica
    # runtime_env reaches the replicas only; Ray reads Serve's mode (throughput mode, direct ingress)
    # in the controller and proxies too, so every Ray container carries the same values
    serve_env = {k: v for k, v in cluster_app["runtime_env"]["env_vars"].items() if k != "RAY_SERVE_LOG_TO_STDERR"}
    spec = find("RayService", "llmslo")["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in serve_env} == serve_env, container["name"]


def test_one_worker_pod_is_one_model_copy_with_gpus_per_replica_gpus() -> None:
    cluster = find("RayService", "llmslo")["spec"]["rayClusterConfig"]
    settings = AppSettings(**_serve_app()[0]["args"])
    [group] = cluster["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    for side in ("requests", "limits"):
        assert int(resources[side]["nvidia.com/gpu"]) == settings.gpus_per_replica, side
    assert (group["minReplicas"], group["maxReplicas"]) == (settings.min_replicas, settings.max_replicas)
    assert cluster["enableInTreeAutoscaling"] is True, "Serve's scale-up needs Ray's autoscaler to add pods"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_every_ray_pod_is_scraped_as_the_server_job() -> None:
    cluster = find("RayService", "llmslo")["spec"]["rayClusterConfig"]
    monitor = find("PodMonitor", "llmslo-ray")["spec"]
    [endpoint] = monitor["podMetricsEndpoints"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        template = group["template"]
        assert monitor["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])
    assert {"action": "replace", "targetLabel": "job", "replacement": SERVER_JOB} in endpoint["relabelings"]


def test_locust_master_is_scraped_and_logs_in() -> None:
    service = find("Service", "locust-master")
    monitor = find("ServiceMonitor", "llmslo-locust")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert {"action": "replace", "targetLabel": "job", "replacement": CLIENT_JOB} in endpoint["relabelings"]
    master = find("Deployment", "locust-master")["spec"]["template"]["spec"]["containers"][0]
    command = master["command"]
    assert "--web-login" in command
    assert command[command.index("--host") + 1] == f"http://{find('RayService', 'llmslo')['metadata']['name']}-serve-svc:8000"
    password = next(e for e in master["env"] if e["name"] == "LLMSLO_LOCUST_PASSWORD")
    assert "secretKeyRef" in password["valueFrom"], "no password in the manifests"
    worker = find("Deployment", "locust-worker")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker[worker.index("--master-host") + 1] == service["metadata"]["name"]
    assert shlex.join(command).count("--server-metrics-url") == 1


def test_prometheus_rule_holds_the_generated_rules() -> None:
    rule = find("PrometheusRule", "llmslo")
    assert rule["spec"] == rules.rule_file(load_slo())
    assert rule["metadata"]["labels"] == k8s_rules.SELECTOR_LABEL
