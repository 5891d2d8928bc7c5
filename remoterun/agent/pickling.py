"""cloudpickle, with code that keeps its file name and brings its source along.

cloudpickle 3.1.3 writes the file name of every code object it pickles by value as
``<dynamic-code>``, so a traceback from a function shipped to a host names no file and
shows no line. ``dumps`` here pickles code objects with their real ``co_filename`` and
their own source lines (not the rest of the file); loading registers them with
``linecache`` (as IPython does for its cells), so a traceback formatted on a host that
does not have the file still shows each frame's line.

Loading needs this module importable (``remoterun.agent.pickling``), which it is
wherever remoterun runs, hosts included: their agent ships this very package.
"""

from __future__ import annotations

import dis
import io
import linecache
import os
import pickle
import types
from typing import Any

import cloudpickle

_DYNAMIC = "<dynamic-code>"
# Code objects with more source than this travel without it (tracebacks show no lines).
_MAX_SOURCE = 1 << 20


class Source:
    """The source lines of one code object (``first`` is the number of the first line);
    unpickling registers them with ``linecache``."""

    __slots__ = ("filename", "first", "lines")

    def __init__(self, filename: str, first: int, lines: tuple[str, ...]):
        self.filename = filename
        self.first = first
        self.lines = lines

    def __reduce__(self) -> tuple:
        return (register_source, (self.filename, self.first, self.lines))


# Files whose linecache entries were made here from shipped lines (merged, not replaced).
_registered: set[str] = set()


def register_source(filename: str, first: int, lines: tuple[str, ...]) -> Source:
    """Make ``linecache`` answer for lines ``first``... of ``filename`` with ``lines``,
    when this host does not have the file. Other lines of an entry made here read as
    blank. The entry has no mtime, so ``linecache.checkcache`` keeps it."""
    if not os.path.exists(filename):
        entry = linecache.cache.get(filename) if filename in _registered else None
        known = list(entry[2]) if entry else []
        end = first - 1 + len(lines)
        known += ["\n"] * (end - len(known))
        known[first - 1 : end] = lines
        linecache.cache[filename] = (sum(map(len, known)), None, known, filename)
        _registered.add(filename)
    return Source(filename, first, lines)


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, but code objects keep their file name and carry their own
    source lines (only theirs: the rest of the file, its secrets included, stays home)."""

    def __init__(self, file: Any, protocol: int | None = None, buffer_callback: Any = None):
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
        self._shipped: dict[str, list[tuple[int, int]]] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            return self._reduce_code(obj)
        return super().reducer_override(obj)

    def _reduce_code(self, code: types.CodeType) -> Any:
        base = cloudpickle.Pickler.dispatch_table[types.CodeType]
        constructor, args = base(code)
        filename = code.co_filename
        if filename != _DYNAMIC:
            args = tuple(filename if type(a) is str and a == _DYNAMIC else a for a in args)
        source = self._source(code)
        if source is None:
            return constructor, args
        # The Source comes first in the stream, so its lines are registered before the
        # code object (and any function made from it) exists.
        return _load_code, (source, constructor, args)

    def _source(self, code: types.CodeType) -> Source | None:
        """The lines of ``code``, unless an enclosing code object already carries them."""
        first = code.co_firstlineno
        last = max((line for _, line in dis.findlinestarts(code) if line), default=first)
        shipped = self._shipped.setdefault(code.co_filename, [])
        if any(a <= first and last <= b for a, b in shipped):
            return None
        lines = linecache.getlines(code.co_filename)[first - 1 : last]
        if not lines or sum(map(len, lines)) > _MAX_SOURCE:
            return None
        shipped.append((first, last))
        return Source(code.co_filename, first, tuple(lines))


def _load_code(source: Source, constructor: Any, args: tuple) -> types.CodeType:
    return constructor(*args)


def dumps(obj: Any, protocol: int | None = None, buffers: list | None = None) -> bytes:
    """``cloudpickle.dumps``, with code objects pickled by ``Pickler``.

    With a ``buffers`` list, large buffers are left out of the pickle and appended there
    (pickle protocol 5's out-of-band buffers, to load with ``loads(data, buffers=...)``):
    numpy arrays and bytearrays anywhere, and bytes values of ``obj`` itself or right in
    its lists, tuples and dicts (a call's arguments, a return value), as views of their
    own memory. A copy of 100 MB holds the interpreter lock for ~60 ms here (most of it
    faulting in fresh pages), which an event loop in another thread would wait out: a
    call's pickle copies nothing large.
    """
    with io.BytesIO() as file:
        if buffers is None:
            Pickler(file, protocol=protocol).dump(obj)
        else:

            def beside(buffer: pickle.PickleBuffer) -> bool:
                """False (out of band) for a large buffer, which is kept; True for others."""
                try:
                    large = buffer.raw().nbytes >= OUT_OF_BAND_MIN
                except BufferError:  # not contiguous: in the pickle
                    return True
                if large:
                    buffers.append(buffer.raw())
                return not large

            Pickler(file, protocol=5, buffer_callback=beside).dump(_large_bytes_beside(obj))
        return file.getvalue()


# Buffers at least this large travel beside a call's pickle (``dumps(..., buffers=)``).
OUT_OF_BAND_MIN = 1 << 20


class _BytesBeside:
    """A large bytes value, pickled out of band: pickle writes bytes into the pickle
    whatever the protocol, and lets no reducer change that; a wrapper it does."""

    __slots__ = ("value",)

    def __init__(self, value: bytes):
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return (bytes, (pickle.PickleBuffer(self.value),))


def _large_bytes_beside(obj: Any, depth: int = 0) -> Any:
    """``obj`` with its large bytes values (and those of the containers in it, three
    levels deep) wrapped in ``_BytesBeside``; containers are rebuilt only when one is."""
    if type(obj) is bytes:
        return _BytesBeside(obj) if len(obj) >= OUT_OF_BAND_MIN else obj
    if depth >= 3 or type(obj) not in (list, tuple, dict):
        return obj
    if type(obj) is dict:
        values = {k: _large_bytes_beside(v, depth + 1) for k, v in obj.items()}
        changed = any(values[k] is not v for k, v in obj.items())
        return values if changed else obj
    items = [_large_bytes_beside(v, depth + 1) for v in obj]
    return type(obj)(items) if any(a is not b for a, b in zip(items, obj)) else obj


loads = cloudpickle.loads
