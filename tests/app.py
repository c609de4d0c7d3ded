"""The TaskProcessor that worker subprocesses of the tests load (``--app tests.app:processor``),
configured from the environment the test fixtures set."""
from __future__ import annotations

import json
import os

from coretask import Options, TaskProcessor


def _make() -> TaskProcessor:
    opts = json.loads(os.environ.get("CORETASK_TEST_OPTIONS", "{}"))
    return TaskProcessor(Options(redis=os.environ["CORETASK_TEST_URL"],
                                 cluster=bool(os.environ.get("CORETASK_TEST_CLUSTER")),
                                 prefix=os.environ["CORETASK_TEST_PREFIX"], **opts))


processor = _make() if "CORETASK_TEST_PREFIX" in os.environ else None
