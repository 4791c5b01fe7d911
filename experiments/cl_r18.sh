#!/usr/bin/env bash
# The ResNet-18 32x32 runs behind results/r18_* in the order they were run (issue 17 items 10-11).
# One torch thread per run, two runs at a time; each line skips the (label, seed) pairs already in
# results/r18_runs.csv. The diag rows were run before the sparse_rescale fix (commit "cl backbones:
# sparse_rescale leaves layers that feed a batch norm ..."): rerunning them on a later commit gives
# the fixed behaviour, so "DER++ 0.9" then equals "DER++ 0.9 no rescale".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
$PY experiments/cl_r18.py --grid diag --seeds 0 --jobs 2
$PY experiments/cl_r18.py --grid main --only "dense DER++" "SparCL-DER++ 0.75" --seeds 0 1 2 3 4 --jobs 2
$PY experiments/cl_r18.py --grid main --seeds 0 1 --jobs 2
$PY experiments/cl_r18.py --grid abl --seeds 0 1 --jobs 2
$PY experiments/cl_r18.py --table-only
# after the BatchNorm fixes of DST and EsaCL (commit "cl: BatchNorm statistics set to the exact ones ..."):
$PY experiments/cl_r18.py --grid fixed --seeds 0 1 2 3 4 --jobs 2
$PY experiments/cl_r18.py --grid abl01 --seeds 0 1 2 --jobs 2
$PY experiments/cl_r18.py --grid epochs --seeds 0 1 --jobs 2
$PY experiments/cl_r18.py --table-only
# 3 epochs per task (dense DER++ still improved from 2 to 3 epochs), and a 4-epoch dense check:
$PY experiments/cl_r18.py --grid e3 --grid e4 --seeds 0 1 2 3 4 --jobs 2
$PY experiments/cl_r18.py --table-only
