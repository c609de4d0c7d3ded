#!/usr/bin/env bash
# Runs the test suite: creates .venv, installs coretask with its test extras, runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh --server cluster tests/test_smoke.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
