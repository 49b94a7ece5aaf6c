#!/usr/bin/env bash
# Issue 17.5 on a lent GPU machine, as one command (bench/gpu/README.md): the device tool's `run`
# with carry [".whl"] and this script. .whl/ holds the serving wheels that machine lacks (bentoml
# and its needs, open_clip), for its Python 3.12; clipheads itself runs from the tree sent, laid out
# as the editable install maps it (clipheads/{serving,export,training} -> the top-level folders).
set -uo pipefail
out="${OUT:-/tmp/serve-cuda}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
for sub in serving export training; do [ -e "clipheads/$sub" ] || ln -s "../$sub" "clipheads/$sub"; done
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout "${SERVE_CUDA_TIMEOUT_S:-480}" python3 bench/gpu/serve_cuda.py --arch "${ARCH:-ViT-B-16}" --duration 15 --out "$out" 2>&1 \
    | tee "$out/serve-cuda.log"
