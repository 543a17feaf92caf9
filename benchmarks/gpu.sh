#!/usr/bin/env bash
# On a CUDA machine, in one go: first the CUDA tests (tests/test_gpu.py, the GPU paths against the
# CPU and transformers), then the benchmarks, whose fp32, bf16 autocast and torch.compile rows go
# into BENCHMARKS.md as its last section, "Benchmarks on cuda: GPU, torch X.Y (date)" (a rerun
# on the same GPU and torch replaces it), then profiles of a 124M training step (bf16) and of
# decoding, each printing how long the GPU ran kernels against the wall time (tee the output to
# keep them). Each part runs even if one before it failed; the exit status is non-zero if any did.
# Run from anywhere on a machine with a GPU; extra arguments go to benchmarks.run (e.g. --reps 5):
#   bash benchmarks/gpu.sh [--help]
# It runs .venv/bin/python where `make install` made one, else python3 (or $PY) with llmlab read
# from src/: an offline GPU machine needs no install, only PyTorch, numpy, tokenizers, safetensors,
# tqdm, transformers and pytest, the packages the tests and benchmarks import.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' benchmarks/gpu.sh  # the comment above
  echo
  "$PY" -m benchmarks.run --help | sed '1,/^$/d'  # benchmarks.run's options, without its usage lines
  exit 0
fi
"$PY" - <<'CHECK'
import importlib, sys
for name in ("torch", "numpy", "tokenizers", "safetensors", "tqdm", "transformers", "pytest"):
    try:
        importlib.import_module(name)
    except ImportError:
        sys.exit(f"gpu.sh: {sys.executable} has no {name} (make install, or set PY to a Python with it)")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: no CUDA device (torch {torch.__version__}); the CPU suite is `make bench`")
CHECK
status=0
"$PY" -m pytest -p no:cacheprovider tests/test_gpu.py || status=$?
"$PY" -m benchmarks.run --device cuda --append "$@" || status=$?
# Where a step's and a token's time goes: GPU kernel time against wall time, at GPT-2 124M
"$PY" -m benchmarks.profile_train --device cuda --shape 124M --bf16 --steps 3 --top 12 || status=$?
"$PY" -m benchmarks.profile_decode --device cuda --shape 124M --peer --top 12 || status=$?
exit "$status"
