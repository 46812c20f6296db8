#!/usr/bin/env bash
# Build one virtual environment per peer server for bench/compare.py, under bench/out/peers/
# (git-ignored). Peers are not project dependencies and CI never installs them.
#
#   bash bench/peers/setup.sh [bentoml|mlserver|ray|triton ...]   # default: all four
#
# Every peer gets the onnxruntime, numpy and Pillow versions of the project's own venv, so the
# model runs on the same runtime everywhere. Triton (nvidia-pytriton) needs Python 3.13: the
# Python backend stub it ships embeds libpython 3.13, and a 3.11 interpreter fails in it when
# the bound model initialises. Set PEER_PYTHON / TRITON_PYTHON to choose the interpreters
# (defaults: python3.11, and pyenv's 3.13 or python3.13). An existing venv is kept: delete its
# folder to rebuild it.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
dest=${PEERS_DIR:-$root/bench/out/peers}
project_python=${PROJECT_PYTHON:-$root/.venv/bin/python}
py=${PEER_PYTHON:-python3.11}
if [[ -z ${TRITON_PYTHON:-} ]]; then
    if command -v pyenv >/dev/null && prefix=$(pyenv prefix 3.13 2>/dev/null); then
        TRITON_PYTHON=$prefix/bin/python3.13
    else
        TRITON_PYTHON=python3.13
    fi
fi

# The runtime versions the project's venv has (the peers must run the same onnxruntime).
read -r ORT NUMPY PILLOW < <("$project_python" -c \
    'import importlib.metadata as m; print(*(m.version(d) for d in ("onnxruntime", "numpy", "pillow")))')

declare -A PACKAGES=(
    [bentoml]="bentoml==1.4.40"
    # uvloop 0.22 changed get_event_loop(); MLServer 1.7.1's inference workers die on it.
    [mlserver]="mlserver==1.7.1 uvloop<0.22"
    [ray]="ray[serve]==2.60.0"
    [triton]="nvidia-pytriton==0.7.0"
)

build() {
    local name=$1 python=$2 venv=$dest/$1
    if [[ -x $venv/bin/python && -f $venv/.installed ]]; then
        echo "peers: $name: $venv exists (delete it to rebuild)"
        return
    fi
    echo "peers: $name: building $venv with $("$python" --version)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    local runtime=("onnxruntime==$ORT" "pillow==$PILLOW")
    # nvidia-pytriton requires numpy < 2 (with numpy 2 its bytes and output tensors come out
    # wrong); numpy 1.26 has no wheel for Python 3.13, so pip compiles it (minutes, once).
    [[ $name == triton ]] || runtime+=("numpy==$NUMPY")
    "$venv/bin/python" -m pip install -q ${PACKAGES[$name]} "${runtime[@]}"
    "$venv/bin/python" -m pip freeze >"$venv/freeze.txt"
    touch "$venv/.installed"
    echo "peers: $name: ready ($(grep -ciE '^' "$venv/freeze.txt") packages)"
}

mkdir -p "$dest"
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(bentoml mlserver ray triton)
for name in "${names[@]}"; do
    case $name in
        bentoml | mlserver | ray) build "$name" "$py" ;;
        triton) build triton "$TRITON_PYTHON" ;;
        *) echo "peers: unknown peer $name (bentoml, mlserver, ray, triton)" >&2; exit 2 ;;
    esac
done
