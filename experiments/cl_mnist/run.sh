#!/usr/bin/env bash
# The 5-seed table on the embedded MNIST subset (5 tasks of 2 digits, MLP 2x100, 1 epoch per task,
# batch 10), every run made with the CLI.
#   stage 1: hyperparameters chosen on a validation split (20 % of each class's training images,
#            split_seed 0; seed 0 only, to fit a shared 2-core machine), never on the test split;
#   stage 2: the chosen hyperparameters, seeds 0..4, evaluated on the test split;
#   stage 3: every run as one row of the curated experiments/results/cl_mnist/runs.csv, and from it
#            the tables (mean ± std, paired comparisons; sparsekern_cl/table.py) and the selection.
# Per-run results.json files, the selection JSON and the log go to experiments/runs/cl_mnist/
# (not in git); `table` alone remakes the tables from runs.csv when no per-run file is there.
# Usage: bash experiments/cl_mnist/run.sh [val|test|table|all]   (from anywhere)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
OUT=experiments/runs/cl_mnist
RES=experiments/results/cl_mnist
mkdir -p "$OUT" "$RES"
COMMON="--preset mnist-mlp --threads 1 --progress false --plots false --save-checkpoints false"
stage=${1:-all}

export COMMON
QUEUE=$(mktemp)
run() {  # run OUTPUT_DIR FLAGS...: queue `python -m sparsekern_cl $COMMON --output-dir OUTPUT_DIR FLAGS...`
  echo "$*" >> "$QUEUE"
}
flush() {  # execute the queue through the CLI entry point, in one process (see drive.py)
  $PY experiments/cl_mnist/drive.py "$QUEUE" >> $OUT/drive.log
  : > "$QUEUE"
}

if [ "$stage" = val ] || [ "$stage" = all ]; then
  for seed in 0; do
    for lr in 0.03 0.1 0.3; do
      run $OUT/val/finetune_lr$lr/s$seed --method finetune --lr $lr --seed $seed --validation 0.2
      run $OUT/val/joint_lr$lr/s$seed --method joint --lr $lr --seed $seed --validation 0.2
      for buf in 200 500; do
        run $OUT/val/er$buf\_lr$lr/s$seed --method er --buffer-size $buf --lr $lr --seed $seed --validation 0.2
      done
    done
    for lr in 0.03 0.1 0.3; do
      for ab in "0.2 0.5" "0.5 1.0" "1.0 1.0"; do
        set -- $ab
        for buf in 200 500; do
          run $OUT/val/derpp$buf\_lr$lr\_a$1\_b$2/s$seed --method derpp --buffer-size $buf --lr $lr --alpha $1 \
            --beta $2 --seed $seed --validation 0.2
        done
      done
      for lam in 10 100 1000; do
        run $OUT/val/ewc_lr$lr\_l$lam/s$seed --method ewc --lr $lr --ewc-lambda $lam --seed $seed --validation 0.2
      done
    done
  done
  flush
  $PY -m sparsekern_cl.table --select $OUT/val/*/s*/results.json --json $OUT/selected.json
fi

if [ "$stage" = test ] || [ "$stage" = all ]; then
  # the flags of each method's best validation configuration, read from selected.json
  $PY - "$OUT/selected.json" > $OUT/test_flags.txt <<'PYEOF'
import json, sys
best = json.load(open(sys.argv[1]))
for label, b in best.items():
    method = label.split()[0]
    h = b["hyperparameters"]
    flags = f"--method {method} --lr {h['lr']}"
    if "buffer" in label:
        flags += " --buffer-size " + label.split("buffer ")[1].rstrip(")")
    if method == "derpp":
        flags += f" --alpha {h['alpha']} --beta {h['beta']}"
    if method == "ewc":
        flags += f" --ewc-lambda {h['ewc_lambda']}"
    print(label.replace(" ", "_").replace("(", "").replace(")", "") + " " + flags)
PYEOF
  while read -r name flags; do
    for seed in 0 1 2 3 4; do
      run $OUT/test/$name/s$seed $flags --seed $seed
    done
  done < $OUT/test_flags.txt
  flush
fi

if [ "$stage" = table ] || [ "$stage" = all ]; then
  if compgen -G "$OUT/test/*/s*/results.json" > /dev/null; then
    $PY -m sparsekern_cl.table $OUT/val/*/s*/results.json $OUT/test/*/s*/results.json --csv $RES/runs.csv \
      --split test > /dev/null
  fi
  $PY -m sparsekern_cl.table $RES/runs.csv --split test --out $RES/table
  $PY -m sparsekern_cl.table $RES/runs.csv --split test --setting task_il --out $RES/table_task_il > /dev/null
  $PY -m sparsekern_cl.table $RES/runs.csv --split val --select --out $RES/selection > /dev/null
fi
