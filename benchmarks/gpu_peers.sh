#!/usr/bin/env bash
# One prepared GPU session for the speed and memory tables of issue 5 (about 8 minutes on an H100 or
# H200): mamlkit's strategies beside learn2learn, higher, torchopt and a plain loop on the four
# workloads of benchmarks/peers_speed.py, then peak memory against inner steps with and without
# checkpoint_inner. Each table goes to $OUT (BENCHMARKS-gpu.md collects them), with the log.
#
# The GPU machine has no network, so the peers travel in the git-ignored .peers folder. Here, once:
#   mkdir -p .peers/whl && python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .peers/whl optree torchopt==0.7.3 higher==0.2.1
#   python -m pip download --no-deps -d .peers/whl graphviz
#   cp -r .venv/lib/python3.11/site-packages/learn2learn .peers/   # after benchmarks/install_peers.sh;
#   find .peers/learn2learn -name '*.so' -delete                   # its algorithms are pure Python
# then run with carry [".peers"]:  bash benchmarks/gpu_peers.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .peers/whl ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/peers .peers/whl/*.whl 2>&1 | tail -2
    cp -r .peers/learn2learn /tmp/peers/ 2>/dev/null
fi
export PYTHONPATH=src:/tmp/peers PYTHONUNBUFFERED=1
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/log.txt"

for w in omniglot-5way-1shot sinusoid omniglot-20way-1shot miniimagenet-5way-1shot; do
    log "peers: $w"
    timeout 150 $PY benchmarks/peers_speed.py --workload "$w" --device cuda --windows 3 --window-seconds 1 \
        --write "$OUT/BENCHMARKS-gpu.md" >>"$OUT/log.txt" 2>&1 || log "$w: exit $?"
done
log "memory"
timeout 120 $PY benchmarks/inner_memory.py --device cuda --steps 1,5,10,25,50 --meta-batch 16 --n-way 20 \
    --k-shot 5 --write "$OUT/BENCHMARKS-gpu.md" >>"$OUT/log.txt" 2>&1 || log "memory: exit $?"
log "done"
