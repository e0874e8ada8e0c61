#!/usr/bin/env bash
# One device run: install kdpipe over the image's torch, run the GPU tests, then both benchmarks.
# Usage (on the lent GPU machine, from the repo root): bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "kdpipe install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/test_gpu.py -x -p no:cacheprovider 2>&1 | tail -5
python3 benchmarks/capture.py --synthetic qwen-1.5b --device cuda --seq-len 1024 --batch-size 16 \
  --limit-rows 128 --top-k 64 --temperature 1 --temperature 2 --temperature 4 --repeats 2 2>/dev/null | tee "$OUT/capture_h100.json"
python3 benchmarks/train.py --synthetic qwen-1.5b --device cuda --student-hidden 512 --student-layers 4 \
  --rows 64 --seq-len 1024 --batch-size 8 --steps 6 --repeats 2 --temperature 2 2>/dev/null | tee "$OUT/train_gpu.json"
# FSDP student (issue 23): the sharded fused loss on CUDA (bf16 gathers); with 2+ GPUs also DDP vs FSDP side by side
python3 -m pytest -q -m gpu tests/train/test_fsdp.py -x -p no:cacheprovider 2>&1 | tail -5
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  python3 benchmarks/train_scale.py --device cuda --nproc "$NGPU" --batch-size 4 --seq-len 256 --steps 6 \
    --out "$OUT/train_scale_gpu.json" 2>/dev/null | tail -4
fi
# Tensor-parallel capture (issue 23): needs 2+ GPUs (one rank per GPU, nccl); the 2-GPU test against the
# CPU capture, then 1 GPU next to torchrun --tensor-parallel 2 on the 1.78 B shape
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 -m pytest -q -m gpu tests/capture/test_capture_tp.py -x -p no:cacheprovider 2>&1 | tail -5
  python3 benchmarks/capture.py --tensor-parallel 2 --synthetic qwen-1.5b --device cuda --data data/shakespeare/heldout \
    --seq-len 1024 --batch-size 8 --limit-rows 64 --top-k 64 --repeats 1 --out "$OUT/capture_tp_gpu.json" 2>/dev/null | tail -4
fi
