#!/usr/bin/env bash
# One GPU check in ONE device call of at most 9 minutes (540 s) with set-up, on a fresh GPU machine
# without a package registry (the lent machines: python3 is itself a venv's, Python 3.12, CUDA torch):
#   1. setup: the wheels in .whl/ installed with --target into $GPU_SITE, first on PYTHONPATH of the
#      machine's python3 that holds CUDA torch, then every module the run imports is imported
#   2. device: the device line (GPU, versions, date, commit)
#   3. pytest tests/test_gpu.py, with PYTEST_DISABLE_PLUGIN_AUTOLOAD (the image's pytest plugins are not ours)
#   4. bench_train, Llama-3.2-1B shape, 16K and 64K: prolong vs TRL padding-free, checkpointing on for both
#   5. max_context --check 524288 for the 1B shape (ckpt+offload+tiled-mlp, short-document rows)
#   6. max_context --check 131072 and 262144 for the Llama-3-8B LAYER shape, 4 of its 32 layers
# Precision: every step trains as `bf16: true` does: fp32 parameters and AdamW state, bf16 autocast.
# The whole 8B model cannot be measured so on these machines: fp32 weights + gradients + AdamW are
# 16 bytes x 8B = 128 GB, over one GPU's memory and, offloaded (FSDP2 CPU offload), over the machine's
# 128 GiB of host memory. Step 6 measures what one GPU holds besides that state: the 8B layer shape's
# activation peak (hidden 4096, MLP 14336, 32/8 heads, vocabulary 128K, with 4 layers' fp32 state);
# a full run adds its share of the sharded state (16 bytes x 8B / number of GPUs).
# Every JSON (each carries the device line) and the log go to benchmarks/results/ (and to $OUT when set,
# for the device runner). Each step runs under `timeout` with its cap; the caps add up to less than
# TOTAL_S (`--plan` prints the sum), so no step eats another's time. The benchmarks write their JSON
# after every repeat / probe, and a probe's own timeout is PROBE_MARGIN_S under its step's cap, so a
# step that runs out of time keeps what it measured. A step that fails is reported; the next one runs.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine: one call with timeout_s >= 540
#   bash benchmarks/gpu_check.sh --dry-run       # CPU: every step end to end on the tiny shape (~2-4 min)
#   bash benchmarks/gpu_check.sh --plan          # print the GPU run's steps, caps and their sum; runs nothing
#   ONLY="bench_1b max_context_1b_512k" bash benchmarks/gpu_check.sh --dry-run   # only these steps
#   bash benchmarks/gpu_check.sh --fetch-wheels  # on a machine WITH a registry: fill .whl/ to carry along
set -u -o pipefail
cd "$(dirname "$0")/.."

SELF=benchmarks/gpu_check.sh
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  --plan) MODE=plan ;;
  --setup | --device-line) MODE=${1#--} ;;  # steps 1 and 2, run by the script itself
  "") ;;
  *) echo "usage: $0 [--dry-run | --plan | --fetch-wheels]" >&2; exit 2 ;;
esac

# The GPU machine has CUDA torch, triton and numpy; these are the rest, pinned as in requirements.txt,
# with no dependencies resolved there (no index). Missing from the lent image (device KINDS.md): trl,
# datasets' dill and multiprocess, liger-kernel, and huggingface-hub 2.x's httpx2, httpcore2, truststore.
# tests/test_gpu_install.py checks this set against the image's package list and imports it.
WHEELS="transformers==5.24.0 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 peft==0.21.2 huggingface-hub==2.4.0
tokenizers==0.23.3 safetensors==0.8.0 liger-kernel==0.8.5 pyyaml==6.0.3 pytest==9.0.3 dill==0.4.1
multiprocess==0.70.19 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5"
GPU_PYTHON=${GPU_PYTHON:-python3} GPU_SITE=${GPU_SITE:-/tmp/prolong-gpu-site} WHEELS_DIR=${WHEELS_DIR:-.whl}
if [ "$MODE" = fetch ]; then
  mkdir -p "$WHEELS_DIR"
  platforms=""  # pip matches manylinux_2_N exactly: every N a glibc-2.39 machine (Ubuntu 24.04) runs
  for n in $(seq 17 39); do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
  # for the GPU machine's Python (3.12 on the lent machines), not this one's
  # shellcheck disable=SC2086
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --implementation cp $platforms --platform manylinux2014_x86_64 -d "$WHEELS_DIR" $WHEELS
fi

# Every module the steps import, lazy ones included (liger and TRL's trainer load inside functions).
IMPORT_CHECK='
import importlib, pkgutil, sys
sys.path[:0] = ["benchmarks", "tests"]
import prolong
names = ("torch transformers trl accelerate datasets peft huggingface_hub tokenizers safetensors yaml numpy "
         "pytest liger_kernel.transformers bench_train max_context conftest helpers").split()
names += [m.name for m in pkgutil.walk_packages(prolong.__path__, "prolong.")
          if not m.name.startswith("prolong.demo") and not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer
from trl import SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset
from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
import torch
print(f"imported {len(names)} modules; torch {torch.__version__}")
assert torch.cuda.is_available(), "no CUDA"
'
if [ "$MODE" = setup ]; then  # no registry: only the wheels already here (.whl/) and what the machine has
  if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    "$GPU_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$GPU_SITE" "$WHEELS_DIR"/*.whl || exit 1
  fi
  exec "$GPU_PYTHON" -c "$IMPORT_CHECK"
fi
if [ "$MODE" = device-line ]; then  # --device-line LABEL PYTHON
  echo "mode: $2   date: $(date -u -Iseconds)   commit: $(git rev-parse --short HEAD 2>/dev/null || echo -)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  exec "$3" -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| trl', trl.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>&1
fi

START=$(date +%s)
PROBE_MARGIN_S=20  # a probe's timeout under its step's cap: the parent's start-up and its JSON
KILL_S=5           # `timeout --kill-after`: what a step that ignores SIGTERM adds to its cap
if [ "$MODE" = dry ]; then
  RESULTS=${RESULTS_DIR:-$(mktemp -d)}
  PY=${PYTHON:-.venv/bin/python}
  # one 8B-shape check instead of two: the loop is the same, and each check is two Python start-ups
  SHAPE_1B=tiny SHAPE_8B=tiny LAYERS_8B=1 LEN_A=128 LEN_B=256 CHECK_1B=256 CHECK_8B_A=128 CHECK_8B_B= TILE=64
  CPU=--cpu BENCH_STEPS="--warmup 0 --steps 1 --repeats 2"
  SCALE=3  # CPU: Python start-ups on a small, shared machine take longer than the GPU steps
else  # gpu, plan
  RESULTS=${RESULTS_DIR:-benchmarks/results} PY=$GPU_PYTHON
  SHAPE_1B=llama-3.2-1b SHAPE_8B=llama-3-8b LAYERS_8B=4 LEN_A=16384 LEN_B=65536 CHECK_1B=524288
  CHECK_8B_A=131072 CHECK_8B_B=262144 TILE=8192 CPU= BENCH_STEPS="--warmup 1 --steps 2 --repeats 2"
  SCALE=1
fi
SCALE=${CAP_SCALE:-$SCALE}  # every cap times this (tests on a loaded CPU machine)
TOTAL_S=${TOTAL_S:-$((480 * SCALE))}
[ "$MODE" = plan ] || mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%d-%H%M%S)
TAG=$([ "$MODE" = dry ] && echo dry || echo gpu)
LOG="$RESULTS/$TAG-check-$STAMP.log"
if [ "$MODE" = plan ]; then LOG=/dev/null; fi  # --plan writes nothing
FAILED=0 PLANNED=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG" >&2; }

# step NAME CAP_SECONDS COMMAND...: run under `timeout`, capped by the budget that is left
step() {
  local name=$1 cap=$2; shift 2
  if [ "$name" != device ]; then  # ONLY: a subset of the steps (the device line always)
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
  fi
  PLANNED=$((PLANNED + cap + KILL_S))
  if [ "$MODE" = plan ]; then log "PLAN $name (cap ${cap}s): $*"; return; fi
  local left=$((TOTAL_S - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    log "SKIPPED $name: the ${TOTAL_S}s budget is spent"; FAILED=1; return
  fi
  log "START $name (timeout ${limit}s): $*"
  timeout --kill-after=$KILL_S "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then log "OK $name"; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "TIMEOUT $name after ${limit}s"; FAILED=1; else log "FAILED $name (exit $rc)"; FAILED=1; fi
}

# 1. set-up: the carried wheels, then every import (the GPU machine only)
[ "$MODE" = dry ] || export PYTHONPATH="$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}" GPU_PYTHON GPU_SITE WHEELS_DIR
[ "$MODE" = dry ] || step setup $((40 * SCALE)) bash "$SELF" --setup
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

# 2. the device line, in the log and in its own file
step device $((15 * SCALE)) bash -c "bash $SELF --device-line $MODE '$PY' | tee '$RESULTS/$TAG-device-$STAMP.txt'"

# 3. the GPU tests (they skip on CPU)
step test_gpu $((60 * SCALE)) env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  "$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider

# 4. throughput, ours vs TRL padding-free, checkpointing on for both (same options for both)
# shellcheck disable=SC2086
step bench_1b $((120 * SCALE)) "$PY" benchmarks/bench_train.py $CPU --shape "$SHAPE_1B" --lengths "$LEN_A" "$LEN_B" \
  --methods prolong trl-padding-free --activation-checkpointing $BENCH_STEPS \
  --json "$RESULTS/$TAG-1b-bench-$STAMP.json"

# 5. 512K for the 1B shape on one GPU (short-document rows: varlen memory does not depend on them)
cap=$((70 * SCALE))
# shellcheck disable=SC2086
step max_context_1b_512k $cap "$PY" benchmarks/max_context.py $CPU --shape "$SHAPE_1B" --check "$CHECK_1B" \
  --long-share 0 --tiled-mlp-tokens "$TILE" --options ckpt+offload+tiled-mlp --probe-timeout $((cap - PROBE_MARGIN_S)) \
  --json "$RESULTS/$TAG-1b-check512k-$STAMP.json"

# 6. the 8B layer shape (4 layers, see the header): 128K and 256K on one GPU, AdamW state included
cap=$((55 * SCALE))
for length in $CHECK_8B_A $CHECK_8B_B; do
  # shellcheck disable=SC2086
  step "max_context_8b_$length" $cap "$PY" benchmarks/max_context.py $CPU --shape "$SHAPE_8B" --layers "$LAYERS_8B" \
    --check "$length" --long-share 0 --tiled-mlp-tokens "$TILE" --options ckpt+offload+tiled-mlp \
    --probe-timeout $((cap - PROBE_MARGIN_S)) --json "$RESULTS/$TAG-8b-check$length-$STAMP.json"
done

if [ "$MODE" = plan ]; then
  log "PLAN total: ${PLANNED}s of TOTAL_S=${TOTAL_S}s (caps + ${KILL_S}s kill grace per step)," \
    "margin $((TOTAL_S - PLANNED))s"
  exit 0
fi
log "done in $(($(date +%s) - START))s; results in $RESULTS"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$RESULTS"/$TAG-*"$STAMP"* "$OUT"/ 2>/dev/null; fi
exit $FAILED
