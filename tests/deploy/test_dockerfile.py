"""The Dockerfile: linted by hadolint, parsed by BuildKit's own parser, and its build inputs."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from tests.deploy.tools import ROOT, require_tool

DOCKERFILE = ROOT / "Dockerfile"
DOCKER_DIR = ROOT / "deploy" / "docker"
CONSTRAINTS = DOCKER_DIR / "constraints.txt"
# onnxruntime-gpu 1.27 and later are built for CUDA 13 (their `cuda` extra asks for *-cu13);
# the image's base is CUDA 12, so the pin must stay at or below the last CUDA 12 build.
LAST_CUDA12_ORT = (1, 26)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCKER_DIR / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stages() -> dict[str, list]:
    """Instructions per stage, from the `dockerfile` package (BuildKit's Go parser)."""
    dockerfile = pytest.importorskip("dockerfile", reason="PyPI `dockerfile` (dev extra)")
    out: dict[str, list] = {}
    current = "(global)"
    for c in dockerfile.parse_file(str(DOCKERFILE)):
        if c.cmd == "FROM":
            current = c.value[2] if len(c.value) == 3 else c.value[0]
            out[current] = [c]
        else:
            out.setdefault(current, []).append(c)
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint")
    r = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_stages_and_default_target(stages: dict[str, list]) -> None:
    assert set(stages) >= {"cuda-python", "gpu-builder", "cpu-builder", "cpu", "gpu"}
    assert list(stages)[-1] == "gpu", "`docker build .` must give the GPU image"


def test_cuda_base_is_cuda12_cudnn9_runtime(stages: dict[str, list]) -> None:
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for c in stages["(global)"] for v in c.value}
    assert re.fullmatch(
        r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", args["CUDA_IMAGE"]
    )
    assert stages["cuda-python"][0].value[0] == "${CUDA_IMAGE}"


def test_onnxruntime_pins_match_cuda12(stages: dict[str, list]) -> None:
    pins = _pins()
    gpu, cpu = pins["onnxruntime-gpu"], pins["onnxruntime"]
    assert gpu == cpu, "CPU and GPU images should run the same onnxruntime version"
    assert tuple(int(x) for x in gpu.split(".")[:2]) <= LAST_CUDA12_ORT
    assert "torch" not in pins


def test_constraints_cover_and_satisfy_pyproject() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins()
    for d in map(Requirement, deps):
        names = ["onnxruntime", "onnxruntime-gpu"] if d.name == "onnxruntime" else [d.name.lower()]
        for name in names:
            assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
            assert d.specifier.contains(pins[name], prereleases=True), (
                f"{name}=={pins[name]} does not satisfy pyproject's {d}; "
                "run scripts/lock_image_deps.py"
            )


@pytest.mark.parametrize(
    "target, device, builder", [("gpu", "cuda", "gpu-builder"), ("cpu", "cpu", "cpu-builder")]
)
def test_runtime_stage(stages: dict[str, list], target: str, device: str, builder: str) -> None:
    cmds = stages[target]
    env: dict[str, str] = {}
    for c in (c for c in cmds if c.cmd == "ENV"):
        env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["ISOMAX_DEVICE"] == device
    assert env["ISOMAX_HOST"] == "0.0.0.0"
    (user,) = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert user.split(":")[0] not in ("0", "root"), "the service must not run as root"
    (health,) = [c for c in cmds if c.cmd == "HEALTHCHECK"]
    assert health.value[0] == "CMD" and health.value[-1].endswith("healthcheck.py")
    assert "/readyz" in (DOCKER_DIR / "healthcheck.py").read_text()
    (cmd,) = [c.value for c in cmds if c.cmd == "CMD"]
    assert list(cmd) == ["isomax", "serve"]
    copies = [c for c in cmds if c.cmd == "COPY"]
    assert any(c.flags == (f"--from={builder}",) and c.value[0] == "/opt/venv" for c in copies)
    # The default bundle is inside, where ISOMAX_MODELS_DIR points (and compose mounts ./models).
    assert any(c.value == ("models", env["ISOMAX_MODELS_DIR"]) for c in copies)
    # Service dependencies only: nothing in the runtime stage installs packages.
    assert not [c for c in cmds if c.cmd == "RUN" and "pip" in " ".join(c.value)]


def test_builders_install_one_onnxruntime_and_check_it(stages: dict[str, list]) -> None:
    for flavor in ("gpu", "cpu"):
        runs = " ".join(" ".join(c.value) for c in stages[f"{flavor}-builder"] if c.cmd == "RUN")
        assert f"image_deps.py {flavor} " in runs
        assert f"pip install --require-hashes -r /build/locked-{flavor}.txt" in runs
        assert "--no-build-isolation" in runs  # the project builds with the locked setuptools
        assert "pip check" in runs
        assert f"check_runtime.py {flavor}" in runs
        assert "torch" not in runs


def test_copy_sources_are_in_the_build_context(stages: dict[str, list]) -> None:
    """Every file COPY needs exists and survives .dockerignore (docker-py's implementation)."""
    build = pytest.importorskip("docker.utils.build", reason="PyPI `docker` (dev extra)")
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    context = set(build.exclude_paths(str(ROOT), patterns))
    for c in (c for cmds in stages.values() for c in cmds if c.cmd == "COPY" and not c.flags):
        for src in c.value[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: missing from the repository"
            assert src in context, f"COPY {src}: excluded by .dockerignore"
    assert not [p for p in context if p.startswith((".venv", ".git/", "tests/", "runs/", "data/"))]
    assert not [p for p in context if "__pycache__" in p]


def test_models_dir_holds_a_bundle_for_the_image() -> None:
    bundles = sorted(p.parent for p in (ROOT / "models").glob("*/*/manifest.json"))
    assert bundles, "models/ has no bundle: the image would start with nothing to serve"


def test_image_deps_swaps_onnxruntime_for_the_gpu_build(tmp_path: Path) -> None:
    image_deps = _load("image_deps")
    pyproject = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    before = image_deps.base_dependencies(pyproject)
    assert image_deps.main(["gpu", str(pyproject), str(tmp_path / "req.txt")]) == 0
    after = image_deps.base_dependencies(pyproject)
    (ort,) = [Requirement(d) for d in before if Requirement(d).name == "onnxruntime"]
    (gpu,) = [Requirement(d) for d in after if Requirement(d).name == "onnxruntime-gpu"]
    assert gpu.specifier == ort.specifier
    assert not [d for d in after if Requirement(d).name == "onnxruntime"]
    assert (tmp_path / "req.txt").read_text().split() == after
    # Everything else in the file is untouched, and a second swap is refused.
    assert len(pyproject.read_text()) == len((ROOT / "pyproject.toml").read_text()) + len("-gpu")
    with pytest.raises(SystemExit):
        image_deps.swap_to_gpu(pyproject)


def test_image_deps_cpu_keeps_pyproject(tmp_path: Path) -> None:
    image_deps = _load("image_deps")
    pyproject = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    assert image_deps.main(["cpu", str(pyproject), str(tmp_path / "req.txt")]) == 0
    assert pyproject.read_text() == (ROOT / "pyproject.toml").read_text()


GPU_EPS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_EPS = ["CPUExecutionProvider"]
ORT, ORT_GPU = {"onnxruntime": "1.26.0"}, {"onnxruntime-gpu": "1.26.0"}


@pytest.mark.parametrize(
    "flavor, dists, providers, torch, ok",
    [
        ("gpu", ORT_GPU, GPU_EPS, False, True),
        ("gpu", {**ORT_GPU, **ORT}, GPU_EPS, False, False),  # both builds installed
        ("gpu", ORT_GPU, CPU_EPS, False, False),  # a GPU build without CUDA
        ("gpu", ORT, CPU_EPS, False, False),  # the CPU build in the GPU image
        ("cpu", ORT, CPU_EPS, False, True),
        ("cpu", ORT, CPU_EPS, True, False),  # torch crept in
    ],
)
def test_check_runtime_refuses_mixed_or_cpu_only_installs(
    monkeypatch: pytest.MonkeyPatch,
    flavor: str,
    dists: dict,
    providers: list,
    torch: bool,
    ok: bool,
) -> None:
    check = _load("check_runtime")
    import onnxruntime

    monkeypatch.setattr(check, "installed", dists.get)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name == "torch":
            return object() if torch else None
        return real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(check.importlib.util, "find_spec", find_spec)
    assert (check.main([flavor]) == 0) is ok


def test_healthcheck_fails_without_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "healthcheck.py")], capture_output=True, text=True,
        timeout=30, env={"ISOMAX_PORT": str(port)},
    )  # fmt: skip
    assert r.returncode == 1 and "/readyz" in r.stderr


LOCK_LINE = re.compile(r"^([a-z0-9][a-z0-9._-]*)==(\S+) --hash=sha256:([0-9a-f]{64})$")


def _locked(flavor: str) -> dict[str, str]:
    """name -> version of deploy/docker/locked-<flavor>.txt, every entry with its sha256."""
    text = (DOCKER_DIR / f"locked-{flavor}.txt").read_text().replace("\\\n", "")
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = LOCK_LINE.match(" ".join(line.split()))
        assert m, f"locked-{flavor}.txt: not `name==version --hash=sha256:...`: {line!r}"
        out[re.sub(r"[-_.]+", "-", m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize("flavor, ort, other", [
    ("cpu", "onnxruntime", "onnxruntime-gpu"), ("gpu", "onnxruntime-gpu", "onnxruntime"),
])  # fmt: skip
def test_hash_locks_pin_the_constraints_and_one_onnxruntime(
    flavor: str, ort: str, other: str
) -> None:
    """Each image's lock has a hash for every package, agrees with constraints.txt, satisfies
    pyproject.toml, holds exactly its own onnxruntime build, and the build backend."""
    import tomllib

    locked, pins = _locked(flavor), _pins()
    assert ort in locked and other not in locked
    assert "setuptools" in locked and "torch" not in locked
    for name, version in locked.items():
        if name != "setuptools":
            assert pins.get(name) == version, (
                f"{name}: locked {version}, constraints {pins.get(name)}"
            )
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in map(Requirement, deps):
        name = ort if d.name == "onnxruntime" else d.name.lower()
        assert name in locked, f"{name} is missing from locked-{flavor}.txt"
        assert d.specifier.contains(locked[name], prereleases=True)
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for d in map(Requirement, build):
        assert d.specifier.contains(locked[d.name.lower()], prereleases=True)


DIGEST = re.compile(r"^[a-z0-9./_-]+:[A-Za-z0-9._-]+(@sha256:[0-9a-f]{64})?$")


def test_base_images_are_tagged_and_pinnable(stages: dict[str, list]) -> None:
    """Base images: `name:tag`, optionally `@sha256:<digest>` (the documented way to pin; the
    digest needs registry access to look up, so the defaults carry tags only)."""
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for c in stages["(global)"] for v in c.value}
    for name in ("CUDA_IMAGE", "PYTHON_IMAGE"):
        assert DIGEST.match(args[name]), f"{name}={args[name]}"
    assert "@sha256:<digest>" in DOCKERFILE.read_text()  # the pinning instructions are there
