"""The TaskProcessor that worker subprocesses of the tests load (``--app tests.app:processor``),
configured from the environment the test fixtures set."""
from __future__ import annotations

import json
import os
from datetime import timedelta

from coretask import Options, TaskProcessor


def options_from_env() -> dict:
    """The Options keywords a test passed in CORETASK_TEST_OPTIONS (JSON); a hook cannot travel
    as JSON, so ``retry_delay_s`` stands for an on_task_failed_delay of that constant delay."""
    opts = json.loads(os.environ.get("CORETASK_TEST_OPTIONS", "{}"))
    if "retry_delay_s" in opts:
        delay = timedelta(seconds=opts.pop("retry_delay_s"))
        opts["on_task_failed_delay"] = lambda ctx, left: delay
    return opts


def _make() -> TaskProcessor:
    return TaskProcessor(Options(redis=os.environ["CORETASK_TEST_URL"],
                                 cluster=bool(os.environ.get("CORETASK_TEST_CLUSTER")),
                                 prefix=os.environ["CORETASK_TEST_PREFIX"], **options_from_env()))


processor = _make() if "CORETASK_TEST_PREFIX" in os.environ else None
