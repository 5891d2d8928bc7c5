"""cloudpickle, with code that keeps its file name and brings its source along.

cloudpickle 3.1.3 writes the file name of every code object it pickles by value as
``<dynamic-code>``, so a traceback from a function shipped to a host names no file and
shows no line. ``dumps`` here pickles code objects with their real ``co_filename`` and,
once per file and pickle, the file's source lines; loading registers them with
``linecache`` (as IPython does for its cells), so a traceback formatted on a host that
does not have the file still shows each frame's line.

Loading needs this module importable (``remoterun.agent.pickling``), which it is
wherever remoterun runs, hosts included: their agent ships this very package.
"""

from __future__ import annotations

import io
import linecache
import types
from typing import Any

import cloudpickle

_DYNAMIC = "<dynamic-code>"
# Files larger than this travel without their source (tracebacks then show no lines).
_MAX_SOURCE = 1 << 20


class Source:
    """The source lines of one file, pickled once per pickle however many code objects
    of the file it holds; unpickling registers them with ``linecache``."""

    __slots__ = ("filename", "lines")

    def __init__(self, filename: str, lines: tuple[str, ...]):
        self.filename = filename
        self.lines = lines

    def __reduce__(self) -> tuple:
        return (register_source, (self.filename, self.lines))


def register_source(filename: str, lines: tuple[str, ...]) -> Source:
    """Make ``linecache`` answer for ``filename`` with ``lines``, unless this host has
    the same file already. The entry has no mtime, so ``linecache.checkcache`` keeps it."""
    if tuple(linecache.getlines(filename)) != tuple(lines):
        linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    return Source(filename, lines)


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, but code objects keep their file name and carry its source."""

    def __init__(self, file: Any, protocol: int | None = None, buffer_callback: Any = None):
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
        self._sources: dict[str, Source | None] = {}

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
        source = self._source(filename)
        if source is None:
            return constructor, args
        # The Source comes first in the stream, so its lines are registered before the
        # code object (and any function made from it) exists.
        return _load_code, (source, constructor, args)

    def _source(self, filename: str) -> Source | None:
        if filename in self._sources:
            return self._sources[filename]
        lines = linecache.getlines(filename)
        source = None
        if lines and sum(map(len, lines)) <= _MAX_SOURCE:
            source = Source(filename, tuple(lines))
        self._sources[filename] = source
        return source


def _load_code(source: Source, constructor: Any, args: tuple) -> types.CodeType:
    return constructor(*args)


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    """``cloudpickle.dumps``, with code objects pickled by ``Pickler``."""
    with io.BytesIO() as file:
        Pickler(file, protocol=protocol).dump(obj)
        return file.getvalue()


loads = cloudpickle.loads
