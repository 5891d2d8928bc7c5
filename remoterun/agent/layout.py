"""Run names and the run root's layout (lock and staging folders), and private, atomic
writes on this machine's disk. The files of a run folder are ``runfolder.RunFolder``'s.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import time

from ..errors import InvalidRunNameError

# Per-name lock files live beside the run folders; run names cannot start with ".".
LOCKS = ".locks"
# A new run's function and inputs are written here before its name is claimed.
STAGING = ".staging"


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


def corrupt_message(name: str, where: str, problem: str) -> str:
    """What CorruptRunError says: the run, where it is, what is wrong, what to do."""
    return (
        f"run {name!r} at {where} is damaged: {problem}. Nothing of it was unpickled. "
        f"Run it again (a new attempt replaces it), or remove it: remoterun rm {where}"
    )


def __getattr__(name: str) -> object:
    """``RunArgument`` and ``resolve_run_arguments`` by their old place: the inputs of runs
    recorded before ``runfolder.py`` held them name them here. (Imported when an old
    pickle asks: ``runfolder`` sits above this module.)"""
    if name in ("RunArgument", "resolve_run_arguments"):
        import importlib

        return getattr(importlib.import_module("remoterun.agent.runfolder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
