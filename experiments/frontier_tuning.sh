#!/usr/bin/env bash
# The frontier's tuning (see experiments/results/frontier_tuning/header.md): 3 trials per router
# family on held-out seed 100 at E = 8, K = 2, two trials side by side, one thread each.
# Re-running skips the trials already recorded.
#   bash experiments/frontier_tuning.sh
# The decision spec's equal tuning (configs/frontier_decide.yaml: 6 trials per family) is not
# this script but `python train.py frontier --spec configs/frontier_decide.yaml --stage tune`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RESULTS=experiments/results/frontier_tuning
trial() {  # name config overrides...
    local name=$1 config=$2
    shift 2
    OMP_NUM_THREADS=1 "$PY" experiments/tune_sweep.py --results "$RESULTS" \
        --out runs/frontier_tuning --name "$name" --config "configs/frontier/$config.yaml" -- "$@"
}
M=--model.model.moe

queue_a() {
    trial topk-base topk
    trial sparse-base sparse
    trial balanced-base balanced
    trial topk-lr0.005 topk --model.optim.lr 0.005
    trial sparse-lr0.003 sparse --model.optim.lr 0.003
}
queue_b() {
    trial balanced-lr0.003 balanced --model.optim.lr 0.003
    trial topk-aux0.01 topk $M.aux_loss_coef 0.01 $M.expert_bias false
    trial sparse-norenorm sparse $M.renormalize false
    trial balanced-tau0.5 balanced $M.tau 0.5
}
queue_a > runs/frontier_tuning_a.log 2>&1 &
queue_b > runs/frontier_tuning_b.log 2>&1
wait

