"""End to end: the drift alerts on a real Prometheus scraping a real `isomax serve --workers 2`.

Traffic is real images through POST /classify: Fashion-MNIST test images (in-distribution),
then three shifts, each after in-distribution traffic long enough to clear the fast window:

1. 20% MNIST digits mixed in: `IsomaxOODRateHigh` fires.
2. every image blurred slightly (Gaussian, sigma 0.6 px): the flagged share moves a little (on
   the default bundle about 4.7% -> 6.1%, below the fast OOD alert's reach at these counts) but
   the scores move: `IsomaxScoreDrift` fires and `IsomaxOODRateHigh` does not.
3. images of one class only: `IsomaxClassMixDrift` fires.

The rules are the production template (scripts/drift_rules.py) rendered with short windows,
the only difference: production 5m -> 10 s here, 1h -> 20 s, 1d -> 40 s, and the fast alert's
`for: 2m` -> 2 s; scrape and evaluation every second. The statistical thresholds are the
production ones (they depend on the false-alarm budget, not on the duration), so each
statistic needs the same number of images as in production; what changes is how long it takes
to collect them. Record names keep their production window (`isomax:ood_z:5m` is computed over
10 s here). The two workers write multiprocess files that /metrics adds up; the per-class
counts, observed per batch in the batching thread, must add up to the per-request counts.
"""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import yaml

from tests import harness
from tests.deploy.test_e2e_prometheus import DEFAULT_MODEL, PromAPI, wait_for
from tests.deploy.tools import PROMETHEUS_CONFIG, ROOT, RULES, require_tool

sys.path.insert(0, str(ROOT / "scripts"))
import drift_rules

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TEST_WINDOWS = drift_rules.Windows({"5m": "10s", "1h": "20s", "1d": "40s"}, fast_for="2s")
FAST_S = 10  # the stand-in for 5m: in-distribution traffic this long clears the fast window
BATCH = 16


def _pngs(arrays: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@dataclass
class Pools:
    fashion: list[bytes]
    mixed: list[bytes]  # 20% MNIST
    blurred: list[bytes]
    one_class: list[bytes]


@pytest.fixture(scope="module")
def pools() -> Pools:
    from scipy.ndimage import gaussian_filter

    if not any((ROOT / "models" / DEFAULT_MODEL).glob("*/manifest.json")):
        pytest.skip("needs the default bundle: the shifts are measured on its distances")
    fmnist = pytest.importorskip("training.data.fmnist")
    ood = pytest.importorskip("training.data.ood")
    try:
        x, y = fmnist.load_split("test")
        digits = ood.load_mnist5k()
    except (fmnist.DataMissingError, ModuleNotFoundError) as e:
        pytest.skip(f"Fashion-MNIST test set or MNIST digits missing: {e}")
    rng = np.random.default_rng(0)
    x = x[:, 0]
    # In-distribution traffic cycles through every test image but the 800 the mixed pool uses:
    # sent round robin, a small pool's own sampling error is counted again on every pass, and
    # the score chi-square grows with it (a pool of 2,000 drifted enough for the default
    # bundle's Mahalanobis score to fire IsomaxScoreDrift on in-distribution traffic).
    ids = np.concatenate([x[:2000], x[2800:]])
    mixed = np.concatenate([x[2000:2800], digits[:200, 0]])[rng.permutation(1000)]
    blurred = gaussian_filter(x[:2000].astype(np.float32), sigma=(0, 0.6, 0.6))
    one = x[y == 1][:500]  # trousers only
    return Pools(_pngs(ids), _pngs(mixed), _pngs(np.clip(blurred, 0, 255).astype(np.uint8)),
                 _pngs(one))  # fmt: skip


class Traffic:
    """A thread posting batches from the current pool, round robin, until stopped."""

    def __init__(self, base: str, pool: list[bytes]) -> None:
        self.base, self.pool, self.sent = base, pool, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import httpx

        i = 0
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.is_set():
                pool = self.pool
                chunk = [pool[(i + k) % len(pool)] for k in range(BATCH)]
                i += BATCH
                files = [("file", (f"{k}.png", d, "image/png")) for k, d in enumerate(chunk)]
                r = client.post("/classify", files=files)
                assert r.status_code == 200, r.text
                self.sent += BATCH

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


@dataclass
class Stack:
    prom: PromAPI
    base: str
    prom_proc: harness.Server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("drift")
    rules = tmp / "rules"
    rules.mkdir()
    shutil.copy(RULES / "isomax.rules.yml", rules / "isomax.rules.yml")
    (rules / "isomax-drift.rules.yml").write_text(
        drift_rules.dump(drift_rules.render(TEST_WINDOWS))
    )
    sport, pport = harness.free_port(), harness.free_port()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules / "*.yml")]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    jobs["isomax"]["static_configs"] = [{"targets": [f"127.0.0.1:{sport}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{pport}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_args = [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{pport}",
                 "--log.level=warn"]  # fmt: skip
    env = harness.service_env(ISOMAX_DEVICE="cpu")
    cmd = harness.isomax_serve_command(
        ROOT / "models", sport, "--models", DEFAULT_MODEL, "--workers", "2"
    )
    with (
        harness.serve(cmd, sport, tmp / "service.log", env=env, timeout=120) as service,
        harness.serve(prom_args, pport, tmp / "prometheus.log",
                      ready=harness.status_is("/-/ready"), timeout=30) as pproc,
    ):  # fmt: skip
        prom = PromAPI(pproc.url)
        wait_for("the drift expectations scraped",
                 lambda: prom.scalar("count(isomax:score_level:expected)") == 8, 30, pproc)  # fmt: skip
        yield Stack(prom, service.url, pproc)


def firing(prom: PromAPI, alert: str, **labels: str) -> list[dict[str, str]]:
    sel = ",".join([f'alertname="{alert}"', 'alertstate="firing"',
                    *(f'{k}="{v}"' for k, v in labels.items())])  # fmt: skip
    return [s["metric"] for s in prom.query(f"ALERTS{{{sel}}}")]


def firing_or_none(prom: PromAPI, alert: str, **labels: str) -> list[dict[str, str]] | None:
    """For wait_for, which takes anything but None and False (an empty list too) as done."""
    return firing(prom, alert, **labels) or None


def drift_alerts(prom: PromAPI) -> list[dict[str, str]]:
    names = "|".join(r["alert"] for r in drift_rules.alert_rules(TEST_WINDOWS))
    return [s["metric"] for s in prom.query(f'ALERTS{{alertname=~"{names}"}}')]


def test_drift_alerts_fire_for_their_shift_only(stack: Stack, pools: Pools) -> None:
    prom = stack.prom
    traffic = Traffic(stack.base, pools.fashion)
    try:
        # 0. In-distribution: two fast windows of it, no drift alert pending or firing.
        deadline = time.monotonic() + 2 * FAST_S
        wait_for("a full fast window of traffic",
                 lambda: (prom.scalar('isomax:drift_images:increase5m') or 0) >= 500, 30)  # fmt: skip
        while time.monotonic() < deadline:
            assert drift_alerts(prom) == [], "an alert on pure in-distribution traffic"
            time.sleep(1)

        # 1. 20% MNIST: the fast OOD-rate alert fires, naming the model and window.
        traffic.pool = pools.mixed
        (alert,) = wait_for(
            "IsomaxOODRateHigh", lambda: firing_or_none(prom, "IsomaxOODRateHigh"), 40
        )
        assert (alert["model"], alert["window"]) == (DEFAULT_MODEL, "5m")

        # 2. Blurred: after the fast window is clean again, the score drifts, the OOD rate
        #    alert stays quiet.
        traffic.pool = pools.fashion
        wait_for("IsomaxOODRateHigh resolved",
                 lambda: not firing(prom, "IsomaxOODRateHigh")
                 and not firing(prom, "IsomaxScoreDrift", window="5m"),
                 40)  # fmt: skip
        time.sleep(FAST_S)
        traffic.pool = pools.blurred

        def score_drift() -> list[dict[str, str]] | None:
            assert not firing(prom, "IsomaxOODRateHigh"), "the OOD rate alert fired on blur"
            return firing_or_none(prom, "IsomaxScoreDrift", window="5m")

        (alert,) = wait_for("IsomaxScoreDrift", score_drift, 40)
        assert alert["model"] == DEFAULT_MODEL
        ood_z = prom.scalar("isomax:ood_z:5m")
        assert ood_z is not None and ood_z < drift_rules.z_threshold("5m")

        # 3. One class only: the class-mix alert fires.
        traffic.pool = pools.one_class
        (alert,) = wait_for("IsomaxClassMixDrift",
                            lambda: firing_or_none(prom, "IsomaxClassMixDrift", window="5m"), 40)  # fmt: skip
        assert alert["model"] == DEFAULT_MODEL
        # Once the fast window holds only trousers, 90% of the traffic has "changed class".
        wait_for("the class-mix distance of a one-class window",
                 lambda: (prom.scalar("isomax:class_mix_tv:5m") or 0) > 0.8, 30)  # fmt: skip
    finally:
        traffic.stop()

    # The two workers' per-batch class counts add up to their per-request verdict counts.
    def counted() -> bool:
        per_request = prom.scalar("sum(isomax_images_total)")
        per_batch = prom.scalar("sum(isomax_class_images_total)")
        levels = prom.scalar("sum(isomax_score_level_total)")
        return per_request == per_batch == levels == traffic.sent

    wait_for("every image counted once in each family", counted, 20, stack.prom_proc)
