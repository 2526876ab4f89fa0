#!/usr/bin/env bash
# Download the wheels of scripts/gpu_wheels.txt into .whl/ (git-ignored locally) for a lent GPU machine,
# which has no package index: carry ".whl" with the run and start it with scripts/gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
mapfile -t WANTED < <(grep -v '^\s*#' scripts/gpu_wheels.txt | grep -v '^\s*$')
BINARY=()
for spec in "${WANTED[@]}"; do
  case "$spec" in deepspeed==*) DEEPSPEED=$spec ;; *) BINARY+=("$spec") ;; esac
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${BINARY[@]}"
python3 -m pip wheel --quiet --no-deps -w .whl "${DEEPSPEED:?scripts/gpu_wheels.txt names no deepspeed}"
du -sh .whl
