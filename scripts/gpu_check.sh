#!/usr/bin/env bash
# The GPU deployment check, for a GPU test machine without internet (scripts/gpu_check.py says
# what it proves). Two halves:
#
#   scripts/gpu_check.sh prepare [DIR]   on a machine that reaches PyPI, in the repository:
#                                        the service's wheels (what the GPU machine's Python
#                                        lacks) and the Fashion-MNIST idx files into DIR
#                                        (default .gpu_check, kept out of git)
#   scripts/gpu_check.sh run [DIR] [-- gpu_check.py options]
#                                        on the GPU machine, in the repository copy: install the
#                                        wheels into a temporary directory, put it and the
#                                        repository on PYTHONPATH (nothing is installed into
#                                        the machine's Python), and run the checks. The report
#                                        goes to $OUT when set, else DIR/report.
#
# The GPU machine's python3 has torch with CUDA, onnxruntime (CPU build), numpy, pillow, onnx,
# prometheus-client and pyyaml; FastAPI, uvicorn, pydantic and pyspng are carried. Python: $PYTHON or
# python3. The whole run is bounded by GPU_CHECK_TIMEOUT seconds (default 290).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
dir=${2:-$root/.gpu_check}
python=${PYTHON:-python3}

# Service wheels the GPU machine's Python does not have (versions from the image constraints).
WHEELS=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
        python-multipart uvicorn annotated-types annotated-doc typing-inspection typing-extensions
        pyspng)

prepare() {
    mkdir -p "$dir/wheels" "$dir/fashion-mnist"
    local pins=()
    for name in "${WHEELS[@]}"; do
        local norm=${name//-/[-_]}
        local pin
        pin=$(grep -iE "^${norm}==" "$root/deploy/docker/constraints.txt" || true)
        [[ -n $pin ]] || { echo "gpu_check: $name is not in deploy/docker/constraints.txt" >&2; exit 2; }
        pins+=("$pin")
    done
    local plats=()
    for n in 28 27 17 5; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
    plats+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plats[@]}" -d "$dir/wheels" "${pins[@]}"
    local data=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
    cp "$data"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "$dir/fashion-mnist/"
    # Keep the carried folder out of git (local exclude only, nothing committed).
    if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
        local rel=${dir#"$root"/}
        local exclude
        exclude=$(git -C "$root" rev-parse --git-path info/exclude)
        [[ $exclude = /* ]] || exclude="$root/$exclude"
        grep -qxF "/$rel/" "$exclude" 2>/dev/null || echo "/$rel/" >>"$exclude"
    fi
    du -sh "$dir"
    echo "carry ${dir#"$root"/} with the repository; then: scripts/gpu_check.sh run"
}

run() {
    shift $(( $# > 1 ? 2 : $# ))
    [[ ${1:-} == -- ]] && shift
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    if compgen -G "$dir/wheels/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/wheels/*.whl
    fi
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    local out=${OUT:-$dir/report}
    timeout "${GPU_CHECK_TIMEOUT:-290}" "$python" "$root/scripts/gpu_check.py" \
        --data-dir "$dir/fashion-mnist" --out "$out" "$@"
}

case "$cmd" in
    prepare) prepare ;;
    run) run "$@" ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
