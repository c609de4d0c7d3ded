"""The import direction of coretask (docs/architecture.md), read from the source with ``ast``.

Every file of the package belongs to one layer of ``LAYERS``; a layer may import only the
layers ``MAY_IMPORT`` gives it: API -> gateway -> base and worker -> gateway -> base, while
nothing below imports the worker or the API, and no library module imports an entry module.
Every import of a coretask module counts: absolute and relative ones (``from . import x`` where
``x`` is a submodule names that submodule), imports inside functions, and imports under ``if
TYPE_CHECKING:`` (a type-only import that points the wrong way is still a wrong dependency).
An import's target is the module it names: ``from coretask.gateway import Gateway`` depends on
coretask/gateway/__init__.py, not on the coretask/__init__.py that Python runs first.

No server is needed. The self-tests at the bottom run the checker on synthetic source, so this
test cannot pass because it looked at nothing.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "coretask"
TOP = "coretask"

BASE, GATEWAY, API, WORKER, ENTRY, DASHBOARD = "base", "gateway", "api", "worker", "entry", "dashboard"

# The one table of layers. A path ending in "/**" covers every file under that folder, at any
# depth; any other path is one file. The first row that matches a file decides its layer, so
# the entry row comes first: it claims coretask/worker/__main__.py before the worker row does.
# Paths that do not exist yet (testing, contrib) are listed so that those files land in the
# right layer the day they are added. The dashboard sits above the public API and beside the
# entry modules: it may use the API and the processor, never the gateway or the worker, so
# that everything it shows and does goes through the calls that enforce tenant scoping.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (DASHBOARD, ("coretask/dashboard/**",)),
    (ENTRY, ("coretask/__init__.py", "coretask/__main__.py", "coretask/cli.py", "coretask/appload.py",
             "coretask/processor.py", "coretask/eager.py", "coretask/worker/__main__.py", "coretask/embedded/**",
             "coretask/flask.py", "coretask/testing.py", "coretask/contrib/**")),
    (BASE, ("coretask/errors.py", "coretask/options.py", "coretask/models.py", "coretask/encoding.py",
            "coretask/targets.py", "coretask/signing.py", "coretask/cron.py", "coretask/context.py",
            "coretask/middleware.py", "coretask/results.py", "coretask/logs.py", "coretask/throttle.py")),
    (GATEWAY, ("coretask/gateway/**",)),
    (API, ("coretask/client.py", "coretask/batch.py", "coretask/schedules.py", "coretask/tenancy.py",
           "coretask/introspection.py", "coretask/producing.py")),
    (WORKER, ("coretask/worker/**",)),
]

MAY_IMPORT: dict[str, frozenset[str]] = {
    BASE: frozenset({BASE}),
    GATEWAY: frozenset({BASE, GATEWAY}),
    API: frozenset({BASE, GATEWAY, API}),
    WORKER: frozenset({BASE, GATEWAY, WORKER}),
    ENTRY: frozenset({BASE, GATEWAY, API, WORKER, ENTRY, DASHBOARD}),
    DASHBOARD: frozenset({BASE, API, ENTRY, DASHBOARD}),
}

RULES: dict[str, str] = {
    BASE: "base modules may import only base modules; they sit under everything, so move the "
          "code they need into the base layer or pass it in",
    GATEWAY: "the gateway may import only base and gateway modules; the API and the worker call it, "
             "never the other way: move the shared code down or pass it in",
    API: "the API may import only base, gateway and API modules; it never imports the worker "
         "(processor.py joins the two): move the shared code down or pass it in",
    WORKER: "the worker may import only base, gateway and worker modules; move the shared code down "
            "or pass it in",
    DASHBOARD: "the dashboard may import only base, API and entry modules (the processor): it reads and acts "
               "through the public API, never the gateway or the worker, so tenant scoping holds in one "
               "place; add the read it needs to the API",
}
ENTRY_NOTE = ("entry modules wire the layers together and may import anything, so no library "
              "module may import one")

# Files that must not import some files of their own layer.
FORBIDDEN: dict[str, tuple[frozenset[str], str]] = {
    "coretask/gateway/transport.py": (
        frozenset({"coretask/gateway/__init__.py", "coretask/gateway/gateway.py", "coretask/gateway/keys.py",
                   "coretask/gateway/records.py"}),
        "transport is the bottom of the gateway: it runs scripts by name with raw KEYS and ARGV and "
        "may import base modules, never the Gateway, Keys or records above it (nor the gateway "
        "package, which imports them)"),
}

IMPORT_FUNCTIONS = {"import_module", "__import__"}
MIN_MODULES = 21


def layer_of(path: str) -> str | None:
    """The layer of a file path relative to the repository ('coretask/worker/loop.py')."""
    for layer, patterns in LAYERS:
        for pattern in patterns:
            if pattern.endswith("/**"):
                if path.startswith(pattern[:-2]):
                    return layer
            elif path == pattern:
                return layer
    return None


def module_of(path: str) -> tuple[str, bool]:
    """('coretask/worker/loop.py') -> ('coretask.worker.loop', False); a package's __init__.py
    is the package itself: ('coretask/gateway/__init__.py') -> ('coretask.gateway', True)."""
    parts = path[:-len(".py")].split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@dataclass(frozen=True)
class Import:
    line: int
    name: str            # the dotted module name imported
    path: str | None     # its file, None when no file of the package is that module


def _absolute(module: str, is_package: bool, level: int, name: str | None, path: str, line: int) -> str:
    """The absolute module that ``from <level dots><name> import ...`` starts from."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        raise ValueError(f"{path}:{line}: relative import beyond the top-level package")
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _names(tree: ast.AST, module: str, is_package: bool, path: str, known: dict[str, str]) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                start = _absolute(module, is_package, node.level, node.module, path, node.lineno)
            else:
                start = node.module or ""
            for alias in node.names:
                submodule = f"{start}.{alias.name}"
                # ``from X import y`` names the submodule X.y when there is one, else X
                yield node.lineno, submodule if alias.name != "*" and submodule in known else start
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            first = node.args[0]
            if fname in IMPORT_FUNCTIONS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def imports_of(path: str, source: str, known: dict[str, str]) -> list[Import]:
    """The imports of coretask modules in one file; ``known`` maps module names to files."""
    module, is_package = module_of(path)
    tree = ast.parse(source, filename=path)
    seen: dict[tuple[int, str], Import] = {}
    for line, name in _names(tree, module, is_package, path, known):
        if name == TOP or name.startswith(TOP + "."):
            seen.setdefault((line, name), Import(line, name, known.get(name)))
    return sorted(seen.values(), key=lambda i: (i.line, i.name))


@dataclass
class Report:
    classified: int = 0
    problems: list[str] = field(default_factory=list)


def check(files: dict[str, str]) -> Report:
    """Check the sources ``{path relative to the repository: text}`` against the table."""
    known = {module_of(path)[0]: path for path in files}
    report = Report()
    for path in sorted(files):
        layer = layer_of(path)
        if layer is None:
            report.problems.append(
                f"{path} is in no layer: add it to LAYERS in tests/test_architecture.py "
                f"({', '.join(MAY_IMPORT)}) and to docs/architecture.md, so its imports are checked")
            continue
        report.classified += 1
        forbidden, why = FORBIDDEN.get(path, (frozenset(), ""))
        for imp in imports_of(path, files[path], known):
            where = f"{path}:{imp.line} imports {imp.name}"
            if imp.path is None:
                report.problems.append(f"{where}, which is no module of the package")
                continue
            target = layer_of(imp.path)
            if target is None:
                continue   # reported above as a file in no layer
            if target not in MAY_IMPORT[layer]:
                rule = RULES[layer] + ("; " + ENTRY_NOTE if target == ENTRY else "")
                report.problems.append(f"{where} ({imp.path}): {layer} -> {target}; {rule}")
            elif imp.path in forbidden:
                report.problems.append(f"{where} ({imp.path}): {layer} -> {target}; {why}")
    return report


def package_files() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(PACKAGE.rglob("*.py"))}


# ---------------------------------------------------------------------------- the real package


def test_every_module_is_in_a_layer() -> None:
    report = check(package_files())
    unlisted = [p for p in report.problems if " is in no layer" in p]
    assert not unlisted, "\n".join(unlisted)
    assert report.classified >= MIN_MODULES, (
        f"only {report.classified} modules found under {PACKAGE}: the file walk is broken")


def test_imports_point_down() -> None:
    problems = [p for p in check(package_files()).problems if " is in no layer" not in p]
    assert not problems, f"{len(problems)} import(s) point the wrong way:\n" + "\n".join(problems)


# ------------------------------------------------------------------- the checker, on fake source

FAKE = {path: "" for path in (
    "coretask/__init__.py", "coretask/errors.py", "coretask/options.py", "coretask/processor.py",
    "coretask/appload.py", "coretask/client.py", "coretask/batch.py",
    "coretask/gateway/__init__.py", "coretask/gateway/gateway.py", "coretask/gateway/keys.py",
    "coretask/gateway/records.py", "coretask/gateway/transport.py",
    "coretask/worker/__init__.py", "coretask/worker/__main__.py", "coretask/worker/loop.py",
    "coretask/worker/ledger.py")}


def fake(sources: dict[str, str] | None = None) -> dict[str, str]:
    """FAKE with some files replaced; the key 'worker/loop' is coretask/worker/loop.py."""
    files = dict(FAKE)
    for short, text in (sources or {}).items():
        files[f"coretask/{short}.py"] = text
    return files


def problems(sources: dict[str, str]) -> list[str]:
    return check(fake(sources)).problems


def test_checker_accepts_imports_that_point_down() -> None:
    assert problems({
        "worker/loop": "from ..gateway import Gateway\nfrom ..errors import StoreError\nfrom . import ledger\n",
        "gateway/gateway": "from ..options import Options\nfrom .keys import Keys\nfrom .transport import Transport\n",
        "gateway/transport": "from ..errors import StoreError\nimport coretask.options\n",
        "client": "from .gateway import Gateway\nfrom .batch import BatchBuilder\nfrom .gateway.records import Ack\n",
        "processor": "from .client import Client\nfrom .worker.loop import Loop\n",
        "worker/__main__": "from ..appload import app_loader\nfrom .loop import Loop\n",
    }) == []


def test_base_importing_the_worker_is_reported() -> None:
    found = problems({"errors": "import os\nimport coretask.worker.loop\n"})
    assert len(found) == 1, found
    assert found[0].startswith("coretask/errors.py:2 imports coretask.worker.loop (coretask/worker/loop.py): "
                               "base -> worker; base modules may import only base modules")


def test_type_checking_import_is_reported() -> None:
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n"
              "    from ..worker.ledger import Ledger\n")
    found = problems({"gateway/keys": source})
    assert len(found) == 1, found
    assert found[0].startswith("coretask/gateway/keys.py:3 imports coretask.worker.ledger")
    assert "gateway -> worker" in found[0]


def test_import_inside_a_function_is_reported() -> None:
    found = problems({"client": "def run():\n    from .worker import loop\n    return loop\n"})
    assert len(found) == 1, found
    assert found[0].startswith("coretask/client.py:2 imports coretask.worker.loop")
    assert "api -> worker; the API may import only base, gateway and API modules" in found[0]


def test_worker_importing_the_api_gets_the_worker_rule() -> None:
    found = problems({"worker/ledger": "from ..client import Client\n"})
    assert found == ["coretask/worker/ledger.py:1 imports coretask.client (coretask/client.py): worker -> api; "
                     "the worker may import only base, gateway and worker modules; move the shared code "
                     "down or pass it in"]


def test_library_module_importing_an_entry_module_is_reported() -> None:
    found = problems({"worker/loop": "from .. import Options\n", "batch": "from .processor import TaskProcessor\n"})
    assert len(found) == 2, found
    assert found[0].startswith("coretask/batch.py:1 imports coretask.processor (coretask/processor.py): api -> entry")
    assert found[1].startswith("coretask/worker/loop.py:1 imports coretask (coretask/__init__.py): worker -> entry")
    assert all(ENTRY_NOTE in p for p in found)


def test_dynamic_import_of_a_coretask_module_is_reported() -> None:
    found = problems({"options": "import importlib\nmod = importlib.import_module('coretask.client')\n"})
    assert len(found) == 1 and found[0].startswith("coretask/options.py:2 imports coretask.client"), found


def test_dashboard_importing_the_gateway_is_reported() -> None:
    files = fake()
    files["coretask/dashboard/views.py"] = ("from ..processor import TaskProcessor\nfrom ..client import Client\n"
                                           "from ..gateway import Gateway\n")
    found = check(files).problems
    assert len(found) == 1, found
    assert found[0].startswith("coretask/dashboard/views.py:3 imports coretask.gateway "
                               "(coretask/gateway/__init__.py): dashboard -> gateway; the dashboard may import "
                               "only base, API and entry modules")


def test_transport_is_the_bottom_of_the_gateway() -> None:
    found = problems({"gateway/transport": "from ..errors import StoreError\nfrom .keys import Keys\n"
                                           "from . import records\nfrom coretask.gateway import Gateway\n"})
    assert [p.split(" (")[0] for p in found] == [
        "coretask/gateway/transport.py:2 imports coretask.gateway.keys",
        "coretask/gateway/transport.py:3 imports coretask.gateway.records",
        "coretask/gateway/transport.py:4 imports coretask.gateway",
    ]
    assert all("transport is the bottom of the gateway" in p for p in found)


def test_relative_imports_resolve_to_the_module_they_name() -> None:
    files = fake()
    known = {module_of(p)[0]: p for p in files}
    source = ("from . import ledger\n"
              "from .ledger import Task\n"
              "from ..gateway import Gateway\n"
              "from ..gateway.keys import Keys\n"
              "from .. import errors, Options\n"
              "import coretask.gateway.records as records\n"
              "from coretask.worker import *\n")
    assert [(i.line, i.name, i.path) for i in imports_of("coretask/worker/loop.py", source, known)] == [
        (1, "coretask.worker.ledger", "coretask/worker/ledger.py"),
        (2, "coretask.worker.ledger", "coretask/worker/ledger.py"),
        (3, "coretask.gateway", "coretask/gateway/__init__.py"),
        (4, "coretask.gateway.keys", "coretask/gateway/keys.py"),
        (5, "coretask", "coretask/__init__.py"),
        (5, "coretask.errors", "coretask/errors.py"),
        (6, "coretask.gateway.records", "coretask/gateway/records.py"),
        (7, "coretask.worker", "coretask/worker/__init__.py"),
    ]
    # in a package's __init__.py, "." is the package itself
    init = "from . import keys\nfrom .gateway import Gateway\n"
    assert [i.name for i in imports_of("coretask/gateway/__init__.py", init, known)] == [
        "coretask.gateway.keys", "coretask.gateway.gateway"]
    with pytest.raises(ValueError, match="beyond the top-level package"):
        imports_of("coretask/worker/loop.py", "from ... import x\n", known)


def test_unlisted_module_and_unknown_import_are_reported() -> None:
    files = fake({"errors": "import coretask.nothing\n"})
    files["coretask/newthing.py"] = ""
    found = check(files).problems
    assert found == [
        "coretask/errors.py:1 imports coretask.nothing, which is no module of the package",
        "coretask/newthing.py is in no layer: add it to LAYERS in tests/test_architecture.py "
        "(base, gateway, api, worker, entry, dashboard) and to docs/architecture.md, so its imports are checked",
    ]


@pytest.mark.parametrize("path, layer", [
    ("coretask/middleware.py", BASE), ("coretask/context.py", BASE),
    ("coretask/gateway/transport.py", GATEWAY), ("coretask/gateway/sub/deep.py", GATEWAY),
    ("coretask/producing.py", API), ("coretask/tenancy.py", API),
    ("coretask/worker/loop.py", WORKER), ("coretask/worker/__init__.py", WORKER),
    ("coretask/worker/__main__.py", ENTRY), ("coretask/embedded/servers.py", ENTRY),
    ("coretask/dashboard/__init__.py", DASHBOARD), ("coretask/dashboard/views/app.py", DASHBOARD),
    ("coretask/flask.py", ENTRY), ("coretask/testing.py", ENTRY), ("coretask/contrib/sentry.py", ENTRY),
    ("coretask/eager.py", ENTRY), ("coretask/gateway/memory.py", GATEWAY),
    ("coretask/gatewayish.py", None), ("coretask/workers/x.py", None),
])
def test_layer_table(path: str, layer: str | None) -> None:
    assert layer_of(path) == layer
