#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in one go: fp32, bf16 autocast and torch.compile rows go into
# BENCHMARKS.md as its last section, "Benchmarks on cuda" (a rerun replaces it). Run from the
# repository root on a machine with a GPU and the project installed (`make install`):
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$PY" -m benchmarks.run --device cuda --append
