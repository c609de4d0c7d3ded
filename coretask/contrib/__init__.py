"""Optional integrations, each an extra of its own: ``coretask[prometheus]`` (prometheus.py,
prometheus_server.py) and ``coretask[otel]`` (otel.py). They sit on the middleware seam
(coretask/middleware.py) and import their libraries lazily, so the core keeps its dependencies
(redis, dill, psutil) and ``import coretask`` never pays for them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigurationError

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ConfigurationError naming the extra that installs it: a
    missing optional library is a deployment problem, and its fix is one pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{feature} needs the {module.split('.')[0]!r} package, which is not installed ({exc}): "
            f"pip install 'coretask[{extra}]'") from None
