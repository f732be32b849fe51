#!/usr/bin/env bash
# One prepared GPU session for the Omniglot Table 1 runs (issue 3), sized for a 15-minute device
# budget: the four Omniglot cells (5/20-way, 1/5-shot, second order, the paper presets) train at
# once on one GPU, compiled with CUDA graphs, each stopped by a wall-clock limit (checkpoint kept,
# resumable), then each is evaluated on 600 test tasks. A GPU-utilisation trace is kept.
#
# Everything comes back as $OUT/runs.tgz (run directories without tb/, plus each run's log),
# $OUT/log.txt and $OUT/dmon.txt. On this workplace's device tool: put the archives (and, to skip
# preprocessing there, the cache) in the git-ignored .data folder first
#   mkdir -p .data/omniglot .data/cache && cp ../shared/data/omniglot/*.zip .data/omniglot/
#   cp ~/.cache/mamlkit/omniglot_28_nearest_*.pt .data/cache/
# then run with carry [".data"]:  bash benchmarks/gpu_omniglot.sh
#
# TRAIN_S (default 390) is each run's training time; the whole script ends within ~TRAIN_S + 150 s.
# RESUME=1 continues the runs kept in results/<preset> (copied to $RUNS first) instead of starting
# new ones (on the GPU, compiled, whatever device they were saved with), e.g. to finish the
# shortened 5-way 5-shot and 20-way runs (PACK_TB=1 brings their TensorBoard events back too):
#   RESUME=1 CELLS="omniglot-5way-5shot omniglot-20way-1shot omniglot-20way-5shot" TRAIN_S=400 \
#       bash benchmarks/gpu_omniglot.sh
# SET adds `--set` overrides to every new cell and MAMLPP_SET to the *-mamlpp cells, e.g. the 20-way
# MAML / MAML++ / ANIL comparison (issue 33), the same iterations each, MAML++'s annealing scaled to 8%:
#   CELLS="omniglot-20way-1shot omniglot-20way-1shot-mamlpp omniglot-20way-1shot-anil" \
#   SET="train.iterations=3000 train.validate_every=300" MAMLPP_SET="maml.msl_iterations=240" \
#       bash benchmarks/gpu_omniglot.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
RUNS=${RUNS:-/tmp/mamlkit-runs}
TRAIN_S=${TRAIN_S:-390}
CELLS=${CELLS:-omniglot-5way-1shot omniglot-5way-5shot omniglot-20way-1shot omniglot-20way-5shot}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=src PYTHONUNBUFFERED=1 MAMLKIT_OMNIGLOT_DIR=${MAMLKIT_OMNIGLOT_DIR:-.data/omniglot}
export MAMLKIT_CACHE_DIR=${MAMLKIT_CACHE_DIR:-.data/cache}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$OUT/log.txt"; }

pack() {
    log "packing"
    local skip=(--exclude=tb)
    [ "${PACK_TB:-0}" = 1 ] && skip=()
    tar czf "$OUT/.runs$BASHPID.tgz" "${skip[@]}" -C "$RUNS" . 2>>"$OUT/log.txt" && mv "$OUT/.runs$BASHPID.tgz" "$OUT/runs.tgz"
}
trap pack EXIT
trap 'exit 143' TERM INT  # so that a stop from outside still packs what is there
(sleep $((TRAIN_S + 30)); while true; do pack; sleep 30; done) &  # partial results, in case of a hard kill
PACKER=$!

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/log.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee -a "$OUT/log.txt"
(timeout $((TRAIN_S + 150)) nvidia-smi dmon -s um -d 5 >"$OUT/dmon.txt" 2>&1 &)

cell() {  # train one preset under the time limit, falling back to compile without graphs, then evaluate
    local name=$1 dir=$RUNS/$1 rc kv
    local gpu=(--set train.device="$DEVICE" --set train.threads=0 --set maml.compile=true)
    local how=("${gpu[@]}" --set maml.cuda_graphs=true) new=("${gpu[@]}")
    for kv in ${SET:-}; do new+=(--set "$kv"); done  # SET and MAMLPP_SET apply to new runs only
    if [[ $name == *-mamlpp ]]; then for kv in ${MAMLPP_SET:-}; do new+=(--set "$kv"); done; fi
    if [ "${RESUME:-0}" = 1 ] && [ -f "results/$name/checkpoint.pt" ]; then
        # a run continued on the CPU was saved with train.device=cpu: the gpu settings move it back
        rm -rf "$dir" && cp -r "results/$name" "$dir" && how=(--resume "${how[@]}") new=(--resume "${gpu[@]}")
    else
        how=("${new[@]}" --set maml.cuda_graphs=true)
    fi
    # INT stops a run after its current iteration; a run still compiling its first one (a 32-task
    # loop under CUDA graphs had not compiled after 8 minutes) does not get there: KILL 30 s later
    timeout -k 30 -s INT $((TRAIN_S + 90)) $PY -m mamlkit.cli train "$name" --out "$dir" --quiet "${how[@]}" \
        --set train.time_limit="$TRAIN_S" >>"$RUNS/$name.log" 2>&1
    rc=$?
    log "$name: train exit $rc"
    local left=$((T0 + TRAIN_S + 20 - $(date +%s)))
    if [ $rc -ne 0 ] && [ $rc -ne 130 ] && [ $left -gt 60 ]; then
        log "$name: retrying without CUDA graphs for ${left}s"
        if [ -f "$dir/checkpoint.pt" ] && [[ ${new[0]} != --resume ]]; then new=(--resume "${gpu[@]}"); fi
        [ -f "$dir/checkpoint.pt" ] || rm -rf "$dir"
        timeout -k 30 -s INT $((left + 60)) $PY -m mamlkit.cli train "$name" --out "$dir" --quiet "${new[@]}" \
            --set maml.cuda_graphs=false --set train.time_limit="$left" >>"$RUNS/$name.log" 2>&1
        log "$name: retry exit $?"
    fi
    tail -n 4 "$dir/metrics.csv" >>"$OUT/log.txt" 2>/dev/null
    [ "${EVAL:-1}" = 0 ] && return  # training only, e.g. to spend a short device budget on iterations
    local t=$((T0 + TRAIN_S + 150 - $(date +%s)))
    if [ $t -gt 0 ]; then
        timeout -k 10 $t $PY -m mamlkit.cli eval "$dir" >>"$RUNS/$name.log" 2>&1
        log "$name: eval exit $?"
    else
        log "$name: no time left to evaluate: mamlkit eval $dir"
    fi
    cat "$dir/eval.md" >>"$OUT/log.txt" 2>/dev/null
}

PIDS=()
for c in $CELLS; do
    cell "$c" &
    PIDS+=($!)
done
wait "${PIDS[@]}"
kill $PACKER 2>/dev/null
log "done"
