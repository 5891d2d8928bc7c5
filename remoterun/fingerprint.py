"""Fingerprints of code and arguments: what decides that a cached run still fits a call.

Everything about them is here: the argument fingerprint, the code fingerprint and its
components, the one test of "is this the user's own code?" (:func:`library`, which also
decides what is pickled by value), the name of a ``cache=True`` run, and the comparisons:
``explain``'s in words (:func:`changes`, :class:`Explanation`) and the host's hit or
mismatch (:func:`fingerprint_differences`, defined in the stdlib-only agent, which
cannot import this module, and re-exported here).

The argument fingerprint hashes each bound parameter on its own, so a mismatch can name
the parameter that differs. Values of common built-in types are encoded canonically (a
set hashes the same whatever the hash seed); numpy arrays and pandas frames by content;
a Run by which run (and attempt) it is (found by its ``__remoterun_fingerprint__``,
so that this module imports nothing of the client); other objects by their cloudpickle
bytes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import struct
import sys
import sysconfig
import threading
import types
from typing import Any, Callable, Iterable

import cloudpickle

from .agent import pickling
from .agent.fingerprints import fingerprint_differences as fingerprint_differences
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
        _encode_str(obj, out)
    elif t in (bytes, bytearray):
        # Prefix and data fed apart: the same hash, without a copy of the argument.
        out.update(b"b%d:" % len(obj))
        out.update(obj)
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
    elif hasattr(t, "__remoterun_fingerprint__"):  # a Run: which run, not its bytes
        if depth > 0:
            raise ValueError(
                "a Run inside a list, tuple or dict is not read for the call: pass it as "
                "an argument of its own, or pass run.result()"
            )
        out.update(b"R" + obj.__remoterun_fingerprint__().encode() + b";")
    elif t.__module__.startswith(("numpy", "pandas")) and _encode_by_content(obj, out):
        pass
    else:
        data = cloudpickle.dumps(obj)  # transient: function.py hashes before it pickles
        out.update(b"p%d:" % len(data))
        out.update(data)


# A str longer than this is encoded for hashing a slice at a time.
_STR_SLICE = 1 << 20


def _encode_str(text: str, out: Any) -> None:
    """``s<length of the UTF-8>:<UTF-8>``, without a UTF-8 copy of a long string (UTF-8
    encodes each code point on its own, so slices encode to the whole's bytes)."""
    if len(text) <= _STR_SLICE:
        data = text.encode("utf-8", "surrogatepass")
        out.update(b"s%d:" % len(data))
        out.update(data)
        return
    slices = range(0, len(text), _STR_SLICE)
    if text.isascii():
        size = len(text)
    else:
        size = sum(len(text[i : i + _STR_SLICE].encode("utf-8", "surrogatepass")) for i in slices)
    out.update(b"s%d:" % size)
    for i in slices:
        out.update(text[i : i + _STR_SLICE].encode("utf-8", "surrogatepass"))


def _encode_by_content(obj: Any, out: Any) -> bool:
    """numpy arrays and pandas frames, series and indexes by their content, hashed in
    place without pickling a copy; whether ``obj`` was one. What counts: the type, shape
    and dtype (field names, byte order, units, categories), labels with their types, and
    the values. Object columns and arrays (Python objects inside) go by their pickle.
    Neither library is imported here unless ``obj`` comes from it."""
    name = type(obj).__name__
    module = type(obj).__module__
    if name == "ndarray" and module == "numpy":
        if obj.dtype.hasobject:
            return False
        import numpy

        out.update(f"A{obj.dtype.descr!r}{obj.shape};".encode())
        # Bytes in C order whatever the memory layout; datetime64 has no buffer format.
        out.update(numpy.ascontiguousarray(obj).reshape(-1).view(numpy.uint8))
        return True
    if module.startswith("pandas") and name in ("DataFrame", "Series", "Index"):
        import numpy

        dtypes = list(obj.dtypes) if name == "DataFrame" else [obj.dtype]
        if any(isinstance(d, numpy.dtype) and d.kind == "O" for d in dtypes):
            return False  # Python objects: hash_pandas_object would see 1 and "1" alike
        try:
            first = _row_hashes(obj, 0)
        except TypeError:
            return False
        out.update(f"P{name}{obj.shape};".encode())
        _encode([repr(dtype) for dtype in dtypes], out)
        if name == "DataFrame":
            _encode(obj.columns, out)
        _encode(getattr(obj, "name", None) if name != "DataFrame" else None, out)
        if name != "Index":
            _encode(obj.index, out)
        _encode(list(getattr(obj, "names", None) or ()), out)
        # Each row hashes on its own: a slice at a time feeds the same bytes as the
        # whole, without hash arrays the size of the frame.
        out.update(first)
        for start in range(_ROW_SLICE, len(obj), _ROW_SLICE):
            out.update(_row_hashes(obj, start))
        return True
    return False


# pandas objects are hashed this many rows at a time (8 bytes of hash per row).
_ROW_SLICE = 1 << 16


def _row_hashes(obj: Any, start: int) -> Any:
    """The bytes of the row hashes of rows ``start`` to ``start + _ROW_SLICE``."""
    import pandas

    rows = (
        obj[start : start + _ROW_SLICE]
        if type(obj).__name__ == "Index"
        else obj.iloc[start : start + _ROW_SLICE]
    )
    return pandas.util.hash_pandas_object(rows, index=False).to_numpy().view("uint8")


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


@functools.lru_cache(maxsize=512)
def _spread_parameters(fn: Callable) -> frozenset[str]:
    """The names of ``fn``'s ``*args`` and ``**kwargs`` parameters."""
    try:
        parameters = _signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    spread = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return frozenset(p.name for p in parameters if p.kind in spread)


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
    spread = _spread_parameters(fn)
    for name, value in bind_arguments(fn, args, kwargs).items():
        if name in ignored:
            continue
        try:
            # The items of *args and **kwargs are arguments in their own right.
            params[name] = _digest(value, -1 if name in spread else 0).hex()
        except Exception as exc:
            raise SerializationError(
                f"argument {name!r} of {getattr(fn, '__qualname__', fn)!r} cannot be "
                f"fingerprinted ({type(value).__name__}: {exc}); leave it out with "
                f"ignore=[{name!r}] (and bump version= when what it holds changes). "
                "Nothing was started."
            ) from exc
    total = _hasher()
    for name in sorted(params):
        total.update(name.encode() + b"=" + bytes.fromhex(params[name]))
    return {"args": total.hexdigest(), "params": params}


# --------------------------------------------------------------------------- library or user code


@functools.lru_cache(maxsize=1)
def library_prefixes() -> tuple[str, ...]:
    """Folders of installed code: the stdlib and site-packages of this interpreter."""
    paths = sysconfig.get_paths()
    prefixes = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    prefixes |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(os.path.realpath(p) + os.sep for p in prefixes if p)


_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))

# module name -> library(module name), for the modules that are loaded: one that is not
# imported yet counts as the user's own until it is.
_libraries: dict[str, str | None] = {}


def library(module_name: str) -> str | None:
    """``"<package> <version>"`` when ``module_name`` is library code, else None.

    This is the one answer to "is this the user's own code?", for the code fingerprint
    (library code counts by version and is not looked into) and for pickling (the
    user's own packages travel by value). Library code: the stdlib and ``builtins``,
    remoterun itself, a module loaded from this interpreter's installed folders
    (:func:`library_prefixes`), or one loaded without a file (``"<package> builtin"``).
    The user's own: ``__main__``, a module loaded from anywhere else, or one not loaded.
    """
    try:
        return _libraries[module_name]
    except KeyError:
        pass
    top = module_name.split(".")[0]
    module = sys.modules.get(module_name)
    if top in ("builtins", "remoterun") or top in _STDLIB:
        found: str | None = f"{top} {_version_of(top)}"
    elif module_name == "__main__" or module is None:
        return None
    else:
        path = getattr(module, "__file__", None)
        if not path:
            found = f"{top} builtin"
        elif os.path.realpath(path).startswith(library_prefixes()):
            found = f"{top} {_version_of(top)}"
        else:
            found = None
    if module is not None:
        _libraries[module_name] = found
    return found


def _version_of(top: str) -> str:
    if top in _STDLIB or top == "builtins":
        return "python " + ".".join(map(str, sys.version_info[:2]))
    version = getattr(sys.modules.get(top), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib import metadata

        return metadata.version(top)
    except Exception:
        return "?"


# module name -> user_package(module name), for the modules that are loaded (asked at
# every call that pickles a function or its arguments).
_user_packages: dict[str, str | None] = {}


def user_package(module_name: str | None) -> str | None:
    """The top-level package of a loaded module of the user's own (see :func:`library`),
    to be pickled by value; None for library code, ``__main__`` (cloudpickle sends it by
    value anyway) and modules not loaded."""
    if not module_name or module_name == "__main__":
        return None
    try:
        return _user_packages[module_name]
    except KeyError:
        pass
    if module_name not in sys.modules:  # may be imported later
        return None
    top = module_name.split(".")[0]
    package = top if library(module_name) is None and top in sys.modules else None
    _user_packages[module_name] = package
    return package


def user_packages(*objects: Any) -> set[str]:
    """User packages that ``objects`` come from or refer to (one level deep), so that
    they can be pickled by value and need not be installed on the executing host."""
    found: set[str] = set()
    for obj in objects:
        target = inspect.unwrap(obj) if callable(obj) else obj
        candidates = [getattr(target, "__module__", None), type(target).__module__]
        code = getattr(target, "__code__", None)
        globals_ = getattr(target, "__globals__", {})
        if code is not None:
            for name in _names(code, free=False):
                value = globals_.get(name)
                if isinstance(value, types.ModuleType):
                    candidates.append(value.__name__)
                elif value is not None:
                    candidates.append(getattr(value, "__module__", None))
        for module_name in candidates:
            package = user_package(module_name if isinstance(module_name, str) else None)
            if package:
                found.add(package)
    return found


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


@functools.lru_cache(maxsize=4096)
def _own_digest(code: types.CodeType, skip_doc: bool) -> str:
    h = _hasher()
    _code_digest(code, h, skip_doc)
    return h.hexdigest()


_SIMPLE = (int, float, complex, str, bytes, bool, type(None), frozenset, tuple, list, dict, set)


class _Walk:
    """What a function's code reaches: each user function and class by its normalised
    code, module-level constants by value, library code by package and version."""

    def __init__(self) -> None:
        self.components: dict[str, str] = {}
        self._seen: set[int] = set()

    def visit(self, obj: Any, where: str = "") -> None:
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        if isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    self.visit(part)
            return
        if isinstance(obj, functools.partial):
            self.visit(obj.func)
            self._value(f"{where}<partial args>", (obj.args, obj.keywords))
            return
        if id(obj) in self._seen:
            return
        if isinstance(obj, types.FunctionType):
            self._seen.add(id(obj))
            self._function(obj)
        elif isinstance(obj, type):
            self._seen.add(id(obj))
            self._class(obj)
        elif isinstance(obj, types.ModuleType):
            self._library(obj.__name__)
        elif isinstance(obj, types.BuiltinFunctionType):
            self._library(getattr(obj, "__module__", None) or "builtins")

    def _library(self, module: str) -> bool:
        """Record library code by package and version; whether ``module`` is library code."""
        label = library(module)
        if label is not None:
            self.components[f"lib:{label.split()[0]}"] = label
        return label is not None

    def _function(self, fn: types.FunctionType) -> None:
        module = fn.__module__ or "?"
        if self._library(module):
            return
        key = f"{module}.{fn.__qualname__}"
        code = fn.__code__
        self.components[key] = _own_digest(code, fn.__doc__ is not None)
        defaults = (fn.__defaults__, fn.__kwdefaults__)
        if defaults != (None, None):
            self._value(f"{key}<defaults>", defaults)
        names = set(_names(code))
        globals_ = fn.__globals__
        for name in sorted(names):
            if name not in globals_:
                continue
            value = globals_[name]
            if isinstance(value, types.ModuleType) and library(value.__name__) is None:
                # A module of the user's own: follow the attributes the code reads.
                for attr in sorted(names):
                    if attr in vars(value):
                        self._global(value.__name__, attr, vars(value)[attr])
            else:
                self._global(module, name, value)
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            self._global(module, f"{fn.__qualname__}<closure {i}>", value)

    def _class(self, cls: type) -> None:
        module = cls.__module__ or "?"
        if self._library(module):
            return
        key = f"{module}.{cls.__qualname__}"
        bases = [f"{b.__module__}.{b.__qualname__}" for b in cls.__bases__]
        self.components[key] = _digest((bases, sorted(vars(cls)))).hex()
        for base in cls.__bases__:
            self.visit(base)
        for name, attr in sorted(vars(cls).items()):
            dunder = name.startswith("__") and name.endswith("__")
            if isinstance(attr, (types.FunctionType, staticmethod, classmethod, property)):
                self.visit(attr)
            elif isinstance(attr, _SIMPLE) and not dunder:  # __module__, __doc__: not code
                self._value(f"{key}.{name}", attr)

    def _global(self, module: str, name: str, value: Any) -> None:
        if isinstance(value, (types.FunctionType, type, types.ModuleType, functools.partial)):
            self.visit(value, f"{module}.{name}")
        elif isinstance(value, (types.BuiltinFunctionType, types.MethodType)):
            self.visit(value)
        elif isinstance(value, _SIMPLE):
            self._value(f"{module}.{name}", value)
        else:  # an instance: its class's code counts, not its state
            self.visit(type(value))

    def _value(self, key: str, value: Any) -> None:
        try:
            self.components[key] = value_fingerprint(value)
        except Exception:
            self.components[key] = f"unhashable {type(value).__qualname__}"


def _names(code: types.CodeType, free: bool = True) -> Iterable[str]:
    """The global (and with ``free``, closure) names that ``code`` and its nested code read."""
    yield from code.co_names
    if free:
        yield from code.co_freevars
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const, free)


def code_components(fn: Callable) -> dict[str, str]:
    """``{component: digest}`` of everything the function's code reaches, transitively:
    ``module.qualname`` of each user function and class (bytecode, names and constants;
    comments, docstrings and line numbers do not count), ``module.NAME`` of each
    module-level constant it reads (by value), and ``lib:<package>`` (by version) for
    stdlib and installed code, which is not looked into."""
    walk = _Walk()
    target = inspect.unwrap(fn)
    if not isinstance(target, (types.FunctionType, type, functools.partial)):
        target = type(target)  # a callable instance: its class's code
    walk.visit(target)
    return walk.components


def code_fingerprint(fn: Callable, components: dict[str, str] | None = None) -> str:
    """One digest of :func:`code_components`, named after the function itself, so that
    identical functions in two modules do not share cached runs."""
    target = inspect.unwrap(fn)
    parts = code_components(target) if components is None else components
    h = _hasher()
    name = getattr(target, "__qualname__", type(target).__qualname__)
    h.update(f"{getattr(target, '__module__', '?')}.{name}\n".encode())
    for key in sorted(parts):
        h.update(f"{key}={parts[key]}\n".encode())
    return h.hexdigest()


def code_record(fn: Callable, version: str | None) -> dict[str, Any]:
    """The code's part of a run's recorded fingerprint: ``{"code", "version"}`` when
    ``version=`` stands for the code, else ``{"code", "components"}`` (what ``explain``
    names when they change)."""
    if version is not None:
        return {"code": _code(fn, version), "version": version}
    components = code_components(fn)
    return {"code": _code(fn, version, components), "components": components}


def cached_run_name(
    prefix: str, fn: Callable, version: str | None, arguments: dict[str, Any]
) -> str:
    """The run name of a ``cache=True`` call without ``run_name``: ``<prefix>-<digest>``
    of the code (or ``version``) and of ``arguments``, the call's
    :func:`argument_fingerprint`."""
    digest = hashlib.blake2b(
        (_code(fn, version) + arguments["args"]).encode(), digest_size=6
    ).hexdigest()
    return f"{prefix}-{digest}"


def _code(fn: Callable, version: str | None, components: dict[str, str] | None = None) -> str:
    """The code fingerprint: of ``version`` when given, else of everything the
    function's code reaches (computed at each call, so that an edited helper counts;
    each function's own part is cached per code object)."""
    if version is not None:
        return hashlib.blake2b(f"version:{version}".encode(), digest_size=16).hexdigest()
    return code_fingerprint(fn, components)


# --------------------------------------------------------------------------- comparing


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two recorded fingerprints, in words (``explain``'s reasons).

    Whether the host takes a recorded run as a hit is :func:`fingerprint_differences`.
    """
    reasons = []
    if old.get("version") != new.get("version"):
        reasons.append(f"version: {old.get('version')!r} -> {new.get('version')!r}")
    before, after = old.get("components"), new.get("components")
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(before.keys() | after.keys()):
            if key not in before:
                reasons.append(f"code: {key} is new")
            elif key not in after:
                reasons.append(f"code: {key} is no longer used")
            elif before[key] != after[key]:
                what = "value" if not key.startswith("lib:") else "version"
                kind = "changed" if what == "value" else f"{before[key]} -> {after[key]}"
                reasons.append(f"code: {key} {kind}")
    elif old.get("code") != new.get("code") and "version" not in new:
        reasons.append("code: changed (the earlier run recorded no details)")
    old_params, new_params = old.get("params") or {}, new.get("params") or {}
    for key in sorted(old_params.keys() | new_params.keys()):
        if old_params.get(key) != new_params.get(key):
            reasons.append(f"argument {key!r} differs")
    return reasons


class Explanation:
    """What ``fn.explain(...)`` found: ``hit``, the ``run_name`` the call would use, the
    run it was compared with (``compared_to``) and the ``reasons`` for a miss."""

    def __init__(self, hit: bool, run_name: str, compared_to: str | None, reasons: list[str]):
        self.hit = hit
        self.run_name = run_name
        self.compared_to = compared_to
        self.reasons = reasons

    def __bool__(self) -> bool:
        return self.hit

    def __repr__(self) -> str:
        return f"<Explanation hit={self.hit} run_name={self.run_name!r} reasons={self.reasons}>"

    def __str__(self) -> str:
        if self.hit:
            return f"hit: run {self.run_name!r} at {self.compared_to}"
        against = f" (against {self.compared_to})" if self.compared_to else ""
        lines = [f"miss: run {self.run_name!r} would execute{against}"]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def explain(
    run_name: str,
    wanted: dict[str, Any],
    *,
    completed: Any,
    runs: Callable[[], Iterable[Any]],
    fn_name: str,
    fn_qualname: str,
    with_arguments: bool,
) -> Explanation:
    """Whether a call recording the fingerprint ``wanted`` under ``run_name`` is a hit.

    ``completed`` is the COMPLETED run of that name (None if there is none): a hit unless
    an argument differs (only asked when the call has arguments). On a miss ``runs()``
    is listed once and the call is compared with the latest COMPLETED run of the same
    function (``fn_name`` and ``fn_qualname``). Runs are read through ``.config`` and
    ``.url`` only.
    """
    if completed is not None:
        reasons = changes(completed.config.fingerprint, wanted)
        if not any(r.startswith("argument") for r in reasons) or not with_arguments:
            return Explanation(True, run_name, completed.url, [])
    earlier = [
        r
        for r in runs()
        if r.config.fn_name == fn_name
        and r.config.status == "COMPLETED"
        # the same function, not another of the same name (older records lack it)
        and r.config.get("fn_qualname", fn_qualname) == fn_qualname
    ]
    if not earlier:
        return Explanation(False, run_name, None, [f"no earlier COMPLETED run of {fn_name}"])
    nearest = max(earlier, key=lambda r: r.config.end_time or "")
    reasons = changes(nearest.config.fingerprint, wanted)
    return Explanation(False, run_name, nearest.url, reasons or ["the run name differs"])


# --------------------------------------------------------------------------- pickling

_by_value_lock = threading.Lock()


def dumps_by_value(
    obj: Any, fn: Callable, what: str, *related: Any, buffers: list | None = None
) -> bytes:
    """``obj`` pickled with the user's own packages that ``fn`` and ``related`` come from
    pickled by value, so that the host need not have them installed; SerializationError
    naming ``what`` when it cannot be pickled. With ``buffers``, its large buffers are
    left out of the pickle and appended there (see ``agent.pickling.dumps``)."""
    packages = user_packages(fn, *related)
    with _by_value_lock:
        # Only what is not registered already, so that a module the user registered
        # themselves stays registered afterwards.
        registered = [p for p in packages if p not in cloudpickle.list_registry_pickle_by_value()]
        for package in registered:
            cloudpickle.register_pickle_by_value(sys.modules[package])
        try:
            return pickling.dumps(obj, buffers=buffers)
        except Exception as exc:
            raise SerializationError(
                f"{what} {getattr(fn, '__qualname__', fn)!r} cannot be pickled: {exc}"
            ) from exc
        finally:
            for package in registered:
                cloudpickle.unregister_pickle_by_value(sys.modules[package])
