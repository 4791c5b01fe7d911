#!/usr/bin/env bash
# The main job: set up (idempotently), then run the demo on the bundled data.
# Extra arguments go to the demo (python -m sparsekern.demo --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$SPARSEKERN_VPY" -m sparsekern.demo "$@"
