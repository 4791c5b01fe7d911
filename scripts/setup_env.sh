#!/usr/bin/env bash
# Create or reuse the virtual environment and install sparsekern into it, idempotently.
#
#   SPARSEKERN_VENV        where the venv lives            (default: <repo>/.venv)
#   SPARSEKERN_PYTHON      interpreter that creates it     (default: python3)
#   SPARSEKERN_TORCH_SPEC  torch to install if none is     (default: torch==2.13.0, the CPU build)
#   SPARSEKERN_EXTRAS      extras installed with the package (default: dev,cl,triton,bench)
#
# An installed torch is never replaced.  The package is installed editable with
# --no-build-isolation (so the C++ extension builds against this torch, never a second one), and
# only again when its build inputs (pyproject.toml, setup.py, csrc/) change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARSEKERN_VENV:-$ROOT/.venv}"
BASE_PY="${SPARSEKERN_PYTHON:-python3}"
TORCH_SPEC="${SPARSEKERN_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${SPARSEKERN_EXTRAS:-dev,cl,triton,bench}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment at $VENV"
  "$BASE_PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import setuptools, wheel" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "setuptools>=64" wheel
fi
if "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] using installed torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing $TORCH_SPEC"
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi

stamp="$VENV/.sparsekern_install_stamp"
build_inputs() {
  echo "$EXTRAS"
  for f in pyproject.toml setup.py; do [ -f "$f" ] && sha256sum "$f"; done
  if [ -d csrc ]; then find csrc -type f | LC_ALL=C sort | xargs -r sha256sum; fi
  return 0
}
inputs_hash="$(cd "$ROOT" && build_inputs | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs_hash" ] || ! "$VPY" -c "import sparsekern" >/dev/null 2>&1; then
  echo "[setup] installing sparsekern (editable, no build isolation) with extras [$EXTRAS]"
  log="$VENV/sparsekern_install.log"
  if ! "$VPY" -m pip install --no-build-isolation -e "$ROOT[$EXTRAS]" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "[setup] pip install failed; full log: $log" >&2
    exit 1
  fi
  if grep -q "BUILDING THE C++ KERNELS FAILED" "$log"; then
    # pip fell back to the pure-Python package; in a source tree an older sparsekern/_C*.so from an
    # earlier build would still load, so say so rather than run stale kernels silently
    grep -A3 -m1 " error: " "$log" >&2 || true
    echo "[setup] WARNING: the C++ kernels failed to build (full log: $log); any sparsekern/_C*.so in the" \
         "source tree is from an earlier build" >&2
  else
    echo "$inputs_hash" > "$stamp"
  fi
else
  echo "[setup] sparsekern already installed and up to date"
fi
export SPARSEKERN_VPY="$VPY"
