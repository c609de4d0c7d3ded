"""Call encoding: turning ``fn(*args, **kwargs)`` into bytes at enqueue and back in a worker.

JSON is the default because it is safe (no code runs when a payload is read) and inspectable.
Values JSON lacks are written in their natural text form (ISO dates, UUID and Decimal strings,
Enum values, dataclasses as objects) and revived from the target's type annotations, so a
parameter annotated ``datetime`` receives a ``datetime`` again. ``dill`` is an opt-in that also
carries lambdas, closures and arbitrary objects.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import enum
import importlib
import inspect
import json
import types
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

from .errors import PayloadTooLarge, SerializationError, TargetError, TaskLoadError, TaskRefused
from .targets import Target, describe, object_refusal, reference_of, refusal, resolve

__all__ = ["Call", "TaskData", "Serializer", "call", "Encoded", "encode", "decode", "with_headers", "read_headers"]


@dataclasses.dataclass(frozen=True)
class Call:
    """A call to run later. ``coretask.call(fn, ...)`` builds one when a keyword argument of
    ``fn`` collides with an enqueue option: ``retries``, ``delay_until``, ``key``, ``key_ttl``,
    ``timeout``, ``keep_result``
    (and ``queue`` for batch.enqueue)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
    return Call(fn, args, kwargs)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The low-level form: opaque bytes under a topic, handled by ``Options.execute(ctx)``."""

    topic: str
    data: bytes


class Serializer(Protocol):
    name: str

    def dumps(self, call: Call) -> bytes: ...
    def loads(self, payload: bytes) -> Call: ...


@dataclasses.dataclass(frozen=True)
class Encoded:
    payload: bytes
    serializer: str
    target: str


# ---------------------------------------------------------------------------------------- JSON

def _to_json(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, Decimal)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be carried by JSON")


# One encoder for every call: json.dumps with any option builds a new JSONEncoder per call,
# which costs more than encoding a small call does.
_dumps = json.JSONEncoder(default=_to_json, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps_value(value: Any) -> str:
    """One value as JSON, with the same extensions as arguments (dates, UUID, Decimal, Enum,
    dataclasses); TypeError / ValueError for what JSON cannot carry (coretask/results.py)."""
    return _dumps(value)


def revive(value: Any, tp: Any) -> Any:
    """Turn a JSON value back into the type an annotation names (best effort, never raises
    for values that are already right)."""
    if value is None or tp is Any or tp is None:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            if member is type(None):
                continue
            try:
                return revive(value, member)
            except (TypeError, ValueError):
                continue
        return value
    args = typing.get_args(tp)
    if origin in (list, set, frozenset) and isinstance(value, list):
        return origin(revive(v, args[0]) if args else v for v in value)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(revive(v, args[0]) for v in value)
        return tuple(revive(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {_revive_key(k, args[0]): revive(v, args[1]) for k, v in value.items()}
    if not isinstance(tp, type) or isinstance(value, tp) and not (tp is dt.date and isinstance(value, str)):
        return value
    if issubclass(tp, dt.datetime):
        return dt.datetime.fromisoformat(value)
    if issubclass(tp, dt.date):
        return dt.date.fromisoformat(value)
    if issubclass(tp, dt.time):
        return dt.time.fromisoformat(value)
    if issubclass(tp, (uuid.UUID, Decimal)):
        return tp(value)
    if issubclass(tp, enum.Enum):
        return tp(value)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return tp(**{k: revive(v, hints.get(k, Any)) for k, v in value.items()})
    if tp in (set, frozenset, tuple) and isinstance(value, list):
        return tp(value)
    return value


def _revive_key(key: Any, tp: Any) -> Any:
    """A dict key as its annotation names it: JSON wrote it as a string (1 -> "1")."""
    if tp in (int, float) and isinstance(key, str):
        try:
            return tp(key)
        except ValueError:
            return key
    return revive(key, tp)


class JsonSerializer:
    name = "json"

    def dumps(self, call: Call) -> bytes:
        return encode(call, self, 1 << 62).payload

    def loads(self, payload: bytes) -> Call:
        raise NotImplementedError("the JSON payload is decoded by decode()")


def _sets_listed(ref: str, call: Call) -> Call | None:
    """``call`` with each set or frozenset argument whose parameter is annotated as one written
    as a (sorted) list, which revive turns back into the set at run time; None when there is
    none. A set for any other parameter stays refused: it would arrive as a list."""
    try:
        target = resolve(ref)
        bound = target.signature.bind_partial(*call.args, **call.kwargs)
    except Exception:
        return None
    listed = {name: _as_list(value) for name, value in bound.arguments.items()
              if isinstance(value, (set, frozenset)) and _names_a_set(target.hints.get(name))}
    if not listed:
        return None
    bound.arguments.update(listed)
    return Call(call.fn, bound.args, bound.kwargs)


def _names_a_set(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_names_a_set(member) for member in typing.get_args(hint))
    return hint in (set, frozenset) or origin in (set, frozenset)


def _as_list(value: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(value)             # the same set is written the same way
    except TypeError:
        return list(value)


def _blame(ref: str, call: Call) -> None:
    """Find the argument JSON cannot carry and raise an error that names it."""
    try:
        target = resolve(ref)
        bound = target.signature.bind_partial(*call.args, **call.kwargs).arguments
    except Exception:
        bound = {**{f"#{i}": a for i, a in enumerate(call.args)}, **call.kwargs}
    for name, value in bound.items():
        try:
            _dumps(value)
        except (TypeError, ValueError) as exc:
            hint = ", annotate the parameter set[...]" if isinstance(value, (set, frozenset)) else ""
            raise SerializationError(
                f"argument {name!r} of {ref} cannot be serialized as JSON: {exc} "
                f"(value {value!r:.80}); pass plain data{hint}, or use "
                "Options(serializer='dill', signing_key=...)") from None


class DillSerializer:
    name = "dill"

    def dumps(self, call: Call) -> bytes:
        import io
        import sys

        import dill

        def save_module(pickler: Any, module: types.ModuleType) -> None:
            # dill copies the whole state of a module outside site-packages (the user's own
            # modules) into the payload, sockets included, and writes it over the worker's
            # module on load; an imported module travels by name instead.
            if module.__name__ != "__main__" and sys.modules.get(module.__name__) is module:
                pickler.save_reduce(importlib.import_module, (module.__name__,), obj=module)
            else:
                default_save_module(pickler, module)

        default_save_module = dill.Pickler.dispatch[types.ModuleType]
        buf = io.BytesIO()
        try:
            pickler = dill.Pickler(buf, recurse=True)
            pickler.dispatch = type(dill.Pickler.dispatch)(dill.Pickler.dispatch)
            pickler.dispatch[types.ModuleType] = save_module
            pickler.dump((call.fn, call.args, call.kwargs))
            return buf.getvalue()
        except Exception as exc:
            raise SerializationError(f"dill cannot serialize the call to {call.fn!r}: {exc}") from None

    def loads(self, payload: bytes) -> Call:
        import dill
        fn, args, kwargs = dill.loads(payload)
        return Call(fn, tuple(args), dict(kwargs))


BUILTIN: dict[str, Any] = {"json": JsonSerializer(), "dill": DillSerializer()}


def serializer_for(option: str | Serializer) -> Serializer:
    return BUILTIN[option] if isinstance(option, str) else option


# ------------------------------------------------------------------------------ encode / decode

def encode(call: Call | TaskData, serializer: Serializer, max_bytes: int,
           allowed: tuple[str, ...] | None = None) -> Encoded:
    """Encode at enqueue; every refusal happens here, before anything reaches Redis.
    ``allowed``: Options.allowed_modules (the deny-list applies always)."""
    if isinstance(call, TaskData):
        if not isinstance(call.data, (bytes, bytearray)):
            raise SerializationError(f"TaskData.data must be bytes, got {type(call.data).__name__}")
        enc = Encoded(bytes(call.data), "raw", f"topic:{call.topic}")
    else:
        if not callable(call.fn):
            raise TargetError(f"{call.fn!r} is not callable")
        if serializer.name == "json":
            target = reference_of(call.fn)
            _check_policy(target, call.fn, allowed)
            _check_binding(target, call)
            _check_json_keys(target, call)
            try:
                payload = _dumps({"t": target, "a": call.args, "k": call.kwargs}).encode()
            except (TypeError, ValueError):
                listed = _sets_listed(target, call)       # a set whose parameter says set[...]
                try:
                    if listed is None:
                        raise
                    payload = _dumps({"t": target, "a": listed.args, "k": listed.kwargs}).encode()
                except (TypeError, ValueError):
                    _blame(target, listed or call)
                    raise
        else:
            payload = serializer.dumps(call)
            try:
                target = reference_of(call.fn)
            except TargetError:
                target = f"{getattr(call.fn, '__module__', '?')}:{getattr(call.fn, '__qualname__', repr(call.fn))}"
            _check_policy(target, call.fn, allowed)
        enc = Encoded(payload, serializer.name, target)
    if len(enc.payload) > max_bytes:
        raise PayloadTooLarge(
            f"the encoded call to {enc.target} is {len(enc.payload)} bytes, over max_payload_bytes="
            f"{max_bytes}; store large data elsewhere and pass a reference to it")
    return enc


def _check_policy(ref: str, fn: Any, allowed: tuple[str, ...] | None) -> None:
    why = refusal(ref, allowed) or object_refusal(fn, allowed)
    if why:
        raise TargetError(why if why.startswith("target ") else f"target {ref} is refused: {why}")


_BOUND_SHAPES: set[tuple[str, int, tuple[str, ...]]] = set()


def _check_binding(ref: str, call: Call) -> None:
    """Refuse arguments that do not fit the signature. Whether they fit depends only on how many
    positional arguments there are and which keywords, so each shape is checked once."""
    shape = (ref, len(call.args), tuple(call.kwargs))
    if shape in _BOUND_SHAPES:
        return
    target = resolve(ref)
    try:
        target.signature.bind(*call.args, **call.kwargs)
    except TypeError as exc:
        raise SerializationError(f"arguments do not match {ref}{target.signature}: "
                                 f"{_unexpected_keywords(target.signature, call.kwargs) or exc}") from None
    if len(_BOUND_SHAPES) < 100_000:
        _BOUND_SHAPES.add(shape)


def _unexpected_keywords(sig: inspect.Signature, kwargs: dict[str, Any]) -> str:
    """A misspelt keyword, said first: Signature.bind reports the parameter it leaves missing
    ("missing a required argument: 'b'") before the keyword nobody takes."""
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ""
    takes = [n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY
             and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    out = []
    for name in kwargs:
        if name not in takes:
            close = difflib.get_close_matches(name, takes, n=1, cutoff=0.6)
            out.append(f"unexpected keyword argument {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(out)


def _check_json_keys(ref: str, call: Call) -> None:
    """JSON writes every dict key as a string: {1: "a"} would reach the task as {"1": "a"}, and
    d[1] fail there, far from the enqueue. Refused here, unless the parameter's annotation
    names the key type (dict[int, str]: revive turns the keys back). Arguments without a
    container (the usual call) cost one isinstance each."""
    if not any(isinstance(v, _CONTAINERS) for v in call.args) and \
            not any(isinstance(v, _CONTAINERS) for v in call.kwargs.values()):
        return
    target = resolve(ref)
    names = [p.name for p in target.signature.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for i, value in enumerate(call.args):
        name = names[i] if i < len(names) else f"#{i}"
        _check_keys(ref, name, value, target.hints.get(name))
    for name, value in call.kwargs.items():
        _check_keys(ref, name, value, target.hints.get(name))


_CONTAINERS = (dict, list, tuple)


def _check_keys(ref: str, name: str, value: Any, hint: Any) -> None:
    if not isinstance(value, _CONTAINERS):
        return      # the usual argument: nothing to walk
    key_type = typing.get_args(hint)[:1] if typing.get_origin(hint) is dict else ()
    if key_type and isinstance(key_type[0], type) and key_type[0] is not str:
        return      # dict[int, ...] (or UUID, date, an Enum): the keys come back as the annotation says
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise SerializationError(
                        f"argument {name!r} of {ref} has a dict key {k!r} of type {type(k).__name__}: JSON "
                        f"writes every key as a string, so the task would get {str(k)!r}; use string keys, "
                        "annotate the parameter (dict[int, ...]) so that the keys come back, or use "
                        "Options(serializer='dill', signing_key=...)")
                if isinstance(item, _CONTAINERS):
                    stack.append(item)
        else:
            stack.extend(item for item in v if isinstance(item, _CONTAINERS))


@dataclasses.dataclass(frozen=True)
class Invocation:
    """A decoded task, ready to run: the target plus revived arguments."""

    target: Target
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


FORMAT_VERSION = 1                   # of the JSON envelope; version 1 is written without "v"
ENVELOPE_FIELDS = frozenset({"t", "a", "k", "v", "h"})
HEADERS_START = b'{"h":'             # an envelope with headers starts with them (with_headers)


def with_headers(enc: Encoded, headers: dict[str, str]) -> Encoded:
    """``enc`` with string ``headers`` (trace context) as field "h" of its JSON envelope, written
    first so that a worker reads them without decoding the arguments (:func:`read_headers`).
    They are part of the payload, so the signature covers them. Other serializers carry no
    headers: ``enc`` is returned as it is."""
    if enc.serializer != "json" or not headers or not enc.payload.startswith(b"{"):
        return enc
    return Encoded(HEADERS_START + _dumps(headers).encode() + b"," + enc.payload[1:], enc.serializer, enc.target)


_raw_decode = json.JSONDecoder().raw_decode


def read_headers(payload: bytes) -> dict[str, str]:
    """The headers of a JSON envelope written by :func:`with_headers`, {} for any other payload
    or for headers that are not an object of strings (they never stop a task from running)."""
    if not payload.startswith(HEADERS_START):
        return {}
    try:
        headers, _ = _raw_decode(payload[len(HEADERS_START):].decode())
    except ValueError:
        return {}
    if not isinstance(headers, dict):
        return {}
    return {k: v for k, v in headers.items() if isinstance(k, str) and isinstance(v, str)}


def _check_format(doc: object) -> None:
    """A JSON envelope this worker can read: an object of version 1 (no "v", or "v": 1) with
    only the fields it knows. A newer producer's task is dead-lettered as unsupported rather
    than misread (a rolling upgrade: retry it once the workers are upgraded)."""
    if not isinstance(doc, dict):
        raise TaskLoadError(f"payload is a JSON {type(doc).__name__}, not a task envelope (an object)")
    version = doc.get("v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise TaskLoadError(f"unsupported task format version {version!r}: this worker reads version "
                            f"{FORMAT_VERSION}; upgrade the worker, then retry the dead task")
    unknown = sorted(set(doc) - ENVELOPE_FIELDS)
    if unknown:
        raise TaskLoadError(f"unsupported task format: fields {unknown} are unknown to this worker (version "
                            f"{FORMAT_VERSION}); upgrade the worker, then retry the dead task")


def decode(payload: bytes, serializer_name: str, serializer: Serializer,
           allowed: tuple[str, ...] | None = None) -> Invocation:
    """Decode in a worker; any failure is a TaskLoadError (the task is dead-lettered). A target
    refused by the deny-list or ``allowed`` is a TaskRefused, raised before its module is imported
    (JSON; a pickle imports what it names while it is loaded: sign it, Options.signing_key)."""
    try:
        if serializer_name == "json":
            doc = json.loads(payload)
            _check_format(doc)
            target = resolve(doc["t"], allowed)
            return Invocation(target, *_revive_args(target, doc.get("a", []), doc.get("k", {})))
        if serializer_name != serializer.name:
            raise TaskLoadError(f"payload written by serializer {serializer_name!r}, but this worker is "
                                f"configured with {serializer.name!r}")
        c = serializer.loads(payload)
        fn = c.fn
        ref = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}"
        why = refusal(ref, allowed) or object_refusal(fn, allowed)
        if why:
            raise TaskRefused(why if why.startswith("target ") else f"target {ref} is refused: {why}")
        return Invocation(describe(ref, fn), tuple(c.args), dict(c.kwargs))
    except TaskLoadError:
        raise
    except Exception as exc:
        raise TaskLoadError(f"payload cannot be decoded ({serializer_name}): {type(exc).__name__}: {exc}") from None


def _revive_args(target: Target, args: list[Any], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not target.hints:
        return tuple(args), kwargs
    names = [p.name for p in target.signature.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    hints = target.hints
    new_args = tuple(revive(a, hints.get(names[i], Any)) if i < len(names) else a for i, a in enumerate(args))
    new_kwargs = {k: revive(v, hints.get(k, Any)) for k, v in kwargs.items()}
    return new_args, new_kwargs
