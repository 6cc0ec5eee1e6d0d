#!/usr/bin/env bash
# One GPU check, at most 8 minutes with set-up, on a fresh GPU machine without a package registry:
#   1. set-up: the wheels in .whl/ installed with --target into $GPU_SITE, put first on PYTHONPATH,
#      for the machine's python3 that holds CUDA torch (a venv made from it would not see its torch
#      when that python3 is itself a venv's, as on the lent H200 machines)
#   2. pytest tests/test_gpu.py
#   3. bench_train, Llama-3.2-1B shape, 16K and 64K: prolong vs TRL padding-free, checkpointing on for both
#   4. max_context --check 524288 for the 1B shape (ckpt+offload+tiled-mlp, short-document rows)
#   5. max_context --check 131072 and 262144 for the Llama-3-8B shape (ckpt+offload+tiled-mlp)
# Every JSON (each carries the device line: GPU name, versions, date, command) and the log go to
# benchmarks/results/ (and to $OUT when it is set, for the device runner). Each step runs under
# `timeout`, capped by what is left of the total budget, so a slow step cannot eat the others; a
# step that times out or fails is reported and the next one runs.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run       # CPU: every step end to end on the tiny shape (~1-3 min)
#   bash benchmarks/gpu_check.sh --plan          # print the GPU run's steps (commands, time caps); runs nothing
#   ONLY="bench_1b max_context_1b_512k" bash benchmarks/gpu_check.sh --dry-run   # only these steps
#   bash benchmarks/gpu_check.sh --fetch-wheels  # on a machine WITH a registry: fill .whl/ to carry along
#
# Budget (GPU, seconds): the whole run TOTAL_S=480; per-step caps below. Estimates for one
# H100/H200 from the FLOP formula at ~40% MFU plus ~15 s start-up per process; measure and adjust.
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  --plan) MODE=plan ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --plan | --fetch-wheels]" >&2; exit 2 ;;
esac

# The GPU machine has CUDA torch (and triton) installed; these are the rest, pinned as in
# requirements.txt, with no dependencies resolved (there is no index to resolve them from): dill,
# multiprocess (datasets) and httpx2 (huggingface-hub 2.x) were missing on the lent H200 image.
WHEELS="transformers==5.24.0 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 peft==0.21.2 huggingface-hub==2.4.0
tokenizers==0.23.3 safetensors==0.8.0 liger-kernel==0.8.5 pyyaml==6.0.3 pytest==9.0.3 dill==0.4.1
multiprocess==0.70.19 httpx2==2.16.2"
GPU_PYTHON=${GPU_PYTHON:-python3} GPU_SITE=${GPU_SITE:-/tmp/prolong-gpu-site} WHEELS_DIR=${WHEELS_DIR:-.whl}
if [ "$MODE" = fetch ]; then
  mkdir -p "$WHEELS_DIR"
  # for the GPU machine's Python (3.12 on the lent H200s), not this one's
  # shellcheck disable=SC2086
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS_DIR" $WHEELS
fi

TOTAL_S=${TOTAL_S:-480}
START=$(date +%s)
if [ "$MODE" = dry ]; then
  RESULTS=${RESULTS_DIR:-$(mktemp -d)}
  PY=${PYTHON:-.venv/bin/python}
  # one 8B-shape check instead of two: the loop is the same, and each check is two Python start-ups
  SHAPE_1B=tiny SHAPE_8B=tiny LEN_A=128 LEN_B=256 CHECK_1B=256 CHECK_8B_A=128 CHECK_8B_B= TILE=64
  CPU=--cpu BENCH_STEPS="--warmup 0 --steps 1 --repeats 2"
else  # gpu, plan
  RESULTS=${RESULTS_DIR:-benchmarks/results} PY=$GPU_PYTHON
  SHAPE_1B=llama-3.2-1b SHAPE_8B=llama-3-8b LEN_A=16384 LEN_B=65536 CHECK_1B=524288
  CHECK_8B_A=131072 CHECK_8B_B=262144 TILE=8192 CPU= BENCH_STEPS="--warmup 1 --steps 3 --repeats 2"
fi
[ "$MODE" = plan ] || mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%d-%H%M%S)
TAG=$([ "$MODE" = dry ] && echo dry || echo gpu)
LOG="$RESULTS/$TAG-check-$STAMP.log"
if [ "$MODE" = plan ]; then LOG=/dev/null; fi  # --plan writes nothing
FAILED=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG" >&2; }

# step NAME CAP_SECONDS COMMAND...: run under `timeout`, capped by the budget that is left
step() {
  local name=$1 cap=$2; shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac  # ONLY: a subset of the steps
  if [ "$MODE" = plan ]; then log "PLAN $name (cap ${cap}s): $*"; return; fi
  local left=$((TOTAL_S - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    log "SKIPPED $name: the ${TOTAL_S}s budget is spent"; FAILED=1; return
  fi
  log "START $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then log "OK $name"; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "TIMEOUT $name after ${limit}s"; FAILED=1; else log "FAILED $name (exit $rc)"; FAILED=1; fi
}

# 1. set-up: no registry, so only wheels already here (.whl/) and what the machine has
setup() {
  if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    "$GPU_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$GPU_SITE" "$WHEELS_DIR"/*.whl || return 1
  fi
  "$GPU_PYTHON" -c "import torch, transformers, trl, accelerate, datasets; assert torch.cuda.is_available(), 'no CUDA'"
}
[ "$MODE" = dry ] || export PYTHONPATH="$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}" GPU_PYTHON GPU_SITE WHEELS_DIR
if [ "$MODE" != dry ]; then
  step setup 120 bash -c "$(declare -f setup); setup"  # `timeout` runs programs, not shell functions
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
[ "$MODE" = plan ] || {
  echo "mode: $MODE   date: $(date -u -Iseconds)   commit: $(git rev-parse --short HEAD 2>/dev/null || echo -)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| trl', trl.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>&1
} | tee -a "$LOG" > "$RESULTS/$TAG-device-$STAMP.txt"

# 2. the GPU tests (they skip on CPU)
step test_gpu 100 "$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider

# 3. throughput, ours vs TRL padding-free, checkpointing on for both (same options for both)
# shellcheck disable=SC2086
step bench_1b 200 "$PY" benchmarks/bench_train.py $CPU --shape "$SHAPE_1B" --lengths "$LEN_A" "$LEN_B" \
  --methods prolong trl-padding-free --activation-checkpointing $BENCH_STEPS \
  --json "$RESULTS/$TAG-1b-bench-$STAMP.json"

# 4. 512K for the 1B shape on one GPU (short-document rows: varlen memory does not depend on them)
# shellcheck disable=SC2086
step max_context_1b_512k 90 "$PY" benchmarks/max_context.py $CPU --shape "$SHAPE_1B" --check "$CHECK_1B" \
  --long-share 0 --tiled-mlp-tokens "$TILE" --options ckpt+offload+tiled-mlp --probe-timeout 85 \
  --json "$RESULTS/$TAG-1b-check512k-$STAMP.json"

# 5. the 8B shape: 128K and 256K on one GPU (AdamW state included)
for length in $CHECK_8B_A $CHECK_8B_B; do
  # shellcheck disable=SC2086
  step "max_context_8b_$length" 150 "$PY" benchmarks/max_context.py $CPU --shape "$SHAPE_8B" --check "$length" \
    --long-share 0 --tiled-mlp-tokens "$TILE" --options ckpt+offload+tiled-mlp --probe-timeout 145 \
    --json "$RESULTS/$TAG-8b-check$length-$STAMP.json"
done

[ "$MODE" = plan ] && exit 0
log "done in $(($(date +%s) - START))s; results in $RESULTS"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$RESULTS"/$TAG-*"$STAMP"* "$OUT"/ 2>/dev/null; fi
exit $FAILED
