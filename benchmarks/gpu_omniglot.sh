#!/usr/bin/env bash
# One prepared GPU session for the owed Omniglot figures (issues 3 and 5), sized for a 15-minute
# device budget: a speed table of the Omniglot presets per strategy (compiled included), then a full
# 60,000-iteration Omniglot 5-way 1-shot run with its test evaluation. Everything it writes goes to
# $OUT (or ./gpu-out), small enough to bring back (8 files: log.txt, BENCHMARKS-gpu.md, and the run
# directory's config, metrics, eval.json, eval.md, checkpoint.pt, best.pt).
#
# On this workplace's device tool: copy the archives into the git-ignored .data/omniglot first
#   mkdir -p .data/omniglot && cp ../shared/data/omniglot/*.zip .data/omniglot/
# then run with carry [".data"]:  bash benchmarks/gpu_omniglot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 MAMLKIT_OMNIGLOT_DIR=${MAMLKIT_OMNIGLOT_DIR:-.data/omniglot}
export MAMLKIT_CACHE_DIR=${MAMLKIT_CACHE_DIR:-/tmp/mamlkit-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/log.txt"

timeout 240 python benchmarks/fewshot_speed.py --device cuda --compile --windows 3 --per-window 20 \
    --write "$OUT/BENCHMARKS-gpu.md" 2>&1 | tee -a "$OUT/log.txt" || echo "speed table cut short"

run=$OUT/omniglot-5way-1shot
timeout 480 python -m mamlkit.cli train omniglot-5way-1shot --out "$run" --quiet \
    --set train.device=cuda --set maml.compile=true 2>&1 | tee -a "$OUT/log.txt" || echo "training cut short"
python -m mamlkit.cli eval "$run" 2>&1 | tee -a "$OUT/log.txt"
rm -rf "$run/tb"
ls -la "$run"
