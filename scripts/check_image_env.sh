#!/usr/bin/env bash
# The Dockerfile's builder stage without Docker: build the image's Python environment in a
# temporary venv with the same commands, so the dependency set (constraints.txt, the
# onnxruntime -> onnxruntime-gpu swap, pip check, check_runtime.py) is proven on a host
# without a Docker engine.
#
#   scripts/check_image_env.sh cpu|gpu [PYTHON]
#
# PYTHON defaults to python3. The images use CPython 3.12; another 3.11+ works where the
# pinned wheels exist for it. `gpu` downloads onnxruntime-gpu (~255 MB) and needs no GPU:
# check_runtime.py asks onnxruntime which providers it was built with.
set -euo pipefail

flavor=${1:?usage: $0 cpu|gpu [PYTHON]}
python=${2:-python3}
case "$flavor" in cpu|gpu) ;; *) echo "usage: $0 cpu|gpu [PYTHON]" >&2; exit 2 ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The build context as the Dockerfile sees it (same files the COPY lines name).
mkdir -p "$work/src" "$work/build"
cp "$root"/deploy/docker/{constraints.txt,image_deps.py,check_runtime.py} "$work/build/"
cp "$root"/pyproject.toml "$root"/README.md "$work/src/"
cp -r "$root"/isomax "$root"/service "$root"/training "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +

"$python" -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
cd "$work/src"
echo "== $flavor environment with $(python --version)"
python "$work/build/image_deps.py" "$flavor" pyproject.toml "$work/build/requirements.txt"
pip install -q -c "$work/build/constraints.txt" -r "$work/build/requirements.txt"
pip install -q --no-deps .
pip check
cd "$work"  # import the installed package, not the source tree
python "$work/build/check_runtime.py" "$flavor"
pip list --format=freeze | grep -iE '^(onnxruntime|onnxruntime-gpu|torch|numpy|fastapi)=='
echo "== $flavor environment OK"
