"""deploy/k8s: every overlay rendered by the real kustomize and every object schema-validated.

Rendering: `kubectl kustomize` (or a standalone `kustomize build`). Core objects are validated
with kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields are errors).
PodMonitor and PrometheusRule are validated with the Prometheus Operator's own published types
(cloudcoil-models-prometheus-operator, generated from the operator's CRDs): parsing must
succeed and must keep every field, so a misspelt or misplaced field fails. The KServe
InferenceService has no schema package on a registry; its predictor is a Kubernetes pod spec
(with KServe's scaling fields on top), which is validated as one.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, ROOT, RULES, find_tool

K8S = DEPLOY / "k8s"
OVERLAYS = ("overlays/gpu", "overlays/cpu", "overlays/models-volume")
KSERVE = "kserve"
# The Kubernetes version the objects are validated against (kubernetes-validate's schemas).
K8S_VERSION = "1.30"
# KServe's own fields on the predictor, beside the pod spec it embeds.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}


def kustomize_command() -> list[str]:
    """`kubectl kustomize` or `kustomize build`; CI must have one (the test fails there)."""
    kubectl = find_tool("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = find_tool("kustomize")
    if kustomize:
        return [kustomize, "build"]
    message = "neither kubectl nor kustomize is installed: deploy/k8s cannot be rendered"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    r = subprocess.run(
        [*kustomize_command(), str(K8S / path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # deprecated kustomization fields
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def render(path: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(path)))


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def validate_core(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_prometheus_operator(obj: dict[str, Any]) -> None:
    """Parse with the operator's published types; every field of `obj` must survive."""
    from cloudcoil.models.prometheus_operator import v1

    cls = {"PodMonitor": v1.PodMonitor, "PrometheusRule": v1.PrometheusRule}[obj["kind"]]
    parsed = cls.model_validate(obj)
    dumped = _strip_none(parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))
    assert dumped == obj, f"{obj['kind']}: fields the CRD does not know were dropped"


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"] == "monitoring.coreos.com/v1":
        validate_prometheus_operator(obj)
    elif obj["apiVersion"].startswith("serving.kserve.io/"):
        predictor = dict(obj["spec"]["predictor"])
        assert set(predictor) - KSERVE_PREDICTOR_FIELDS  # a pod spec remains
        for field in KSERVE_PREDICTOR_FIELDS:
            predictor.pop(field, None)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": predictor}
        validate_core(pod)
    else:
        validate_core(obj)


# -- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("path", [*OVERLAYS, KSERVE])
def test_renders_and_every_object_is_valid(path: str) -> None:
    objects = render(path)
    assert objects
    for obj in objects:
        validate(obj)


def test_the_validators_reject_a_misspelt_field() -> None:
    """The validation above is strict: a wrong field name fails, in core and CRD objects."""
    import kubernetes_validate

    deployment = by_kind(render("overlays/gpu"), "Deployment")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment)

    monitor = by_kind(render("overlays/gpu"), "PodMonitor")
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(AssertionError, match="fields the CRD does not know"):
        validate_prometheus_operator(monitor)

    rule = by_kind(render("overlays/gpu"), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["expression"] = "up"
    with pytest.raises(AssertionError, match="fields the CRD does not know"):
        validate_prometheus_operator(rule)


def test_every_overlay_has_the_whole_set() -> None:
    for path in OVERLAYS:
        kinds = sorted(o["kind"] for o in render(path))
        expected = [
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PodMonitor",
            "PrometheusRule",
            "Service",
        ]
        if path == "overlays/models-volume":
            expected.append("PersistentVolumeClaim")
        assert kinds == sorted(expected), path


# -- the PrometheusRule is the compose stack's rules -----------------------------------------


@pytest.mark.parametrize("path", OVERLAYS)
def test_prometheus_rule_holds_exactly_the_compose_rules(path: str) -> None:
    rule = by_kind(render(path), "PrometheusRule")
    files = [yaml.safe_load(f.read_text()) for f in sorted(RULES.glob("*.yml"))]
    assert len(files) >= 2 and all(list(f) == ["groups"] for f in files)
    assert rule["spec"] == {"groups": [g for f in files for g in f["groups"]]}


def test_prometheus_rule_file_is_generated_from_the_rules() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "k8s_prometheus_rule.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


# -- the Deployment --------------------------------------------------------------------------


@pytest.mark.parametrize("path", OVERLAYS)
def test_probes(path: str) -> None:
    c = container(render(path))
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert ports["http"] == int(env(c)["ISOMAX_PORT"])


@pytest.mark.parametrize("path", [*OVERLAYS, KSERVE])
def test_locked_down(path: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities."""
    objects = render(path)
    if path == KSERVE:
        pod = by_kind(objects, "InferenceService")["spec"]["predictor"]
    else:
        pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("privileged") in (None, False)
    # The one writable place: /tmp (prometheus_client's multiprocess files, Python's temp files).
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("path", [*OVERLAYS, KSERVE])
def test_requests_and_limits(path: str) -> None:
    objects = render(path)
    if path == KSERVE:
        (c,) = by_kind(objects, "InferenceService")["spec"]["predictor"]["containers"]
    else:
        c = container(objects)
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"])
    assert "memory" in res["limits"]


@pytest.mark.parametrize("path", ["overlays/gpu", "overlays/models-volume", KSERVE])
def test_gpu_variants_ask_for_one_gpu_and_require_cuda(path: str) -> None:
    objects = render(path)
    if path == KSERVE:
        (c,) = by_kind(objects, "InferenceService")["spec"]["predictor"]["containers"]
    else:
        c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(c)["ISOMAX_DEVICE"] == "cuda"
    assert c["image"].endswith(":gpu")


def test_cpu_variant_has_no_gpu() -> None:
    objects = render("overlays/cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump(objects)
    c = container(objects)
    assert env(c)["ISOMAX_DEVICE"] == "cpu"
    assert c["image"].endswith(":cpu")
    # The service sizes onnxruntime's threads from the CPU limit (its cgroup) and the model's
    # cost (service/sessions.py): a fixed count here would be wrong for one kind of model.
    assert "ISOMAX_INTRA_OP_THREADS" not in env(c)
    assert int(c["resources"]["limits"]["cpu"]) >= 2


@pytest.mark.parametrize("path", [*OVERLAYS, KSERVE])
def test_every_isomax_variable_is_a_setting(path: str) -> None:
    from service.settings import Settings

    names = {f"ISOMAX_{k.upper()}" for k in Settings.model_fields}
    text = yaml.safe_dump(render(path))
    used = set(re.findall(r"\bISOMAX_[A-Z_]+\b", text))
    assert used and used <= names, used - names


def test_models_from_the_image_or_a_volume() -> None:
    c = container(render("overlays/gpu"))
    assert env(c)["ISOMAX_MODELS_DIR"] == "/opt/isomax/models"  # the image's bundles
    assert "/opt/isomax/models" not in {m["mountPath"] for m in c["volumeMounts"]}

    objects = render("overlays/models-volume")
    c = container(objects)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env(c)["ISOMAX_MODELS_DIR"]]
    assert mount["readOnly"] is True
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = by_kind(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim


# -- the objects point at each other ---------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("path", OVERLAYS)
def test_selectors_and_ports_match_the_pods(path: str) -> None:
    objects = render(path)
    deployment = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(objects)["ports"]}
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    service = by_kind(objects, "Service")
    assert _selects(service["spec"]["selector"], pod_labels)
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports

    pdb = by_kind(objects, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # One replica may go at a time, and never the last: replicas and minReplicas are above it.
    hpa = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert deployment["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    monitor = by_kind(objects, "PodMonitor")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], pod_labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("path", OVERLAYS)
def test_scrape_job_is_the_one_the_alerts_watch(path: str) -> None:
    """The PodMonitor names the job after a pod label: `isomax`, as `IsomaxDown` expects."""
    objects = render(path)
    pod_labels = by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    job = pod_labels[by_kind(objects, "PodMonitor")["spec"]["jobLabel"]]
    rules = (RULES / "isomax.rules.yml").read_text()
    assert f'up{{job="{job}"}}' in rules


@pytest.mark.parametrize("path", OVERLAYS)
def test_autoscaling_on_a_metric_the_service_exports(path: str) -> None:
    from service.metrics import PrometheusMetrics

    exported = {m.name for m in PrometheusMetrics().registry.collect()}
    hpa = by_kind(render(path), "HorizontalPodAutoscaler")
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods and set(pods) <= exported


@pytest.mark.parametrize("path", OVERLAYS)
def test_rolling_updates_are_gated_by_readiness(path: str) -> None:
    """New pods must be ready before old ones go: no capacity is lost to a bad bundle."""
    strategy = by_kind(render(path), "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_kserve_inference_service_speaks_v2_on_its_port() -> None:
    isvc = by_kind(render(KSERVE), "InferenceService")
    (c,) = isvc["spec"]["predictor"]["containers"]
    (port,) = c["ports"]
    assert port["containerPort"] == int(env(c)["ISOMAX_PORT"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port["containerPort"]


def test_k8s_files_are_all_used() -> None:
    """Every YAML file under deploy/k8s is a kustomization or listed by one."""
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed.add(kustomization)
        k = yaml.safe_load(kustomization.read_text())
        for entry in k.get("resources", []) + [p["path"] for p in k.get("patches", [])]:
            target = (kustomization.parent / entry).resolve()
            if target.is_file():
                listed.add(target)
    assert sorted(p.resolve() for p in K8S.rglob("*.yaml")) == sorted(p.resolve() for p in listed)
