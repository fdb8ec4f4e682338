#!/usr/bin/env bash
# ONE script for the GPU machine (H100/H200, CUDA 13, Python 3.12, torch 2.11+cu130, numpy 2.5 in the image):
# Jittor pipeline vs the PyTorch reference of the same full-size random-weight networks, same card, same run.
#
#   bench/gpu/run.sh                 on the GPU machine; needs .whl/ from bench/gpu/prepare_wheels.sh
#                                    (device tool: carry [".whl"], timeout_s 590)
#   bench/gpu/run.sh --dry-run-cpu   HERE: the same Python with the tiny configs on the CPU (no wheels)
#
# Steps (each prints its elapsed time; a time budget keeps the whole run inside GD_BENCH_TOTAL_S, default
# 540 s, so it ends inside the device tool's 10-minute command limit):
#  1. install the carried wheels: Jittor + numpy 1.26 + astunparse into /tmp/gd-jt (the Jittor process),
#     diffusers + importlib_metadata into /tmp/gd-site (the torch process keeps the image's numpy 2);
#     apply the CUDA 13 patches to that Jittor (daemon.jittor_patches, what `geometryd doctor --fix` runs);
#  2. torch_side.py prepare: full-size random networks (official configs) in the official layout + attention
#     cases (fp16 q/k/v, float32 SDPA reference);
#  3. jittor_side.py: import/compile time, fused attention parity (<= 2e-3) and timings, per-stage times,
#     end-to-end windows (diff, determ) at 384x640 then 576x1024; hard-stopped at 75 % of the budget
#     (it saves its JSON after every item, so a stop keeps what was measured);
#  4. torch_side.py bench: the same measurements for the PyTorch reference;
#  5. merge.py: one table on stdout, JSON to $OUT/gpu_bench.json (device tool) or bench/results/gpu_*.json.
# Overrides for a follow-up session (e.g. when the first one ran out of budget): GD_BENCH_SIZES=576x1024,
# GD_BENCH_VARIANTS=determ, GD_BENCH_FRAMES=25, GD_BENCH_STEPS=5, GD_BENCH_TOTAL_S=540.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
START=$(date +%s)
TOTAL=${GD_BENCH_TOTAL_S:-540}
WORK=${GD_BENCH_WORK:-/tmp/gd-gpu-bench}
MODEL="$WORK/model"
mkdir -p "$WORK"
LOG="$WORK/run.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

say() { echo "== [$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
left() { echo $(( START + TOTAL - $(date +%s) )); }

if [ "${1:-}" = "--dry-run-cpu" ]; then
  export GD_BENCH_DRY_RUN_CPU=1
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  [ -x "$PY" ] || PY=python3
  TORCH_PP="$ROOT"
  JT_PP="$ROOT"
  OUTFILE="$ROOT/bench/results/gpu_dryrun_cpu.json"
  say "dry run on CPU with tiny configs ($PY)"
else
  PY=python3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG" \
    || { echo "run.sh: no GPU (use --dry-run-cpu here)" >&2; exit 2; }
  ls .whl/jittor-*.whl .whl/numpy-1.26.4-*.whl .whl/diffusers-*.whl >/dev/null \
    || { echo "run.sh: .whl/ incomplete: run bench/gpu/prepare_wheels.sh and carry .whl" >&2; exit 2; }
  say "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gd-site \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>&1 | tail -3 | tee -a "$LOG"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gd-jt \
    .whl/jittor-*.whl .whl/numpy-1.26.4-*.whl .whl/astunparse-*.whl 2>&1 | tail -3 | tee -a "$LOG"
  TORCH_PP="/tmp/gd-site:$ROOT"
  JT_PP="/tmp/gd-jt:$ROOT"
  say "CUDA 13 patches (daemon.jittor_patches)"
  PYTHONPATH="$JT_PP" $PY -c "
from daemon import jittor_patches as p
for s in p.apply(): print(f'  {s.name}: {s.state} ({s.detail})')
" 2>&1 | tee -a "$LOG"
  if [ -n "${OUT:-}" ]; then
    OUTFILE="$OUT/gpu_bench.json"
  else
    slug=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr 'A-Z' 'a-z')
    OUTFILE="$ROOT/bench/results/gpu_${slug}.json"
  fi
fi

say "prepare: random-weight networks + attention cases -> $WORK"
GD_BENCH_DEADLINE=$(( START + TOTAL )) PYTHONPATH="$TORCH_PP" \
  $PY bench/gpu/torch_side.py prepare --model-dir "$MODEL" --work "$WORK" 2>&1 | tee -a "$LOG"

JT_STOP=$(( START + TOTAL * 75 / 100 ))
say "jittor side (hard stop in $(( JT_STOP - $(date +%s) )) s)"
GD_BENCH_DEADLINE=$JT_STOP PYTHONPATH="$JT_PP" \
  timeout -k 5 $(( JT_STOP - $(date +%s) > 30 ? JT_STOP - $(date +%s) : 30 )) \
  $PY bench/gpu/jittor_side.py --model-dir "$MODEL" --work "$WORK" --out "$WORK/jittor.json" 2>&1 | tee -a "$LOG"

say "torch side ($(left) s left)"
GD_BENCH_DEADLINE=$(( START + TOTAL - 15 )) PYTHONPATH="$TORCH_PP" \
  timeout -k 5 $(( $(left) > 30 ? $(left) : 30 )) \
  $PY bench/gpu/torch_side.py bench --model-dir "$MODEL" --work "$WORK" --out "$WORK/torch.json" 2>&1 | tee -a "$LOG"

say "merge"
PYTHONPATH="$TORCH_PP" $PY bench/gpu/merge.py --work "$WORK" --out "$OUTFILE" --started "$START" 2>&1 | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$LOG" "$OUT/run.log"
fi
say "done"
