"""The task body of benchmarks/dashboard.py, importable by name (never run there: no worker)."""


def noop(i: int) -> None:
    return None
