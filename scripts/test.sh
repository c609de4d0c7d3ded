#!/usr/bin/env bash
# Runs the test suite: creates .venv, installs coretask with its test extras, runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh --server cluster tests/test_smoke.py`.
# PYTHON picks the interpreter; its venv is .venv for the default python3, .venv-X.Y otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ -n "${PYTHON:-}" ]; then
  VENV=.venv-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
exec "$VENV/bin/python" -m pytest "$@"
