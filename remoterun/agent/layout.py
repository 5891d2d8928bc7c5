"""The run folder's layout: every file name, name validation and atomic writes on a
POSIX filesystem. ``remoterun.folder.RunFolder`` uses the same names over fsspec.
"""

from __future__ import annotations

import errno
import itertools
import os
import posixpath
import re
import time
from typing import Protocol

from ..errors import CorruptRunError, InvalidRunNameError
from . import integrity
from .record import CANCELLED as CANCELLED  # the statuses live with the record
from .record import COMPLETED as COMPLETED
from .record import FAILED as FAILED
from .record import NOT_STARTED as NOT_STARTED
from .record import RUNNING as RUNNING
from .record import STATUSES as STATUSES
from .record import TERMINAL as TERMINAL
from .record import WORKER_LOST as WORKER_LOST
from .record import RunRecord
from .record import utc_now as utc_now

CONFIG = "config.json"
FUNCTION = "function.pkl"
INPUTS = "inputs.pkl"
RESULT = "result.pkl"
ERROR = "error.pkl"
STDOUT = "stdout.log"
STDERR = "stderr.log"
ATTEMPTS = "attempts"
# Files that belong to one attempt; a re-execution moves them to attempts/<n>/.
ATTEMPT_FILES = (CONFIG, FUNCTION, INPUTS, RESULT, ERROR, STDOUT, STDERR)
# Per-name lock files live beside the run folders; run names cannot start with ".".
LOCKS = ".locks"
# A new run's function and inputs are written here before its name is claimed.
STAGING = ".staging"

# The files whose contents are unpickled, each with a digest in the record.
PICKLES = (FUNCTION, INPUTS, RESULT, ERROR)

RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_run_name(name: object) -> str:
    """Return ``name`` if it is a valid run name; raise InvalidRunNameError (a ValueError)
    naming the rule if not."""
    if not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name):
        raise InvalidRunNameError(
            f"invalid run name {name!r}: a run name is 1 to 128 characters of letters, "
            "digits, '.', '_' and '-', starting with a letter or digit (no '/', no '..')"
        )
    return name


# Suffixes count up from a random start: unique within a process (16M names), unlikely
# to meet another process's; an exclusive claim settles the rare collision.
_name_suffixes = itertools.count(int.from_bytes(os.urandom(3), "big"))


def safe_prefix(prefix: str) -> str:
    """``prefix`` with what a run name cannot hold replaced, e.g. ``<lambda>`` → ``lambda``."""
    return _UNSAFE.sub("_", prefix).strip("._-")[:96] or "run"


def generate_run_name(prefix: str) -> str:
    """``<prefix>-<YYYYmmdd-HHMMSS>-<6 hex>``; the prefix is made safe first."""
    safe = safe_prefix(prefix)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{safe}-{stamp}-{next(_name_suffixes) & 0xFFFFFF:06x}"


_tmp_counter = itertools.count()

# Run folders hold the user's arguments and results: private to their owner.
FOLDER_MODE = 0o700
FILE_MODE = 0o600


def makedirs_private(path: str) -> None:
    """``os.makedirs`` where every folder it creates is 0700 (``makedirs`` gives its mode
    to the last one only)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        makedirs_private(parent)
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def open_private(path: str, flags: int) -> int:
    """``os.open`` of a run's file, created readable by its owner only."""
    return os.open(path, flags | os.O_CREAT, FILE_MODE)


def staging_name(path: str) -> str:
    """A unique temporary name in ``path``'s folder, hidden from listings (".")."""
    folder, base = os.path.split(path)
    # pid + counter make the name unique without tempfile's random names, whose generator
    # is seeded anew in every forked worker (a millisecond on the worker's start path).
    return os.path.join(folder, f".{base}.{os.getpid()}-{next(_tmp_counter)}.tmp")


def write_atomic(path: str, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one whole.

    On failure (a full disk) nothing is left behind: the temporary file is removed, and
    the OSError says which path could not be written.
    """
    tmp = staging_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_message(exc: OSError, path: str | None = None) -> str:
    """``"no space left on device writing <path>"`` and the like, for a record."""
    where = path or exc.filename or "the run folder"
    what = (exc.strerror or str(exc)).lower() if exc.errno else str(exc)
    return f"{what} writing {where}"


class Files(Protocol):
    """The few filesystem operations archiving needs: a host's disk (``PosixFiles``), or
    any fsspec filesystem on a client (``remoterun.folder.FsspecFiles``)."""

    def listdir(self, path: str) -> list[str]: ...  # names; [] for no such folder

    def mkdir(self, path: str) -> None: ...  # private where folders exist

    def exists(self, path: str) -> bool: ...

    def move(self, src: str, dst: str) -> None: ...


class PosixFiles:
    """``Files`` on this machine's disk."""

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def mkdir(self, path: str) -> None:
        makedirs_private(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def move(self, src: str, dst: str) -> None:
        os.replace(src, dst)


def archive_attempt(files: Files, folder: str, attempt: int | None) -> int:
    """Move the files of the current attempt of the run folder ``folder`` (whose record
    says ``attempt``) to ``attempts/<n>/``, ``n`` its attempt or the next free number;
    return the number of the attempt that follows. The record moves first: a folder
    without one reads as "no run", never as a half-moved attempt claiming its status."""
    attempts = posixpath.join(folder, ATTEMPTS)
    taken = {int(d) for d in files.listdir(attempts) if d.isdigit()}
    number = int(attempt or 1)
    if number in taken:
        number = max(taken) + 1
    target = posixpath.join(attempts, str(number))
    files.mkdir(target)
    for filename in ATTEMPT_FILES:
        src = posixpath.join(folder, filename)
        if files.exists(src):
            files.move(src, posixpath.join(target, filename))
    return number + 1


def corrupt_message(name: str, where: str, problem: str) -> str:
    """What CorruptRunError says: the run, where it is, what is wrong, what to do."""
    return (
        f"run {name!r} at {where} is damaged: {problem}. Nothing of it was unpickled. "
        f"Run it again (a new attempt replaces it), or remove it: remoterun rm {where}"
    )


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

        folder = self.path
        record = _read_record(folder)
        current = None if record is None else record.get("attempt")
        if self.attempt is not None and current not in (self.attempt, None):
            folder = os.path.join(folder, ATTEMPTS, str(self.attempt))
            record = _read_record(folder)
        try:
            with open(os.path.join(folder, RESULT), "rb") as f:
                data: bytes | None = f.read()
        except FileNotFoundError:
            data = None
        if record is None or data is None:
            raise FileNotFoundError(
                f"the run passed as an argument ({self.url}, attempt {self.attempt}) has no "
                f"result at {folder} on this host: was it removed?"
            )
        problem = integrity.digest_problem(record, RESULT, data)
        if problem:
            raise CorruptRunError(
                "passed as an argument: " + corrupt_message(record["name"], folder, problem),
                url=self.url,
                filename=RESULT,
            )
        return pickling.loads(data)


def _read_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, CONFIG), "rb") as f:
            return RunRecord.decode(f.read())
    except FileNotFoundError:
        return None


def resolve_run_arguments(inputs: dict) -> dict:
    """The call's inputs with each RunArgument argument replaced by the run's result."""
    args = [a.load() if isinstance(a, RunArgument) else a for a in inputs.get("args", ())]
    kwargs = {
        k: v.load() if isinstance(v, RunArgument) else v
        for k, v in inputs.get("kwargs", {}).items()
    }
    return {"args": args, "kwargs": kwargs}
