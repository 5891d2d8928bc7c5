"""The run folder's layout: every file name, name validation and atomic writes on a
POSIX filesystem. ``remoterun.folder.RunFolder`` uses the same names over fsspec.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time

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

NOT_STARTED = "NOT_STARTED"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})

WORKER_LOST = "worker lost"

RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_run_name(name: object) -> str:
    """Return ``name`` if it is a valid run name; raise ValueError naming the rule if not."""
    if not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid run name {name!r}: a run name is 1 to 128 characters of letters, "
            "digits, '.', '_' and '-', starting with a letter or digit (no '/', no '..')"
        )
    return name


# Suffixes count up from a random start: unique within a process (16M names), unlikely
# to meet another process's; an exclusive claim settles the rare collision.
_name_suffixes = itertools.count(secrets.randbelow(1 << 24))


def safe_prefix(prefix: str) -> str:
    """``prefix`` with what a run name cannot hold replaced, e.g. ``<lambda>`` → ``lambda``."""
    return _UNSAFE.sub("_", prefix).strip("._-")[:96] or "run"


def generate_run_name(prefix: str) -> str:
    """``<prefix>-<YYYYmmdd-HHMMSS>-<6 hex>``; the prefix is made safe first."""
    safe = safe_prefix(prefix)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{safe}-{stamp}-{next(_name_suffixes) & 0xFFFFFF:06x}"


def utc_now() -> str:
    """The current time as ISO 8601 UTC with microseconds."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


_tmp_counter = itertools.count()


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one whole."""
    folder, base = os.path.split(path)
    # pid + counter make the name unique without tempfile's random names, whose generator
    # is seeded anew in every forked worker (a millisecond on the worker's start path).
    tmp = os.path.join(folder, f".{base}.{os.getpid()}-{next(_tmp_counter)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
        """The run's result, read from its folder (that attempt's, when it was archived)."""
        import json

        import cloudpickle

        folder = self.path
        try:
            with open(os.path.join(folder, CONFIG), "rb") as f:
                current = json.loads(f.read()).get("attempt")
        except FileNotFoundError:
            current = None
        if self.attempt is not None and current not in (self.attempt, None):
            folder = os.path.join(folder, ATTEMPTS, str(self.attempt))
        try:
            with open(os.path.join(folder, RESULT), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the run passed as an argument ({self.url}, attempt {self.attempt}) has no "
                f"result at {folder} on this host: was it removed?"
            ) from None
        return cloudpickle.loads(data)


def resolve_run_arguments(inputs: dict) -> dict:
    """The call's inputs with each RunArgument argument replaced by the run's result."""
    args = [a.load() if isinstance(a, RunArgument) else a for a in inputs.get("args", ())]
    kwargs = {
        k: v.load() if isinstance(v, RunArgument) else v
        for k, v in inputs.get("kwargs", {}).items()
    }
    return {"args": args, "kwargs": kwargs}
