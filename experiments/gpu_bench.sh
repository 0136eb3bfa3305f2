#!/usr/bin/env bash
# `jaxquant bench` on a lent GPU: dot_general (W8A8 vs bf16 at 2048^3 and 8192^3, and a
# decode-like 8x8192x8192) and decode (SmolLM2-135M shapes, random weights, batch 1 and 8,
# bf16 / int8 / int4 g128 weight-only, W8A8, W4A8) as ratios against bf16 (and f32).
# Writes $OUT/bench-gpu.json (and the environment) for experiments/results/.
#
#   OUT=/tmp/out bash experiments/gpu_bench.sh            # the GPU run
#   TINY=1 OUT=/tmp/out bash experiments/gpu_bench.sh     # a smoke run of the script on CPU
set -euo pipefail
OUT=${OUT:-/tmp/jaxquant-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device machine may lack small pure-Python dependencies (no network there): stand-ins
# for what the bench imports but never uses for its numbers (progress bars, the cache lock).
SHIM=$(mktemp -d)
if ! python -c "import tqdm" 2>/dev/null; then
  mkdir -p "$SHIM/tqdm"
  printf 'class tqdm:\n    def __init__(self, it=None, *a, **k): self.it = it\n    def __iter__(self): return iter(self.it)\n    def __getattr__(self, name): return lambda *a, **k: None\n' > "$SHIM/tqdm/auto.py"
  echo "from tqdm.auto import tqdm" > "$SHIM/tqdm/__init__.py"
fi
if ! python -c "import filelock" 2>/dev/null; then
  printf 'class Timeout(Exception): pass\nclass FileLock:\n    def __init__(self, *a, **k): pass\n    def __enter__(self): return self\n    def __exit__(self, *a): return False\n' > "$SHIM/filelock.py"
fi
export PYTHONPATH="$PYTHONPATH:$SHIM"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  git log -1 --format='commit %H %cd' 2>/dev/null || true
} | tee "$OUT/env.txt"
if [ "${TINY:-0}" = 1 ]; then
  ARGS=(--dot-shapes 8x128x128 --recipes f32 --batches 1 --decode-steps 2)
else
  ARGS=(--dot-shapes 4096x4096x4096
        --recipes f32,bf16,int8_wo,int4_g128_wo,w8a8,w4a8_g128 --batches 1,8 --decode-steps 64
        --kv-caches float)
fi
timeout "${BENCH_TIMEOUT:-270}" python -m jaxquant.cli bench --quick --no-llama "${ARGS[@]}" \
  --json "$OUT/bench-gpu.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench-gpu.log"
