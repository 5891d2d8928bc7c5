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


def check_key(key: Any, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise TypeError(f"a {what} name must be a non-empty string, not {key!r}")


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

    @property
    def run_type(self) -> str | None:
        """``"function"``, ``"command"`` or ``"context"`` (a ``with`` block)."""
        return self.get("run_type")

    @property
    def fn_name(self) -> str | None:
        return self.get("fn_name")

    @property
    def fn_qualname(self) -> str | None:
        return self.get("fn_qualname")

    @property
    def host(self) -> str | None:
        return self.get("host")

    @property
    def pid(self) -> int | None:
        return self.get("pid")

    @property
    def start_time(self) -> str | None:
        return self.get("start_time")

    @property
    def end_time(self) -> str | None:
        return self.get("end_time")

    @property
    def error(self) -> str | None:
        return self.get("error")

    @property
    def error_type(self) -> str:
        return self.get("error_type") or ""

    @property
    def error_traceback(self) -> str:
        return self.get("error_traceback") or ""

    @property
    def parent(self) -> str | None:
        """The URL of the run that started this one."""
        return self.get("parent")

    @property
    def fingerprint(self) -> dict:
        return self.get("fingerprint") or {}

    @property
    def metrics(self) -> dict:
        return dict(self.get("metrics") or {})

    @property
    def tags(self) -> dict:
        return dict(self.get("tags") or {})

    @property
    def params(self) -> dict:
        return dict(self.get("params") or {})

    # ------------------------------------------------------------------ changes

    def link(self, url: str, kind: str, attempt: int | None) -> bool:
        """Link the run at ``url`` (that attempt) as ``"used"`` or ``"produced"`` by this
        one; False when the link is there already (nothing changed). A run this one
        produced is not linked again as used."""
        links = self.setdefault("links", [])
        if any(link.get("url") == url and link.get("attempt") == attempt for link in links):
            return False
        if kind == "used" and url in (self.get("downstream") or []):
            return False
        links.append({"url": url, "kind": kind, "attempt": attempt})
        key = "upstream" if kind == "used" else "downstream"
        if url not in self.setdefault(key, []):
            self[key].append(url)
        return True

    @staticmethod
    def metric_value(key: str, value: Any, step: Any) -> int | float | str:
        """``value`` as a metric holds it (TypeError for what is not a number, or a step
        that is not an int): NaN and infinities as text, which JSON can hold."""
        import math  # here: `import remoterun` stays light
        import numbers

        check_key(key, "metric")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"metric {key!r} must be a number, not {type(value).__name__} ({value!r}); "
                "record text with set_tag()"
            )
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step of metric {key!r} must be an int, not {step!r}")
        if isinstance(number, float) and not math.isfinite(number):
            return repr(number)  # "nan", "inf"
        return number

    def add_metric(
        self,
        key: str,
        number: int | float | str,
        step: int | None = None,
        *,
        overwrite: bool = False,
        single_value: bool = False,
    ) -> None:
        """Append a ``metric_value`` to the metric ``key`` with its ``step``; see
        ``Run.log_metric``."""
        metrics = self.setdefault("metrics", {})
        steps = self.setdefault("metric_steps", {})
        if single_value:
            metrics[key] = number
            steps.pop(key, None)
            return
        old = metrics.get(key)
        values = [] if overwrite or not isinstance(old, list) else old
        metrics[key] = values + [number]
        if step is not None or key in steps:
            old_steps = [] if overwrite else steps.get(key, [None] * len(values))
            steps[key] = old_steps + [step]

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag: text, a number or a bool; anything else as its ``str``."""
        check_key(key, "tag")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = str(value)
        self.setdefault("tags", {})[key] = value

    def set_params(self, params: dict[str, Any]) -> None:
        """Record parameters: values kept as JSON when they can be, else as their ``repr``."""
        clean = {}
        for key, value in params.items():
            check_key(key, "param")
            try:
                json.dumps(value)
                clean[key] = value
            except (TypeError, ValueError):
                clean[key] = repr(value)
        self.setdefault("params", {}).update(clean)

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
