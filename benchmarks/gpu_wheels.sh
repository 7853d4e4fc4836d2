#!/usr/bin/env bash
# Fetch, here, the wheels that benchmarks/gpu_check.sh needs on the GPU machine: the
# packages its Python image lacks (it has torch, transformers, accelerate, peft, opencv,
# scikit-image, pytest, ...; see the device README). Python 3.12, x86-64 Linux.
# Usage, from the repository root: bash benchmarks/gpu_wheels.sh   (writes .whl/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "diffusers==$(version diffusers)" "psd-tools==$(version psd-tools)" \
  importlib-metadata lazy-importer
ls .whl
