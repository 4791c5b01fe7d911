#!/usr/bin/env bash
# The test suite: set up (idempotently), then pytest.  Extra arguments go to pytest.
# pytest exits non-zero (5) when no test ran, so an empty run fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$SPARSEKERN_VPY" -m pytest -q "$@"
