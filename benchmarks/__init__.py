"""Side-by-side benchmark harness: coretask vs rq, celery, dramatiq and huey.

Run from the repository root::

    python -m benchmarks [--short] [--runs N] [--only rq,celery,...]

See benchmarks/README.md.
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv"
REQUIREMENTS = BENCH_DIR / "requirements.txt"
RESULTS_DIR = BENCH_DIR / "results"

LIBRARIES = ("rq", "celery", "dramatiq", "huey", "coretask")
