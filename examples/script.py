"""A plain script: enqueue work, process it in this same process (threads only), report.

    python -m examples.script
"""
from __future__ import annotations

import threading
import time

from coretask import Options, TaskProcessor

from ._server import redis_url


def word_count(text: str) -> int:
    return len(text.split())


def main() -> int:
    with redis_url() as url:
        processor = TaskProcessor(Options(redis=url, prefix="{example-script}", max_workers=4))
        lines = ["the quick brown fox", "jumps over", "the lazy dog"] * 10
        batch_id = processor.enqueue_batch("default", "me", lambda b: [b.enqueue(word_count, line) for line in lines])
        stop = threading.Event()
        worker = threading.Thread(target=processor.run, args=(stop,))
        worker.start()
        try:
            info = processor.wait_for_batch(batch_id, timeout=60)
        finally:
            stop.set()
            worker.join()
        print(f"batch {info.state}: {info.done}/{info.total} tasks in {time.time() - info.created.timestamp():.2f}s")
        return 0 if info.state == "succeeded" else 1


if __name__ == "__main__":
    from examples import script

    raise SystemExit(script.main())
