#!/usr/bin/env bash
# One prepared run on a lent GPU machine: build, test, benchmark; everything lands in OUT_DIR.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Stages (each under `timeout`, the whole script under 8 minutes; a failing stage is logged and the
# next one still runs):
#   0. optional wheels: .whl/*.whl (bitsandbytes, torchao) -> /tmp/site, put on PYTHONPATH
#   1. build the C++/CUDA extension in place (pip install --no-build-isolation --no-deps -e .)
#   2. nvidia-smi, python -m fastllm.env, library versions
#   3. GPU tests: pytest tests (FASTLLM_AUTOTUNE=0: first tile config only, no autotuning per odd test shape)
#   4. copy bandwidth (1 GiB device-to-device copy), the reference for the %-of-bandwidth figures
#   5. benchmarks --quick  -> OUT_DIR/results-quick   (always finishes: the headline numbers)
#   6. benchmarks (full)   -> OUT_DIR/results         (what time remains; on the time limit the runner
#                                                      writes what it measured, the rest marked not run)
# Logs: OUT_DIR/<stage>.log; OUT_DIR/summary.txt lists each stage's exit status and seconds.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
TOTAL=455  # seconds for the whole script (8 minutes minus the kill margin)
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, log to OUT/NAME.log, record the result
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: skipped (out of time)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    local t0=$SECONDS
    echo "== $name (limit ${limit}s) =="
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.log"
}

: >"$OUT/summary.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage build 200 python3 -m pip install --no-build-isolation --no-deps -e .
stage env 30 bash -c 'nvidia-smi; python3 -m fastllm.env; python3 -c "
import importlib.metadata as m
for p in (\"torch\", \"triton\", \"transformers\", \"peft\", \"bitsandbytes\", \"torchao\", \"flash-attn\"):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, \"not installed\")"'
cat "$OUT/env.log"
# -P keeps the repo root off sys.path (kernels/ must not answer imports of the PyPI package "kernels").
stage tests 120 env FASTLLM_AUTOTUNE=0 python3 -P -m pytest tests -q -p no:cacheprovider --maxfail=20
stage bandwidth 30 python3 -c "
import torch
from benchmarks.environment import copy_bandwidth_gbps
print(f'{torch.cuda.get_device_name()}: device-to-device copy {copy_bandwidth_gbps(torch.device(\"cuda\")):.0f} GB/s')"
# Suites whose numbers matter most first: a time limit cuts the tail, and FlexAttention compiles are slow.
ORDER=(qlora nf4_matmul quantize attention)
stage bench-quick 170 python3 -m benchmarks --quick --device cuda --suite "${ORDER[@]}" --out "$OUT/results-quick"
stage bench-full 600 python3 -m benchmarks --device cuda --suite "${ORDER[@]}" --out "$OUT/results"

echo "== summary (${SECONDS}s) =="
cat "$OUT/summary.txt"
[[ -f "$OUT/results-quick/results.md" ]] && cat "$OUT/results-quick/results.md"
exit 0
