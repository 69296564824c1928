#!/usr/bin/env bash
# The GPU table of the speed benchmarks (issue 12, point 5): fp32 and bf16 side by side, the base preset
# (width 768, depth 14, heads 12) on 256-token grids (16x16), then the small preset on 8x8 for comparison
# with the CPU table; then the RandAR-L rows (issue 27: configs/model/ar/randar_l.yaml, 16x16 tokens, vocabulary
# 16384, 1000 classes, bf16): training tokens/s, sampling tokens/s in random and confidence order, exact greedy
# extraction images/s, each beside the others in one alternating loop. Writes markdown to stdout and JSON into OUT
# (default runs/bench_gpu).
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
python -m benchmarks.bench_pretrained randar --device cuda --dtype bf16 --repeats 3 --json "$out/bench_randar_l_16.json"
