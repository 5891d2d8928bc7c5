"""RunFolder: the one owner of a run folder's files, on any filesystem.

A run folder holds one run: its record (``config.json``), its pickled function, inputs,
result or error, its logs, and its earlier attempts under ``attempts/<n>/``. This module
alone names those files. Everything else asks a ``RunFolder`` by what it wants: "write
the result", "read the record", "archive this attempt", "the log from this offset".

A RunFolder works over ``Files``, the few filesystem operations it needs: ``PosixFiles``
on a host's disk (this module, standard library only); on a client,
``remoterun.folder.LocalFiles`` (its own disk) or ``FsspecFiles`` (SFTP, S3, ...).
"""

from __future__ import annotations

import os
import posixpath
from typing import Callable, Iterable, Protocol

from ..errors import CorruptRunError, UntrustedRunError
from . import integrity, layout
from .record import COMPLETED, CorruptRecord, RunRecord

# The files of a run folder. Nothing outside this module spells them.
_RECORD = "config.json"
_FUNCTION = "function.pkl"
_INPUTS = "inputs.pkl"
_RESULT = "result.pkl"
_ERROR = "error.pkl"
_STDOUT = "stdout.log"
_STDERR = "stderr.log"
_ATTEMPTS = "attempts"
# Files that belong to one attempt; a re-execution moves them to attempts/<n>/.
_ATTEMPT_FILES = (_RECORD, _FUNCTION, _INPUTS, _RESULT, _ERROR, _STDOUT, _STDERR)
# The files whose contents are unpickled, each with a digest in the record.
_PICKLES = {"function": _FUNCTION, "inputs": _INPUTS, "result": _RESULT, "error": _ERROR}
_LOGS = {"stdout": _STDOUT, "stderr": _STDERR}


class Files(Protocol):
    """The filesystem operations a RunFolder needs. Paths are POSIX paths on that
    filesystem; ``local`` says whether they are paths on this machine's disk."""

    local: bool

    def read(self, path: str, offset: int = 0) -> bytes | None: ...  # None: no such file

    def read_many(self, paths: list[str]) -> dict[str, bytes]: ...  # the ones that exist

    def write(self, path: str, data: bytes) -> None: ...  # whole or not at all; private

    def listdir(self, path: str) -> list[str]: ...  # names; [] for no such folder

    def mkdir(self, path: str) -> None: ...  # with its parents; private where folders exist

    def exists(self, path: str) -> bool: ...

    def move(self, src: str, dst: str) -> None: ...

    def remove(self, path: str) -> None: ...  # a file; no error if it is gone

    def remove_tree(self, path: str) -> None: ...  # a folder and all in it (FileNotFoundError)

    def url(self, path: str) -> str: ...


class PosixFiles:
    """``Files`` on this machine's disk, with the standard library alone."""

    local = True

    def read(self, path: str, offset: int = 0) -> bytes | None:
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return None

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        found = {}
        for path in paths:
            data = self.read(path)
            if data is not None:
                found[path] = data
        return found

    def write(self, path: str, data: bytes) -> None:
        layout.write_atomic(path, data)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def mkdir(self, path: str) -> None:
        layout.makedirs_private(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def move(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        import shutil  # here: only `remoterun rm` and overwriting copies remove folders

        shutil.rmtree(path)

    def url(self, path: str) -> str:
        return "file://" + path


POSIX = PosixFiles()


class RunFolder:
    """The files of the run ``name`` in the folder ``path`` on ``files``."""

    __slots__ = ("files", "path", "name")

    #: The record file's name, for messages that tell a user what is missing.
    RECORD_FILE = _RECORD

    def __init__(self, files: Files, path: str, name: str | None = None):
        self.files = files
        self.path = path.rstrip("/") or "/"
        self.name = layout.check_run_name(name or posixpath.basename(self.path))

    def __repr__(self) -> str:
        return f"RunFolder({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and (self.url, self.name) == (other.url, other.name)

    def __hash__(self) -> int:
        return hash((self.path, self.name))

    @property
    def url(self) -> str:
        return self.files.url(self.path)

    @property
    def local(self) -> bool:
        """Whether the folder is on this machine's disk."""
        return self.files.local

    @property
    def archived(self) -> bool:
        """Whether this is an earlier attempt's folder (``attempts/<n>/``)."""
        return posixpath.basename(self.path) != self.name

    def _file(self, filename: str) -> str:
        return f"{self.path}/{filename}"

    def attempt(self, number: int) -> RunFolder:
        """The folder of an earlier attempt."""
        return RunFolder(self.files, f"{self.path}/{_ATTEMPTS}/{int(number)}", self.name)

    def attempts(self) -> list[int]:
        """Numbers of the earlier attempts kept, ascending."""
        names = self.files.listdir(self._file(_ATTEMPTS))
        return sorted(int(n) for n in names if n.isdigit())

    @property
    def record_path(self) -> str:
        """The path of the record file on its filesystem (for batched listings)."""
        return self._file(_RECORD)

    def log_url(self, stream: str) -> str:
        """The URL of the ``"stdout"`` or ``"stderr"`` log."""
        return self.files.url(self._file(_LOGS[stream]))

    def log_path(self, stream: str) -> str:
        """The path of the ``"stdout"`` or ``"stderr"`` log on its filesystem."""
        return self._file(_LOGS[stream])

    # ------------------------------------------------------------------ the record

    def exists(self) -> bool:
        return self.read_record() is not None

    def read_record(self) -> RunRecord | None:
        """The run's record, None when there is none; CorruptRunError when the record
        file is not a record (not JSON, not an object, an unknown status)."""
        return self.decode_record(self.files.read(self._file(_RECORD)))

    def read_record_bytes(self) -> bytes | None:
        return self.files.read(self._file(_RECORD))

    def decode_record(self, data: bytes | None) -> RunRecord | None:
        if data is None:
            return None
        try:
            return RunRecord.decode(data)
        except CorruptRecord as exc:
            raise self.corrupt(_RECORD, f"{_RECORD}: {exc}") from None

    def write_record(self, record: dict) -> None:
        """Write the record, signed when this machine has the team key."""
        if not isinstance(record, RunRecord):
            record = RunRecord(record)
        self.files.write(self._file(_RECORD), record.encode())

    def write_record_bytes(self, data: bytes) -> None:
        """Write record bytes as they are (a copy of a record read elsewhere)."""
        self.files.write(self._file(_RECORD), data)

    # ------------------------------------------------------------------ the pickles

    def read_pickle(self, what: str) -> bytes | None:
        """The bytes of ``"function"``, ``"inputs"``, ``"result"`` or ``"error"``, None
        when there is no such file; not checked (see ``checked``)."""
        return self.files.read(self._file(_PICKLES[what]))

    def read_result(self) -> bytes | None:
        return self.read_pickle("result")

    def read_error(self) -> bytes | None:
        return self.read_pickle("error")

    def read_outcome(self, record: dict) -> dict:
        """A terminal run's outcome bytes for a reply: ``{"result": ...}`` for a completed
        run, ``{"error_pickle": ...}`` for any other."""
        if record.get("status") == COMPLETED:
            return {"result": self.read_pickle("result")}
        return {"error_pickle": self.read_pickle("error")}

    def read_with_outcome(self, want_outcome: bool = False) -> dict:
        """``{"config": record}``, plus a terminal run's outcome (``read_outcome``) when
        ``want_outcome``: the files are read at once (one round trip on object stores)."""
        if not want_outcome:
            return {"config": self.read_record()}
        paths = [self._file(f) for f in (_RECORD, _RESULT, _ERROR)]
        found = {posixpath.basename(p): d for p, d in self.files.read_many(paths).items()}
        record = self.decode_record(found.get(_RECORD))
        reply: dict = {"config": record}
        if record is not None and record.terminal:
            if record.status == COMPLETED:
                reply["result"] = found.get(_RESULT)
            else:
                reply["error_pickle"] = found.get(_ERROR)
        return reply

    def write_pickle(self, what: str, data: bytes, record: dict) -> None:
        """Write ``"function"``, ``"inputs"``, ``"result"`` or ``"error"`` and note its
        digest in ``record``, which the caller writes after it."""
        filename = _PICKLES[what]
        self.files.write(self._file(filename), data)
        record.setdefault(integrity.DIGESTS, {})[filename] = integrity.digest(data)

    def write_result(self, data: bytes, record: dict) -> None:
        self.write_pickle("result", data, record)

    def write_error(self, data: bytes, record: dict) -> None:
        self.write_pickle("error", data, record)

    def note_digest(self, what: str, digest: str, record: dict) -> None:
        """Note in ``record`` the digest of a pickle put in place by ``adopt``."""
        record.setdefault(integrity.DIGESTS, {})[_PICKLES[what]] = digest

    def adopt(self, what: str, staged_path: str) -> None:
        """Move a staged pickle (written elsewhere on the same filesystem) into place."""
        self.files.move(staged_path, self._file(_PICKLES[what]))

    def remove_outcome(self, record: dict) -> None:
        """Remove a result or error that was (perhaps partly) written, and its digest;
        as much as can be (what cannot be removed is left, its digest dropped)."""
        for filename in (_RESULT, _ERROR):
            _try(self.files.remove, self._file(filename))
            (record.get(integrity.DIGESTS) or {}).pop(filename, None)

    # ------------------------------------------------------------------ checking

    def corrupt(self, filename: str, problem: str) -> CorruptRunError:
        """The error for a damaged file of this run, saying what to do."""
        return CorruptRunError(
            layout.corrupt_message(self.name, self.url, problem), url=self.url, filename=filename
        )

    def check_digest(
        self, record: dict, what: str, data: bytes | None, *, legacy_ok: bool = False
    ) -> bytes:
        """``data`` if it is the pickle ``what`` the record's digest names; else
        CorruptRunError. ``legacy_ok``: a record from before digests is taken as it is."""
        filename = _PICKLES[what]
        problem = integrity.digest_problem(record, filename, data, legacy_ok=legacy_ok)
        if problem:
            raise self.corrupt(filename, problem)
        if legacy_ok and integrity.DIGESTS not in record:
            _warn_legacy(self.url)
        assert data is not None
        return data

    def check_trusted(self, record: dict, *, required: bool) -> None:
        """Raise UntrustedRunError unless ``record`` is signed under the team key, when
        ``required`` and there is a key (without one, digests are all that is checked)."""
        if not required:
            return
        key = integrity.signing_key()
        if key is None:
            return
        problem = integrity.signature_problem(record, key)
        if problem is None and record.get("name") != self.name:
            problem = f"it is the signed record of the run {record.get('name')!r}, not this one"
        if problem:
            raise UntrustedRunError(
                f"run {self.name!r} at {self.url} cannot be trusted: {problem}. Nothing of "
                "it was unpickled. Whoever can write to that store could have put it there; "
                "ask whoever made it to publish it again with the team key "
                f"(${integrity.KEY_ENV} or `remoterun keygen`)",
                url=self.url,
            )

    # ------------------------------------------------------------------ logs

    def read_log(self, stream: str, offset: int = 0) -> bytes:
        """The ``"stdout"`` or ``"stderr"`` log from ``offset`` on (empty if none yet)."""
        return self.files.read(self._file(_LOGS[stream]), offset) or b""

    def write_log(self, stream: str, data: bytes) -> None:
        self.files.write(self._file(_LOGS[stream]), data)

    def open_log(self, stream: str, *, truncate: bool) -> int:
        """A file descriptor appending to the log (this machine's disk only), created
        private to its owner; ``truncate`` empties it first."""
        flags = os.O_WRONLY | (os.O_TRUNC if truncate else os.O_APPEND)
        return layout.open_private(self._file(_LOGS[stream]), flags)

    # ------------------------------------------------------------------ attempts

    def create(self) -> None:
        """Create the folder (where the filesystem has folders), private to its owner."""
        self.files.mkdir(self.path)

    def start_logs(self) -> None:
        """Create both logs empty (this machine's disk only)."""
        for stream in _LOGS:
            os.close(self.open_log(stream, truncate=True))

    def archive_attempt(self, attempt: int | None) -> int:
        """Move the files of the current attempt (whose record says ``attempt``) to
        ``attempts/<n>/``, ``n`` its attempt or the next free number; return the number
        of the attempt that follows. The record moves first: a folder without one reads
        as "no run", never as a half-moved attempt claiming its status."""
        taken = set(self.attempts())
        number = int(attempt or 1)
        if number in taken:
            number = max(taken) + 1
        target = f"{self.path}/{_ATTEMPTS}/{number}"
        self.files.mkdir(target)
        for filename in _ATTEMPT_FILES:
            src = self._file(filename)
            if self.files.exists(src):
                self.files.move(src, f"{target}/{filename}")
        return number + 1

    def undo_attempt(self, attempt: int) -> None:
        """Take back a new attempt that could not be recorded (a full disk): remove what
        it put in the folder and move the previous attempt, archived for it, back. (On
        this machine's disk: hosts do this.)"""
        for filename in _ATTEMPT_FILES:  # best effort: the disk is full, or worse
            _try(self.files.remove, self._file(filename))
        if attempt > 1:
            archived = self.attempt(attempt - 1)
            for filename in self.files.listdir(archived.path):
                self.files.move(f"{archived.path}/{filename}", self._file(filename))
            _rmdir(archived.path)
        _rmdir(self._file(_ATTEMPTS))
        _rmdir(self.path)

    def archived_folder(self, record: dict) -> RunFolder | None:
        """The earlier attempt's folder whose record is ``record`` (it was archived by a
        re-execution while its reader looked), None when there is none."""
        numbers = [int(record.get("attempt") or 1)] + self.attempts()
        for number in numbers:
            folder = self.attempt(number)
            try:
                if folder.read_record() == record:
                    return folder
            except CorruptRunError:
                continue
        return None

    # ------------------------------------------------------------------ copying
    # A copy moves every file of the folder (found by listing it) and writes the records
    # last; these say which of the listed files (paths relative to the folder) are what.

    @staticmethod
    def record_paths(relative_files: Iterable[str]) -> list[str]:
        """The records among ``relative_files`` (the run's own and its attempts'), in the
        order a copy writes them: archived attempts' first, the run's own last."""
        records = [r for r in relative_files if posixpath.basename(r) == _RECORD]
        return sorted(records, key=lambda r: (r == _RECORD, r))

    @staticmethod
    def is_record(relative: str) -> bool:
        return posixpath.basename(relative) == _RECORD

    @staticmethod
    def own_record(relative: str) -> bool:
        """Whether ``relative`` is the run's own record (not an archived attempt's)."""
        return relative == _RECORD

    @staticmethod
    def pickle_of(relative: str) -> tuple[str, str] | None:
        """For a pickle, the relative path of its attempt's record and the key of its
        digest there; None for any other file."""
        folder, filename = posixpath.split(relative)
        if filename not in _PICKLES.values():
            return None
        return posixpath.join(folder, _RECORD), filename

    def folder_of(self, relative_record: str) -> RunFolder:
        """The folder (this one or an archived attempt's) of the relative record path."""
        folder = posixpath.dirname(relative_record)
        return RunFolder(self.files, f"{self.path}/{folder}" if folder else self.path, self.name)

    def relative(self, folder_path: str) -> str:
        """The relative record path of this folder or one of its attempts' folders."""
        inner = posixpath.relpath(folder_path, self.path)
        return _RECORD if inner == "." else f"{inner}/{_RECORD}"

    def remove_record(self) -> None:
        self.files.remove(self._file(_RECORD))

    def remove(self) -> None:
        """Remove the whole folder, earlier attempts included (FileNotFoundError when
        there is none)."""
        self.files.remove_tree(self.path)


_legacy_warned: set[str] = set()


def _warn_legacy(url: str) -> None:
    if url not in _legacy_warned:
        _legacy_warned.add(url)
        import logging

        logging.getLogger("remoterun.folder").warning(
            "run %s was recorded before digests: read unchecked (run it again to record digests)",
            url,
        )


def _try(remove: Callable[[str], None], path: str) -> None:
    try:
        remove(path)
    except OSError:
        pass


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


class RunArgument:
    """A finished run passed as an argument to a remote function, standing in for its
    result: the host that executes the call reads the result from the run's folder on
    its own disk, so the bytes do not travel through the client. ``url`` is how the
    client named the run (lineage), ``path`` its folder on the executing host."""

    __slots__ = ("path", "attempt", "url")

    def __init__(self, path: str, attempt: int | None, url: str):
        self.path = path
        self.attempt = attempt
        self.url = url

    def __reduce__(self) -> tuple:
        return (RunArgument, (self.path, self.attempt, self.url))

    def __repr__(self) -> str:
        return f"RunArgument({self.url!r}, attempt={self.attempt})"

    def load(self) -> object:
        """The run's result, read from its folder (that attempt's, when it was archived),
        unpickled only once it matches the digest its record holds."""
        from . import pickling  # here: cloudpickle is not imported with remoterun

        folder = RunFolder(POSIX, self.path)
        record = folder.read_record()
        current = None if record is None else record.attempt
        if self.attempt is not None and current not in (self.attempt, None):
            folder = folder.attempt(self.attempt)
            record = folder.read_record()
        data = folder.read_result()
        if record is None or data is None:
            raise FileNotFoundError(
                f"the run passed as an argument ({self.url}, attempt {self.attempt}) has no "
                f"result at {folder.path} on this host: was it removed?"
            )
        problem = integrity.digest_problem(record, _RESULT, data)
        if problem:
            raise CorruptRunError(
                "passed as an argument: "
                + layout.corrupt_message(record.name, folder.path, problem),
                url=self.url,
                filename=_RESULT,
            )
        return pickling.loads(data)


def resolve_run_arguments(inputs: dict) -> dict:
    """The call's inputs with each RunArgument argument replaced by the run's result."""
    args = [a.load() if isinstance(a, RunArgument) else a for a in inputs.get("args", ())]
    kwargs = {
        k: v.load() if isinstance(v, RunArgument) else v
        for k, v in inputs.get("kwargs", {}).items()
    }
    return {"args": args, "kwargs": kwargs}
