"""The Kubernetes manifests of deploy/k8s, validated offline against the API's JSON schemas (strict:
an unknown or misspelled field fails) and checked for their wiring: probes, Service, HPA, adapter."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gptcore.runtime.serve.app import TOKEN_ENV
from gptcore.runtime.serve.metrics import ServerMetrics

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # a version kubernetes-validate ships schemas for
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
USERINFO = re.compile(r"://[^/]*@")


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    return docs


def one(kind: str) -> dict:
    (found,) = [d for d in documents() if d["kind"] == kind]
    return found


def container() -> dict:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def exported_metrics() -> set[str]:
    """The sample names the server's /metrics answers with."""
    text = ServerMetrics().render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def port_of(c: dict, port: int | str) -> int:
    """A container port by number or by name."""
    for p in c["ports"]:
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"{port}: not a port of container {c['name']}")


def test_every_manifest_is_valid():
    docs = documents()
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_misspelled_field_fails_validation():
    broken = copy.deepcopy(one("Deployment"))
    c = broken["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_deployment_serves_a_registry_model_and_probes_readyz():
    c = container()
    assert c["image"] == "gptcore:latest"
    assert c["command"] == ["gptcore", "serve"]
    args = c["args"]
    assert args[args.index("--model") + 1].startswith("models:/")
    port = int(args[args.index("--port") + 1])
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz" and port_of(c, probe["port"]) == port
    assert (
        c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        and port_of(c, c["livenessProbe"]["httpGet"]["port"]) == port
    )
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])


def test_credentials_come_from_a_secret_never_from_args():
    c = container()
    env = {e["name"]: e for e in c["env"]}
    secrets = [name for name in env if SECRET_NAME.search(name)]
    assert {TOKEN_ENV, "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    for name in secrets:
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    for arg in c["args"] + c["command"]:
        assert not SECRET_NAME.search(arg.upper()) and not USERINFO.search(arg), arg
    for e in c["env"]:
        assert not USERINFO.search(e.get("value", "")), e["name"]  # no user:password@ in a URL


def test_the_service_selects_the_pods_and_targets_the_server_port():
    deployment, service = one("Deployment"), one("Service")
    assert service["spec"]["type"] == "ClusterIP"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    c = container()
    port = int(c["args"][c["args"].index("--port") + 1])
    assert [port_of(c, p["targetPort"]) for p in service["spec"]["ports"]] == [port]


def test_the_hpa_scales_the_deployment_on_cpu_and_on_an_exported_queue_metric():
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one("Deployment")["metadata"]["name"],
    }
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Resource"]["resource"]["target"]["type"] == "Utilization"
    name = by_type["Pods"]["pods"]["metric"]["name"]
    assert name == "gptcore_queue_depth" and name in exported_metrics()


def test_the_adapter_rule_maps_the_series_to_the_hpa_metric():
    configmap = one("ConfigMap")
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    (hpa_metric,) = [
        m["pods"]["metric"]["name"] for m in one("HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"
    ]
    served = {}
    for rule in rules:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        as_ = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule["name"]["as"])
        served[re.sub(rule["name"]["matches"], as_, series)] = (series, rule)
    series, rule = served[hpa_metric]
    assert series in exported_metrics()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
