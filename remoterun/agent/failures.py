"""What a failure on this host says to the client: the error record of an exception (its
type, message, traceback and pickle), and the types the client maps records to."""

from __future__ import annotations

import traceback
from typing import Any

from . import pickling

# The error type recorded for a return value that cannot be pickled; the client raises
# remoterun.errors.SerializationError for it.
SERIALIZATION_ERROR = "remoterun.errors.SerializationError"


# ... and for an outcome that could not be written (a full disk): RunStorageError.
STORAGE_ERROR = "remoterun.errors.RunStorageError"


def error_record(exc: BaseException, skip_frames: int = 0) -> dict[str, Any]:
    """What is known of an exception, as plain data, plus its pickle when it round-trips.

    ``skip_frames`` leaves out the innermost-caller frames of remoterun's own code.
    """
    for _ in range(skip_frames):
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            exc.__traceback__ = exc.__traceback__.tb_next
    exc_type = type(exc)
    record: dict[str, Any] = {
        "type": f"{exc_type.__module__}.{exc_type.__qualname__}",
        "message": f"{exc_type.__qualname__}: {exc}" if str(exc) else exc_type.__qualname__,
        "traceback": "".join(traceback.format_exception(exc)),
        "exc": None,
    }
    try:
        data = pickling.dumps(exc)
        pickling.loads(data)
        record["exc"] = data
    except Exception:
        pass
    return record
