#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (the run tool), from the repository root, with `.whl` carried (see prepare.sh):
#   bash benchmarks/gpu/checks.sh [train|serve|tests ...]     (default: all three)
# Writes under $OUT: gpu.txt, cuda_tests.txt, train.json/.log, serve.json/.log. Each part has its own time limit:
# `tests train` (about 2 + 3.5 minutes on an H200, compiler caches empty) fit one 10-minute call; serve takes another.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests serve train)
python -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD:$PWD/platform PATH=$PWD/.whl/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1
for part in "${parts[@]}"; do
  case "$part" in
    tests)  # the CUDA-only tests (the rest of the suite runs in CI); no Django here, so no conftest
      timeout 270 python -m pytest -q -c /dev/null --noconftest -p no:cacheprovider -rs \
        tests/workers/ml/test_packed_gpt2.py tests/workers/ml/test_fused_loss.py tests/workers/ml/test_optimization.py \
        tests/workers/ml/test_cuda_graphs.py \
        tests/workers/serving/test_kv_cache.py::test_rows_join_leave_and_grow_with_every_row_keeping_its_own_positions \
        > "$OUT/cuda_tests.txt" 2>&1 ;;
    train)  # GPT-2 124M, 16 x 1024, bf16, compiled (as CUDA graphs, and without them); the Trainer baseline in the
      # same run; 3 profiled steps after
      timeout 330 python benchmarks/train_throughput.py --kernels flex --profile-steps 3 --without-cuda-graphs \
        --output "$OUT/train.json" \
        > "$OUT/train.log" 2>&1 ;;
    serve)  # GPT-2 12 x 768, 128 new tokens, 1/8/32/64 clients against sequential generate
      timeout 180 python benchmarks/serve_throughput.py --device cuda --output "$OUT/serve.json" \
        > "$OUT/serve.log" 2>&1 ;;
    *) echo "unknown part: $part" >&2 ;;
  esac
  echo "$part: exit $?" >> "$OUT/gpu.txt"
done
