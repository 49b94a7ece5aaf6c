#!/usr/bin/env bash
# Here, before a device call: the serving wheels the GPU machine's Python 3.12 lacks, into .whl/
# (ignored through .git/info/exclude; ~10 MB). serve_cuda.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl -r bench/gpu/serve_wheels.txt
ls .whl | wc -l
