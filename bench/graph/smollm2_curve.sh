#!/usr/bin/env bash
# The runnable ACG of SmolLM2-135M-Instruct on real English text: skip transcoders for the first
# LAYERS layers, the global graph over them, and its faithfulness curve on held-out files.
#
#   bash bench/graph/smollm2_curve.sh [WORK_DIR]          (default /tmp/acg_smollm2)
#
# Corpus: the reStructuredText sources of Debian's python3-doc (as bench/dictionaries), every
# 10th file held out. Steps (each skipped when its output exists, so a rerun resumes):
#   1. train LAYERS skip transcoders from one model forward (TopK k=32, width WIDTH, TOKENS
#      tokens; checkpoints, --resume);
#   2. acg build from CONTEXTS training contexts (no QK pairs: level 3 of a rotary model costs
#      about 9 s a context per 6 layers in ACGModel; its 6-layer curve is in docs/benchmarks.md);
#   3. acg faithfulness on 32 held-out contexts.
# With SPLICE set (e.g. SPLICE="6 12 18 24 30"), steps 2-3 are replaced by level 1 alone for the
# first N layers of each value (`acg eval`: those MLPs replaced by their transcoders, no error
# terms; this is what the graph computes with every edge kept), e.g. for all 30 layers where the
# graph's build would take hours on a CPU:
#   LAYERS=30 TOKENS=1500000 BUFFER=16384 SPLICE="30 6 12 18 24" bash bench/graph/smollm2_curve.sh
# With FINETUNE set (a step count), the transcoders are first fine-tuned end to end (`acg finetune`:
# all of them spliced at once, KL to the model on 1,024 training contexts, 8 per step; about 13 s
# a step for 30 layers on 2 cores; resumes) and every later step uses the fine-tuned set
# (reports named level1_finetuned_first$N.json):
#   LAYERS=30 TOKENS=1500000 BUFFER=16384 FINETUNE=300 SPLICE="30 6 12 18 24" bash ...
# Without SPLICE, the same settings build and measure the graph over all the layers; the 30-layer
# graph within one 180-minute session of 2 cores (docs/benchmarks.md, peak RSS 23 GB):
#   LAYERS=30 TOKENS=800000 BUFFER=16384 FINETUNE=100 LR_DECAY=0.5 CONTEXTS=32 MAX_K=128 FIT_K=32 \
#     KS=1,4,16,32,128 TRAIN_FLAGS="--model-dtype bfloat16 --forward compiled" bash ...
# With FANIN=adaptive the fitted formulas get k in-edges per feature on average over each layer,
# each feature's errors priced by its Fisher information (graph acg${LAYERS}a; about 13 GB of RAM).
# Environment: LAYERS (6), WIDTH (2048), TOKENS (2600000), CONTEXTS (64), THREADS (2),
# BUFFER (65536 tokens per hook; 16384 keeps 30 layers near 12 GB of RAM), SPLICE (unset),
# FINETUNE (unset), LR_DECAY (0, the constant rate of the documented fine-tunes; acg finetune's
# own default is 0.5), FANIN (fixed), TRAIN_FLAGS (more `acg train` flags, e.g.
# "--model-dtype bfloat16 --forward compiled"), MAX_K (256) and FIT_K (8,32,64) of the build, KS
# (1,2,4,8,16,32,64,128,256: the k measured).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/acg_smollm2}
LAYERS=${LAYERS:-6}
WIDTH=${WIDTH:-2048}
TOKENS=${TOKENS:-2600000}
CONTEXTS=${CONTEXTS:-64}
THREADS=${THREADS:-2}
BUFFER=${BUFFER:-65536}
ACG=.venv/bin/acg
SRC=$(ls -d /usr/share/doc/python3*/html/_sources 2>/dev/null | tail -1)
[ -n "$SRC" ] || { echo "no /usr/share/doc/python3*/html/_sources: apt-get install python3-doc" >&2; exit 1; }

if [ ! -d "$WORK/corpus/eval" ]; then
    i=0
    while IFS= read -r f; do
        split=train; [ $((i % 10)) -eq 9 ] && split=eval
        mkdir -p "$WORK/corpus/$split/$(dirname "$f")"
        cp "$SRC/$f" "$WORK/corpus/$split/$f"
        i=$((i + 1))
    done < <(cd "$SRC" && find . -type f -name '*.txt' | sort)
fi

TC=$WORK/transcoders$LAYERS
if [ ! -f "$TC/blocks.$((LAYERS - 1)).hook_mlp_out/cfg.json" ]; then
    resume=(); [ -d "$TC/checkpoints" ] && resume=(--resume)
    $ACG train --model smollm2 --corpus "$WORK/corpus/train" --layers $(seq 0 $((LAYERS - 1))) \
        --kind skip_transcoder --activation topk --k 32 --width "$WIDTH" --tokens "$TOKENS" \
        --buffer-tokens "$BUFFER" --threads "$THREADS" --seed 0 --checkpoint-every 100 --out "$TC" "${resume[@]}" ${TRAIN_FLAGS:-}
fi

TAG=
if [ -n "${FINETUNE:-}" ]; then
    FT=$WORK/finetuned$LAYERS
    if [ ! -f "$FT/finetune.json" ]; then
        resume=(); [ -f "$FT/checkpoints/finetune.safetensors" ] && resume=(--resume)
        $ACG finetune "$TC" --model smollm2 --corpus "$WORK/corpus/train" --contexts 1024 \
            --steps "$FINETUNE" --rows 8 --lr-decay "${LR_DECAY:-0}" --threads "$THREADS" \
            --checkpoint-every 25 --out "$FT" "${resume[@]}"
    fi
    TC=$FT
    TAG=_finetuned
fi

if [ -n "${SPLICE:-}" ]; then
    for n in $SPLICE; do
        report=$WORK/level1${TAG}_first$n.json
        [ -f "$report" ] && continue
        dirs=(); for l in $(seq 0 $((n - 1))); do dirs+=("$TC/blocks.$l.hook_mlp_out"); done
        $ACG eval "${dirs[@]}" --model smollm2 --corpus "$WORK/corpus/eval" --contexts 32 \
            --threads "$THREADS" --joint-only --report "$report"
    done
    exit 0
fi

GRAPH=$WORK/acg$LAYERS$TAG
fanin=()
if [ "${FANIN:-fixed}" = adaptive ]; then
    fanin=(--fit-fanin adaptive --fit-importance fisher)
    GRAPH=${GRAPH}a
fi
[ -f "$GRAPH/manifest.json" ] || $ACG build --model smollm2 --transcoders "$TC" \
    --corpus "$WORK/corpus/train" --contexts "$CONTEXTS" --max-k "${MAX_K:-256}" --no-qk \
    --fit-k "${FIT_K:-8,32,64}" --fit-pool 4 --threads "$THREADS" --out "$GRAPH" "${fanin[@]}"

$ACG faithfulness "$GRAPH" --corpus "$WORK/corpus/eval" --contexts 32 \
    --k "${KS:-1,2,4,8,16,32,64,128,256}" --threads "$THREADS" --report "$GRAPH/reports"
