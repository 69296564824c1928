#!/usr/bin/env bash
# The GPU table of the speed benchmarks (issue 12, point 5): fp32 and bf16 side by side, the base preset
# (width 768, depth 14, heads 12) on 256-token grids (16x16), then the small preset on 8x8 for comparison
# with the CPU table. Writes markdown to stdout and JSON into OUT (default runs/bench_gpu).
#
#     bash benchmarks/gpu_table.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench_gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m benchmarks.bench_ar --device cuda --preset base --grid 16 --repeats 3 --json "$out/bench_ar_base_16.json"
python -m benchmarks.bench_extraction --device cuda --preset base --grid 16 --json "$out/bench_extraction_base_16.json"
python -m benchmarks.bench_ar --device cuda --json "$out/bench_ar_small_8.json"
