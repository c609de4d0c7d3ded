"""Targets: recording a callable by reference at enqueue, and finding it again in a worker.

A reference is ``"module:qualname"``. Instance methods are recorded as their class plus method
name; the instance is built again at run time by ``Options.resolver``, so no object state is
smuggled through Redis. Resolution is cached per reference, so after the first task of a kind a
worker does no import or reflection work for it.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import TargetError, TaskLoadError, TaskRefused

__all__ = ["reference_of", "Target", "resolve", "refusal", "DENIED_MODULES"]

# Modules whose functions run code or commands, or load code from data (unpickling, importing,
# evaluating strings). A target in one of them (or a submodule) is refused at enqueue, and in a
# worker before its module is imported. A backstop, not a sandbox: Options.allowed_modules is
# the allow-list that bounds what a worker imports, and Options.signing_key who may enqueue.
DENIED_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "pipes",
    "multiprocessing", "_winapi", "sys", "ctypes", "_ctypes", "importlib", "imp", "runpy",
    "pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "code", "codeop",
    "timeit", "profile", "cProfile", "pdb", "bdb", "trace", "doctest", "webbrowser", "pydoc",
    "asyncio.subprocess", "logging.config", "site", "unittest", "idlelib", "zipimport",
    "pip", "ensurepip", "venv", "distutils", "setuptools", "yaml", "_yaml", "jsonpickle", "joblib",
})


def _in(module: str, prefixes: frozenset[str] | tuple[str, ...]) -> bool:
    """True when ``module`` is one of ``prefixes`` or below one of them ("a.b" covers "a.b.c";
    a prefix ending in "." covers only the modules below it)."""
    return any(module == p or module.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


@functools.lru_cache(maxsize=4096)
def _denied(module: str) -> bool:
    return _in(module, DENIED_MODULES)


@functools.lru_cache(maxsize=8192)   # a pure function of two strings, asked on every enqueue
def refusal(ref: str, allowed: tuple[str, ...] | None = None) -> str | None:
    """Why the target string ``ref`` may not run (deny-list, Options.allowed_modules), or None.
    Looks at the string only: nothing is imported."""
    module = ref.partition(":")[0]
    if _in(module, DENIED_MODULES):
        return (f"target {ref} is refused: module {module} runs code or commands (coretask's deny-list, "
                "see README, Security)")
    if allowed is not None and not _in(module, allowed):
        return f"target {ref} is refused: module {module} is not in Options.allowed_modules {list(allowed)}"
    return None


def reference_of(fn: Callable[..., Any]) -> str:
    """The ``module:qualname`` of a callable that a worker can import, or TargetError.
    Cached per function (and per class for methods), so repeated enqueues do no reflection."""
    if inspect.ismethod(fn):
        owner = fn.__self__
        return _method_reference(owner if isinstance(owner, type) else type(owner), fn.__func__)
    try:
        return _function_reference(fn)
    except TypeError:  # unhashable callable object
        raise TargetError(f"{fn!r} is not a function or method and cannot be recorded by reference; "
                          "use serializer='dill' for other callables") from None


@functools.lru_cache(maxsize=4096)
def _method_reference(cls: type, func: Any) -> str:
    ref = f"{cls.__module__}:{cls.__qualname__}.{func.__name__}"
    found = _check_lookup(ref)
    if getattr(found, "__func__", found) is not func:
        raise TargetError(f"{ref} does not resolve to {func!r} when imported; it cannot be recorded by reference")
    return ref


@functools.lru_cache(maxsize=4096)
def _function_reference(fn: Callable[..., Any]) -> str:
    if not (inspect.isfunction(fn) or inspect.isbuiltin(fn)):
        raise TargetError(
            f"{fn!r} is not a function or method: only module-level functions, static/class methods "
            "and methods can be recorded by reference (use serializer='dill' for other callables)")
    qualname = getattr(fn, "__qualname__", "")
    if fn.__name__ == "<lambda>":
        raise TargetError(
            f"a lambda ({_where(fn)}) cannot be recorded by reference with the JSON serializer; "
            "use a module-level function, or Options(serializer='dill', signing_key=...)")
    if "<locals>" in qualname:
        raise TargetError(
            f"local function {qualname!r} ({_where(fn)}) cannot be recorded by reference with the JSON "
            "serializer; move it to module level, or use Options(serializer='dill', signing_key=...)")
    ref = f"{fn.__module__}:{qualname}"
    _check_importable(ref, fn)
    return ref


def _where(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else repr(fn)


def _check_importable(ref: str, fn: Any) -> None:
    found = _check_lookup(ref)
    if getattr(found, "__func__", found) is not getattr(fn, "__func__", fn):
        raise TargetError(f"{ref} does not resolve to {fn!r} when imported; it cannot be recorded by reference")


def _check_lookup(ref: str) -> Any:
    module = ref.split(":", 1)[0]
    if module == "__main__":
        raise TargetError(
            f"{ref} is defined in the __main__ script, which worker processes cannot import by "
            "name; move it into an importable module")
    try:
        return _lookup(ref)
    except Exception as exc:
        raise TargetError(f"{ref} cannot be imported by reference: {exc}") from None


def _lookup(ref: str) -> Any:
    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
        if inspect.ismodule(obj):   # "mod:os.system" would reach past the module it names
            raise TaskRefused(f"target {ref} is refused: {part} is a module, not something defined in {module_name}")
    return obj


ANY_ARGUMENTS = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                                   inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


@dataclass(frozen=True)
class Target:
    """A resolved reference: how to get the callable, and what its parameters want."""

    ref: str
    owner: type | None           # set when the target is an instance method to resolve
    function: Callable[..., Any]  # the function (unbound for instance methods)
    signature: inspect.Signature  # without self and without the context parameter
    hints: dict[str, Any]
    context_param: str | None     # parameter that receives the TaskContext
    is_coroutine: bool

    def bind(self, resolver: Callable[[type], Any]) -> Callable[..., Any]:
        if self.owner is None:
            return self.function
        return getattr(resolver(self.owner), self.function.__name__)


@functools.lru_cache(maxsize=4096)
def resolve(ref: str, allowed: tuple[str, ...] | None = None) -> Target:
    """Import and inspect a reference once; raise TaskLoadError if it is gone, TaskRefused
    (before importing anything) if the deny-list or the allow-list ``allowed`` refuses it."""
    why = refusal(ref, allowed) or _qualname_refusal(ref)
    if why:
        raise TaskRefused(why)
    try:
        obj = _lookup(ref)
    except TaskRefused:
        raise
    except Exception as exc:
        raise TaskLoadError(f"target {ref} cannot be imported: {type(exc).__name__}: {exc}") from None
    why = object_refusal(obj, allowed) or _reexport_refusal(ref)
    if why:
        raise TaskRefused(f"target {ref} is refused: {why}")
    owner = None
    module_name, _, qualname = ref.partition(":")
    if "." in qualname:
        parent = _lookup(f"{module_name}:{qualname.rsplit('.', 1)[0]}")
        if isinstance(parent, type):
            static = inspect.getattr_static(parent, qualname.rsplit(".", 1)[1])
            if inspect.isfunction(static):
                owner = parent
    if not callable(obj):
        raise TaskLoadError(f"target {ref} is not callable")
    return describe(ref, obj, owner)


def _qualname_refusal(ref: str) -> str | None:
    """A reference names a callable defined in its module: no dunder attributes (``__globals__``,
    ``__builtins__``...) on the way to it."""
    if any(p.startswith("__") and p.endswith("__") for p in ref.partition(":")[2].split(".")):
        return f"target {ref} is refused: it reaches through a dunder attribute"
    return None


def object_refusal(obj: Any, allowed: tuple[str, ...] | None = None) -> str | None:
    """Why a resolved callable may not run, judged by the module it really lives in (its
    ``__module__``), not by the reference: a function of a denied module, or of a module outside
    Options.allowed_modules, re-exported under an allowed name (``from shutil import rmtree``)."""
    real = getattr(obj, "__module__", None)
    if not isinstance(real, str):
        # a built-in method bound to some object (a module global's CONFIG.update): no module
        # defines it, so neither list can judge it, and no task is one
        owner = getattr(obj, "__self__", None)
        what = f"a built-in method of a {type(owner).__name__} object" if owner is not None else repr(obj)[:80]
        return f"it is {what}, which no module defines; a task is a function, or a method of a class"
    name = f"{real}.{getattr(obj, '__qualname__', '?')}"
    if _denied(real):
        return f"it is {name}, in module {real} (coretask's deny-list)"
    if allowed is not None and not _in(real, allowed):
        return f"it is {name}; module {real} is not in Options.allowed_modules {list(allowed)}"
    return None


def _reexport_refusal(ref: str) -> str | None:
    """A reference names what its module defines: a function or class that another module
    defines, imported into this one, is a re-export, and refused (enqueue records every callable
    under the module that defines it, so only a hand-written reference meets this)."""
    module_name, _, qualname = ref.partition(":")
    top = getattr(importlib.import_module(module_name), qualname.split(".")[0], None)
    real = getattr(top, "__module__", None)
    if (inspect.isfunction(top) or inspect.isbuiltin(top) or isinstance(top, type)) \
            and isinstance(real, str) and real != module_name:
        return (f"{qualname.split('.')[0]} is defined in module {real} and only re-exported by "
                f"{module_name}; a task must name the module that defines it")
    return None


def describe(ref: str, obj: Callable[..., Any], owner: type | None = None) -> Target:
    from .context import TaskContext

    func = getattr(obj, "__func__", obj)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        # a callable whose signature cannot be read (time.sleep and other built-ins): any
        # arguments are accepted at enqueue; the call itself says whether they fit
        sig = ANY_ARGUMENTS
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        hints = {}
    params = list(sig.parameters.values())
    if owner is not None and params and params[0].name in ("self", "this"):
        params = params[1:]
    ctx = next((p.name for p in params
                if hints.get(p.name) is TaskContext or (p.name == "ctx" and p.name not in hints)), None)
    if ctx is not None:
        params = [p for p in params if p.name != ctx]
    return Target(ref=ref, owner=owner, function=func if owner is not None else obj,
                  signature=sig.replace(parameters=params), hints=hints, context_param=ctx,
                  is_coroutine=inspect.iscoroutinefunction(func))
