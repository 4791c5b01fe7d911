#!/usr/bin/env bash
# The test suite: set up (idempotently), then ruff (lint + format check), then pytest.  Extra
# arguments go to pytest.  pytest exits non-zero (5) when no test ran, so an empty run fails.
# SPARSEKERN_STRICT=1 (CI=true implies it) makes a C++ build that fails, or a missing nvcc, a
# failure instead of a run of skips: in setup.py (the install) and in the tests marked
# requires_cpp / requires_nvcc.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# lint and format first (ruff comes with the dev extra): a style break fails like a test
"$SPARSEKERN_VPY" -m ruff check .
"$SPARSEKERN_VPY" -m ruff format --check .
exec "$SPARSEKERN_VPY" -m pytest -q "$@"
