#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the lent GPU machine and its image lacks (~1 MB), into .whl/ (git-ignored
# through .git/info/exclude): datasets with the two needs the image misses, and lpips. Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
ex="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$ex" 2>/dev/null || echo /.whl/ >> "$ex"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 lpips==0.1.4
ls -la .whl
