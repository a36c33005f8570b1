#!/usr/bin/env bash
# The GPU check: what a machine with an NVIDIA GPU must show, in under 8 minutes.
#
#   bench/gpu_check.sh [OUT_DIR]        (default OUT_DIR: a new temporary folder)
#
# 1. a short real search (the real launcher) with two workers pinned on one GPU
#    (--workers_per_gpu 2, small + convnext at 160x1760, random weights), while nvidia-smi samples
#    GPU utilisation and memory every 500 ms: lines/s, utilisation, peak memory, precision;
# 2. real AMP training throughput of convnext and vit at 160x1760 (bench/train_throughput.py);
# 3. memory is released after a forced out-of-memory trial (tests/test_gpu.py), and the batched
#    augmentation runs on the GPU (tests/test_augment.py).
# The report is OUT_DIR/gpu_check.md (also printed). Without a GPU it stops at once with exit 2.
# The GPU is the first of CUDA_VISIBLE_DEVICES if set, else GPU 0. PYTHON overrides the
# interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "gpu_check: error: $*" >&2; exit 2; }   # (its arguments joined by spaces)

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3) || fail "no Python found; set PYTHON=/path/to/python"
command -v nvidia-smi >/dev/null 2>&1 \
    || fail "nvidia-smi not found: this check needs a machine with an NVIDIA GPU" \
            "(the CPU benchmarks are 'make bench')"
GPU=${CUDA_VISIBLE_DEVICES:-0}
GPU=${GPU%%,*}
[ -n "$GPU" ] && [ "$GPU" != "-1" ] \
    || fail "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}' hides every GPU; unset it or name one"
nvidia-smi -i "$GPU" -L >/dev/null 2>&1 \
    || fail "nvidia-smi does not know GPU '$GPU' (see nvidia-smi -L)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || fail "$PY: torch sees no CUDA GPU (a CPU-only torch build, or a driver problem)"

# nvidia-smi numbers GPUs by PCI bus; let CUDA do the same (the launcher does it for its workers)
export CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}
OUT=${1:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "gpu_check: GPU $GPU, output in $OUT"

nvidia-smi -i "$GPU" --query-gpu=timestamp,utilization.gpu,memory.used,memory.total \
    --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia_smi.csv" &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT

echo "gpu_check: [1/4] synthetic data (8 writers, lines 160 px high)"
rm -rf "$OUT/data"
timeout 45 "$PY" dataset.py make-synthetic "$OUT/data" --writers 8 --similarity 0.75 \
    --height 160 > "$OUT/data.log" 2>&1 || fail "making the data failed: see $OUT/data.log"

echo "gpu_check: [2/4] a real search: 2 workers on GPU $GPU (at most 3.5 minutes)"
timeout 210 "$PY" parallel_search.py --gpus "$GPU" --workers_per_gpu 2 --data_root "$OUT/data" \
    --checkpoint_dir "$OUT/search" --n_trials 4 --models small,convnext --no_pretrained \
    --epochs 3 --img_height 160 --img_width 1760 --batch_size 16 --lines_per_writer 128 \
    --num_workers 2 --no_summary > "$OUT/search.log" 2>&1 \
    || fail "the search failed or ran past 3.5 minutes (exit $?): see $OUT/search.log"

echo "gpu_check: [3/4] AMP training throughput, convnext and vit at 160x1760"
CUDA_VISIBLE_DEVICES="$GPU" timeout 120 "$PY" bench/train_throughput.py --device cuda \
    --models convnext,vit --sizes 160x1760 --batch 16 --steps 20 --json "$OUT/throughput.json" \
    > "$OUT/throughput.log" 2>&1 || fail "the throughput run failed: see $OUT/throughput.log"

echo "gpu_check: [4/4] memory after a forced out-of-memory trial; augmentation on the GPU"
CUDA_VISIBLE_DEVICES="$GPU" timeout 75 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py::test_memory_is_released_after_an_out_of_memory_trial \
    tests/test_augment.py::test_on_the_gpu_reproducible_and_in_range > "$OUT/pytest.log" 2>&1 \
    || fail "a GPU test failed: see $OUT/pytest.log"
grep -q "2 passed" "$OUT/pytest.log" || fail "the GPU tests did not both pass: see $OUT/pytest.log"

kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
"$PY" bench/gpu_check_report.py "$OUT"
