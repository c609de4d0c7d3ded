"""Declared dependencies and imports agree (no server): every distribution in setup.cfg's
install_requires is imported somewhere in coretask/, and every third-party import in coretask/
is declared, in install_requires or, when the import is optional (inside a function body or a
try/except ImportError), in an extras_require entry."""
from __future__ import annotations

import ast
import configparser
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "coretask"

# Import names that are not the distribution name with '-'/'.' turned into '_'.
IMPORT_NAMES = {"pyyaml": "yaml", "python-dateutil": "dateutil", "opentelemetry-api": "opentelemetry",
                "opentelemetry-sdk": "opentelemetry"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _dist_name(requirement: str) -> str | None:
    """Normalised distribution name of a requirement line ('redis>=5.0' -> 'redis')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def _import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist.replace("-", "_"))


def _requirements(text: str) -> list[str]:
    return [d for line in text.splitlines() if (d := _dist_name(line.split("#")[0])) is not None]


def _setup_cfg() -> tuple[list[str], dict[str, list[str]]]:
    """(install_requires, {extra: requirements}) as normalised distribution names."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    core = _requirements(cfg.get("options", "install_requires", fallback=""))
    extras = ({name: _requirements(value) for name, value in cfg.items("options.extras_require")}
              if cfg.has_section("options.extras_require") else {})
    return core, extras


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        if handler.type is None:
            return True
        names = {n.id if isinstance(n, ast.Name) else n.attr
                 for n in ast.walk(handler.type) if isinstance(n, (ast.Name, ast.Attribute))}
        if names & IMPORT_ERRORS:
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(nodes: Iterable[ast.AST], optional: bool = False) -> Iterator[tuple[str, int, bool]]:
    """(top-level module, line, optional) of each absolute import; optional means inside a
    function body, the body of a try that catches ImportError, or an `if TYPE_CHECKING:`."""
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.partition(".")[0], node.lineno, optional
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module.partition(".")[0], node.lineno, optional
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _imports(ast.iter_child_nodes(node), True)
        elif isinstance(node, ast.Try) and _catches_import_error(node):
            yield from _imports(node.body, True)
            yield from _imports([*node.handlers, *node.orelse, *node.finalbody], optional)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, True)
            yield from _imports(node.orelse, optional)
        else:
            yield from _imports(ast.iter_child_nodes(node), optional)


def _third_party_imports() -> list[tuple[str, str, bool]]:
    """(module, 'path:line', optional) for every import in coretask/ that is not stdlib or ours."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for module, line, optional in _imports(tree.body):
            if module not in sys.stdlib_module_names and module != "coretask":
                found.append((module, f"{path.relative_to(ROOT)}:{line}", optional))
    return found


CORE, EXTRAS = _setup_cfg()


def test_setup_cfg_is_read() -> None:
    assert "redis" in CORE, f"install_requires not found in {ROOT / 'setup.cfg'}: {CORE}"


@pytest.mark.parametrize("dist", CORE)
def test_every_declared_dependency_is_imported(dist: str) -> None:
    name = _import_name(dist)
    imported = {module for module, _, _ in _third_party_imports()}
    assert name in imported, (
        f"{dist!r} is declared in setup.cfg install_requires but no module under coretask/ "
        f"imports {name!r}: remove it from install_requires (or import it where it is used; if "
        f"its import name differs, add it to IMPORT_NAMES in this test)")


def test_every_third_party_import_is_declared() -> None:
    core = {_import_name(d) for d in CORE}
    extras = {_import_name(d): extra for extra, dists in EXTRAS.items() for d in dists}
    problems = []
    for module, where, optional in _third_party_imports():
        if module in core:
            continue
        if module in extras:
            if not optional:
                problems.append(
                    f"{where}: {module!r} is only in extras_require[{extras[module]!r}] but is "
                    f"imported unconditionally: import it inside a function or a try/except "
                    f"ImportError, or move it to install_requires")
        else:
            problems.append(f"{where}: {module!r} is imported but declared nowhere in setup.cfg: "
                            f"add it to install_requires (or to an extra, imported optionally)")
    assert not problems, "\n".join(problems)


def test_import_scan_tells_optional_imports_apart() -> None:
    source = (
        "import a.b\n"
        "from c import d\n"
        "from . import local\n"
        "try:\n    import e\nexcept ImportError:\n    import f\n"
        "try:\n    import g\nexcept KeyError:\n    pass\n"
        "def h():\n    import i\n"
        "if TYPE_CHECKING:\n    import j\n"
    )
    got = {module: optional for module, _, optional in _imports(ast.parse(source).body)}
    assert got == {"a": False, "c": False, "e": True, "f": False, "g": False, "i": True, "j": True}


def test_core_imports_no_extra() -> None:
    """The extras cost nothing unless used: importing coretask, its worker and CLI loads neither
    prometheus_client nor flask, nor coretask's tracing module (redis-py itself imports
    opentelemetry when it is installed, so that one name says nothing about coretask)."""
    import subprocess
    code = ("import sys, coretask, coretask.cli, coretask.worker.manager, coretask.worker.__main__, "
            "coretask.contrib; print(sorted(m for m in ('prometheus_client', 'flask', 'coretask.contrib.otel', "
            "'coretask.contrib.prometheus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
