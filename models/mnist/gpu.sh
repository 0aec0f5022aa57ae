#!/usr/bin/env bash
# Go on training the bundled model on a GPU, then measure its whole quality table there: every row at
# n = 1,000 takes seconds on one GPU and hours on a 2-core CPU (a 1000-step ancestral row is a million
# image-steps of the U-Net).
#
# On the device machine (python3 with torch and CUDA), from the repo root. The digits beside the
# checkout (../shared/data/mnist) do not travel: copy them into the git-ignored .data/ here first,
#     mkdir -p .data && cp -r ../shared/data/mnist .data/
# then with the device tool: command `bash models/mnist/gpu.sh`, carry [".data"], timeout_s 560.
# Dry run on a CPU, tiny sizes, about two minutes:
#     DEVICE=cpu PYTHON=.venv/bin/python TRAIN_MINUTES=0.02 N=8 ANCESTRAL_STEPS=4 bash models/mnist/gpu.sh
#
# Results go to $OUT when set (the device tool brings them back), else runs/mnist-gpu/: gpu.log and
# mnist-gpu.tar.gz holding model/ (the EMA weights with training.json: copy over models/mnist to ship
# them) and eval-*.json, one per row of the card's table, each with the command that made it.
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
RESULTS=${OUT:-runs/mnist-gpu}
DATA=${DATA:-.data/mnist}
TRAIN_MINUTES=${TRAIN_MINUTES:-4.5}  # of the 8-minute device call: evaluation needs about a minute
N=${N:-1000}
ANCESTRAL_STEPS=${ANCESTRAL_STEPS:-1000}
BATCH=${BATCH:-1000}  # sampling batch of the evaluation
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mnist-gpu-XXXXXX")
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
exec > >(tee "$RESULTS/gpu.log") 2>&1
[ -d "$DATA" ] || DATA=../shared/data/mnist  # a run here, beside shared/
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())"
[ "$DEVICE" != cuda ] || nvidia-smi --query-gpu=name,memory.total --format=csv || true

# The card's flags; batch 128 keeps a GPU busier than 64 (the learning rate stays 5e-4).
echo "=== train for ${TRAIN_MINUTES} min from models/mnist"
"$PY" -m app.cli train --data "$DATA" --out "$WORK/run" --init-from models/mnist --ch 32 --ch-mult 1,2,2 \
    --num-res-blocks 2 --attn-resolutions 7 --dropout 0.1 --norm-groups 8 --steps 1000000 \
    --batch-size 128 --lr 5e-4 --warmup 200 --ema-decay 0.999 --checkpoint-every 1000 --preview-every 0 \
    --seed 1 --device "$DEVICE" --max-minutes "$TRAIN_MINUTES" || exit 1
MODEL=$WORK/run/model

FAILED=()
row() {  # row NAME ARGS...: one row of the table, as JSON
    echo "=== eval $1"
    local name=$1
    shift
    "$PY" -m app.cli eval --data "$DATA" --device "$DEVICE" --batch-size "$BATCH" --json "$WORK/eval-$name.json" \
        "$@" || FAILED+=("$name")
}
row real --real --n "$N"
row ancestral-beta --model "$MODEL" --n "$N" --sampler ddpm --steps "$ANCESTRAL_STEPS" --variance beta --seed 0
row ancestral-posterior --model "$MODEL" --n "$N" --sampler ddpm --steps "$ANCESTRAL_STEPS" --variance posterior --seed 0
for steps in 100 50 20; do
    row "ddim-$steps" --model "$MODEL" --n "$N" --sampler ddim --steps "$steps" --eta 0 --seed 0
done

cp -r "$MODEL" "$WORK/model"
tar -czf "$RESULTS/mnist-gpu.tar.gz" -C "$WORK" model $(cd "$WORK" && ls eval-*.json 2>/dev/null)
rm -rf "$WORK"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "mnist gpu.sh: trained and measured; results in $RESULTS/mnist-gpu.tar.gz"
else
    echo "mnist gpu.sh: FAILED rows: ${FAILED[*]}"
    exit 1
fi
