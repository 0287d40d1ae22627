#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (about 10 minutes on one GPU): the GPU tests (sharded strategies
# with the callback; the draws on CUDA against the CPU, eager and compiled), then the overhead benchmark on the
# GPU, eager, compiled and by phase, written to benchmarks/results/overhead-*-cuda.md (or $OUT when set), and the stock
# implementations of the select scheme's steps timed side by side (select-ops-cuda.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python -m pytest -q tests/gpu 2>&1 | tail -20
python benchmarks/overhead.py --device cuda --no-memory --steps 20 --rounds 3 --out "$out"
python benchmarks/overhead.py --device cuda --compile --steps 20 --rounds 3 --out "$out"
python benchmarks/overhead.py --device cuda --phases --rounds 5 --out "$out"
python benchmarks/select_ops.py --device cuda | tee "$out/select-ops-cuda.md"
