"""Where the examples find Redis: CORETASK_REDIS_URL if set, else an embedded server."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("CORETASK_REDIS_URL")
    if url:
        yield url
        return
    from coretask.embedded.servers import RedisServer
    with RedisServer() as srv:
        os.environ["CORETASK_REDIS_URL"] = srv.url
        yield srv.url
