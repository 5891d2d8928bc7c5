"""The run record: the fields of a run's record file, their JSON form and the status transitions.

A ``RunRecord`` is the record as JSON gives it (a dict, so every copy of a run, on any
store, reads the same), with the fields every reader needs as properties and each change
of a run's fate as a method: ``running``, ``completed``, ``failed``, ``lost``,
``cancelled``. Hosts, workers, blocks and copies make and change records only through
it; ``decode`` refuses bytes that are not a record, ``encode`` signs what it writes when
this machine has the team key.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from . import integrity

NOT_STARTED = "NOT_STARTED"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
STATUSES = frozenset({NOT_STARTED, RUNNING}) | TERMINAL

WORKER_LOST = "worker lost"

# error types a record names, which the client raises as remoterun's own errors
WORKER_LOST_ERROR = "remoterun.errors.WorkerLostError"
CANCELLED_ERROR = "remoterun.errors.RunCancelledError"
STORAGE_ERROR = "remoterun.errors.RunStorageError"
SERIALIZATION_ERROR = "remoterun.errors.SerializationError"


def utc_now() -> str:
    """The current time as ISO 8601 UTC with microseconds."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class CorruptRecord(ValueError):
    """Bytes that are not a run record remoterun can read."""


class RunRecord(dict):
    """One attempt's record. See the module docstring."""

    @classmethod
    def new(cls, name: str, run_type: str, attempt: int, **fields: Any) -> RunRecord:
        """A NOT_STARTED record with every field a reader expects, ``fields`` over the
        defaults."""
        record = cls(
            name=name,
            status=NOT_STARTED,
            run_type=run_type,
            fn_name=None,
            cmds=[],
            start_time=None,
            end_time=None,
            pid=None,
            python=sys.version.split()[0],
            fingerprint={},
            error=None,
            error_traceback=None,
            parent=None,
            upstream=[],
            downstream=[],
            links=[],
            attempt=attempt,
            tags={},
            metrics={},
        )
        record.update(fields)
        record.update(name=name, attempt=attempt)
        return record

    @classmethod
    def decode(cls, data: bytes) -> RunRecord:
        """The record in a record file's bytes; CorruptRecord for anything that is not a
        JSON object with a known status."""
        try:
            fields = json.loads(data)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
            raise CorruptRecord(f"the record is not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise CorruptRecord(f"the record is a {type(fields).__name__}, not an object")
        if fields.get("status") not in STATUSES:
            raise CorruptRecord(f"the record has an unknown status {fields.get('status')!r}")
        return cls(fields)

    def encode(self) -> bytes:
        """The record file's bytes, signed when this machine has the team key (over the
        record as JSON gives it back, which is what a reader checks)."""
        fields: dict = self
        key = integrity.signing_key()
        if key is not None:
            fields = integrity.sign(integrity.as_json(fields), key)
        elif integrity.SIGNATURE in fields:
            fields = {k: v for k, v in fields.items() if k != integrity.SIGNATURE}
        return json.dumps(fields, indent=1, sort_keys=True, default=str).encode()

    # ------------------------------------------------------------------ fields

    @property
    def name(self) -> str:
        return self["name"]

    @property
    def status(self) -> str:
        return self.get("status") or NOT_STARTED

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def attempt(self) -> int | None:
        return self.get("attempt")

    @property
    def digests(self) -> dict[str, str]:
        return dict(self.get(integrity.DIGESTS) or {})

    # ------------------------------------------------------------------ transitions

    def running(self, **process: Any) -> RunRecord:
        """Started now by the process described in ``process`` (pid, pgid, ...)."""
        self.update(status=RUNNING, start_time=utc_now(), **process)
        return self

    def completed(self) -> RunRecord:
        self.update(status=COMPLETED, error=None, error_traceback=None)
        return self._ended()

    def failed(self, message: str, error_type: str, traceback: str = "") -> RunRecord:
        self.update(status=FAILED, error=message, error_type=error_type, error_traceback=traceback)
        return self._ended()

    def lost(self, why: str) -> RunRecord:
        """FAILED because its process is gone without recording an outcome."""
        return self.failed(f"{WORKER_LOST}: {why}", WORKER_LOST_ERROR)

    def cancelled(self) -> RunRecord:
        self.update(status=CANCELLED, error="cancelled", error_type=CANCELLED_ERROR)
        return self._ended()

    def _ended(self) -> RunRecord:
        self["end_time"] = utc_now()
        return self
