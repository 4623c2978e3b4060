#!/usr/bin/env bash
# rlhfkit vs TRL on one GPU (bf16, a ~0.4B Llama built from a config, sequences of 512 tokens): DPO, reward model,
# SFT and online RL (rlhfkit ppo with GRPO advantages vs TRL's GRPOTrainer, 64 completions of 128 + 128 tokens).
# Run from the repository root:   bash benchmarks/gpu.sh
# Installs nothing from the network: trl, datasets, dill and multiprocess come from the wheels in .whl/.
# Bounded: everything ends within TOTAL_S seconds (default 340); results so far are kept if it is cut short.
# Writes benchmarks/results/latest-cuda.{json,txt,meta.json}, and copies them to $OUT/ when OUT is set.
# CPU rehearsal of the same flow: DEVICE=cpu SIZE=tiny bash benchmarks/gpu.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
set -u
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-0.4b}
TOTAL_S=${TOTAL_S:-340}
WORKLOADS=${WORKLOADS:-dpo,grpo,rm,sft}
RESULT=benchmarks/results/latest-$DEVICE.json
# models, data and per-repetition run directories: in memory when /dev/shm has room (saving a 1.5 GB model per
# repetition is wall time inside the bound), else /tmp
WORK=/tmp/rlhfkit-bench-$SIZE-$DEVICE
if [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')" -gt 12000000 ] 2>/dev/null; then
  WORK=/dev/shm/rlhfkit-bench-$SIZE-$DEVICE
fi
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
# the driver keeps its own per-workload budgets (TOTAL_S minus start-up and preparation, shared out by weight);
# `timeout` is the hard stop behind them
LEFT=$(( TOTAL_S - SECONDS ))  # SECONDS: since this script started, the wheel install included
timeout --signal=TERM --kill-after=10 "$LEFT" \
  python3 benchmarks/vs_trl.py --device "$DEVICE" --model-size "$SIZE" --workloads "$WORKLOADS" --reps 3 --persistent \
    --total-budget-s $(( LEFT - 20 )) --workdir "$WORK" --out "$RESULT" "$@"
STATUS=$?
echo "vs_trl.py exit status $STATUS; script ran $SECONDS s"
if [ -f "${RESULT%.json}.txt" ]; then cat "${RESULT%.json}.txt"; fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp -f "$RESULT" "${RESULT%.json}.txt" "${RESULT%.json}.meta.json" "$OUT"/ 2>/dev/null || true
  cp -f "$WORK"/log-*.txt "$OUT"/ 2>/dev/null || true
fi
exit $STATUS
