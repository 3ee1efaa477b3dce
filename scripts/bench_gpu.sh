#!/usr/bin/env bash
# One go on a CUDA GPU (< 10 min on an H100/H200): the GPU tests, the kernels' device-time rows
# (issue #13) and the denoising-step rows (issue #14). JSON goes to docs/bench/ and, when set, $OUT.
#
#   bash scripts/bench_gpu.sh
#
# Environment:
#   PYTHON                 the interpreter holding torch + triton (default: python3)
#   QVGEN_PYTHONPATH       extra import paths, e.g. a carried site-packages holding diffusers
#   QVGEN_WHEELS           a folder of wheels (e.g. diffusers) installed to a temp dir first (default: .whl)
#   QVGEN_BENCH_QUICK=1    fewer rows (smoke run)
# Without diffusers the step rows and the diffusers-based GPU tests are skipped, with a message.
# Each part runs under `timeout` and a `--budget-s` of its own, so a slow part cannot eat the rest;
# budgets (s): tests 150, kernels 165, native formats 45, step 1.3B 100, step 14B 135.
# The native-format rows run comfy-kitchen's kernels only when its wheel is in $QVGEN_WHEELS
# (`pip download comfy-kitchen --no-deps --python-version <the GPU machine's> -d .whl`); else our PyTorch compute.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1

# import paths: the checkout itself, `kernels/` under its installed name, carried packages
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/qvgen_kernels"
WHEELS=${QVGEN_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SHIM/site" "$WHEELS"/*.whl \
        || echo "bench_gpu: could not install the wheels in $WHEELS; going on without them"
fi
export PYTHONPATH="$REPO:$SHIM:$SHIM/site${QVGEN_PYTHONPATH:+:$QVGEN_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p docs/bench
"$PY" - <<'EOF' || { echo "bench_gpu: no CUDA GPU visible to $PY; nothing to do"; exit 1; }
import torch, triton
assert torch.cuda.is_available()
print(f"bench_gpu: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
EOF
HAVE_DIFFUSERS=1
"$PY" -c "import diffusers" 2>/dev/null || {
    HAVE_DIFFUSERS=0
    echo "bench_gpu: diffusers is not importable (set QVGEN_PYTHONPATH or QVGEN_WHEELS): step rows and" \
         "tests/test_gpu.py are skipped"
}
STATUS=0
part() {  # part NAME SECONDS CMD...: run with a time limit, note failures, keep going
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
    [ $rc -eq 0 ] || STATUS=1
}

TESTS=(tests/test_kernels_triton.py)
[ $HAVE_DIFFUSERS = 1 ] && TESTS+=(tests/test_gpu.py)
part "pytest -m gpu" 150 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider "${TESTS[@]}"

TOKENS=32760,512
[ "${QVGEN_BENCH_QUICK:-0}" = 1 ] && TOKENS=8192
part "bench kernels --device-time" 165 "$PY" -m qvgen.bench kernels --device-time --models 1.3b,14b \
    --tokens "$TOKENS" --budget-s 120

# issue #15 item 6: each ComfyUI-native format through comfy-kitchen's kernels (needs its wheel in $WHEELS)
GPU_SLUG=$("$PY" -c "from qvgen.bench.kernel_records import gpu_slug; import torch; print(gpu_slug(torch.device('cuda')))")
part "bench native" 45 "$PY" -m qvgen.bench native --models 1.3b --tokens "${TOKENS%%,*}" \
    --json "docs/bench/native-$GPU_SLUG.json"

if [ $HAVE_DIFFUSERS = 1 ]; then
    GPU=$("$PY" -c "from qvgen.bench.kernel_records import gpu_slug; import torch; print(gpu_slug(torch.device('cuda')))")
    STEP_JSON=docs/bench/step-$GPU.json
    rm -f "$STEP_JSON"
    if [ "${QVGEN_BENCH_QUICK:-0}" = 1 ]; then
        part "bench step (quick)" 100 "$PY" -m qvgen.bench step --models 1.3b --cases short --reps 1 --out "$STEP_JSON"
    else
        part "bench step 1.3B" 100 "$PY" -m qvgen.bench step --models 1.3b --cases 480p,short,720p --reps 2 \
            --variants bf16,w4a4,w4a4-fp8 --budget-s 60 --out "$STEP_JSON" --append
        part "bench step 14B" 135 "$PY" -m qvgen.bench step --models 14b --cases 720p,480p --reps 1 \
            --budget-s 80 --out "$STEP_JSON" --append
    fi
fi

if [ -n "${OUT:-}" ]; then
    cp docs/bench/*.json "$OUT"/ 2>/dev/null && echo "bench_gpu: copied $(ls docs/bench/*.json | tr '\n' ' ')to \$OUT"
fi
exit $STATUS
