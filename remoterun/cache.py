"""Fingerprints of code and arguments: what decides that a cached run still fits a call.

The argument fingerprint hashes each bound parameter on its own, so a mismatch can name
the parameter that differs. Values of common built-in types are encoded canonically (a
set hashes the same whatever the hash seed); other objects by their cloudpickle bytes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import struct
import types
from typing import Any, Callable, Iterable

import cloudpickle

from .errors import SerializationError

_DIGEST_SIZE = 16


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=_DIGEST_SIZE)


# --------------------------------------------------------------------------- values


def _encode(obj: Any, out: Any, depth: int = 0) -> None:
    """Feed a canonical encoding of ``obj`` to the hash ``out``."""
    if depth > 200:
        raise ValueError("nested too deeply to fingerprint")
    t = type(obj)
    if obj is None or t is bool:
        out.update(b"N" if obj is None else (b"T" if obj else b"F"))
    elif t is int:
        out.update(b"i" + str(obj).encode() + b";")
    elif t is float:
        out.update(b"f" + struct.pack("!d", obj))
    elif t is complex:
        out.update(b"c" + struct.pack("!dd", obj.real, obj.imag))
    elif t is str:
        data = obj.encode("utf-8", "surrogatepass")
        out.update(b"s" + str(len(data)).encode() + b":" + data)
    elif t in (bytes, bytearray):
        out.update(b"b" + str(len(obj)).encode() + b":" + bytes(obj))
    elif t in (list, tuple):
        out.update((b"l" if t is list else b"t") + str(len(obj)).encode() + b"[")
        for item in obj:
            _encode(item, out, depth + 1)
        out.update(b"]")
    elif t is dict:
        items = sorted(((_digest(k, depth + 1), v) for k, v in obj.items()), key=_first)
        out.update(b"d" + str(len(items)).encode() + b"{")
        for key_digest, value in items:
            out.update(key_digest)
            _encode(value, out, depth + 1)
        out.update(b"}")
    elif t in (set, frozenset):
        digests = sorted(_digest(item, depth + 1) for item in obj)
        out.update((b"S" if t is set else b"Z") + str(len(digests)).encode() + b"{")
        for d in digests:
            out.update(d)
        out.update(b"}")
    else:
        data = cloudpickle.dumps(obj)
        out.update(b"p" + str(len(data)).encode() + b":" + data)


def _first(pair: tuple[bytes, Any]) -> bytes:
    return pair[0]


def _digest(obj: Any, depth: int = 0) -> bytes:
    h = _hasher()
    _encode(obj, h, depth)
    return h.digest()


def value_fingerprint(obj: Any) -> str:
    """A stable hex digest of one value."""
    return _digest(obj).hex()


# --------------------------------------------------------------------------- arguments


@functools.lru_cache(maxsize=512)
def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def bind_arguments(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map a call's arguments to parameter names, defaults applied.

    Falls back to positional indices when the signature cannot be read or bound.
    """
    try:
        bound = _signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        params = {f"args[{i}]": a for i, a in enumerate(args)}
        params.update(kwargs)
        return params
    bound.apply_defaults()
    return dict(bound.arguments)


def argument_fingerprint(
    fn: Callable, args: tuple, kwargs: dict, *, ignore: Iterable[str] = ()
) -> dict[str, Any]:
    """``{"args": hex, "params": {name: hex}}`` for a call of ``fn``.

    Raises SerializationError naming the argument that cannot be fingerprinted.
    """
    ignored = set(ignore)
    params: dict[str, str] = {}
    for name, value in bind_arguments(fn, args, kwargs).items():
        if name in ignored:
            continue
        try:
            params[name] = value_fingerprint(value)
        except Exception as exc:
            raise SerializationError(
                f"argument {name!r} of {getattr(fn, '__qualname__', fn)!r} cannot be "
                f"fingerprinted ({type(value).__name__}: {exc}); leave it out with "
                f"ignore=[{name!r}]. Nothing was started."
            ) from exc
    total = _hasher()
    for name in sorted(params):
        total.update(name.encode() + b"=" + bytes.fromhex(params[name]))
    return {"args": total.hexdigest(), "params": params}


# --------------------------------------------------------------------------- code


def _code_digest(code: types.CodeType, out: Any, skip_doc: bool) -> None:
    out.update(code.co_code)
    out.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    consts = code.co_consts
    if skip_doc and consts and isinstance(consts[0], str):
        consts = consts[1:]
    for const in consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, out, skip_doc=True)
        else:
            out.update(repr(const).encode())


def code_fingerprint(fn: Callable) -> str:
    """A digest of the function's own bytecode: comments, docstring and line numbers do
    not count, anything else in the function's body does."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    h = _hasher()
    if code is None:
        h.update(f"{type(fn).__module__}.{type(fn).__qualname__}".encode())
    else:
        h.update(f"{fn.__module__}.{fn.__qualname__}".encode())
        _code_digest(code, h, skip_doc=fn.__doc__ is not None)
    return h.hexdigest()
