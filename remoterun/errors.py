"""remoterun's exception tree. Users catch these; errors from the layers below
(OSError, paramiko, botocore) are mapped to them at the boundary with ``raise ... from``.

::

    RemoterunError
    ├── InvalidRunNameError        (also ValueError) a run name or path that is not allowed
    ├── RunNotFoundError           (also LookupError) no run of that name at that place
    ├── RunNotFinishedError        the run is not terminal where a terminal run is needed
    ├── RunExistsError             another run holds that name where a run is copied to
    ├── CacheMismatchError         a cached run was made from other arguments
    ├── SerializationError         (also TypeError) an argument or value cannot be pickled
    ├── RunStorageError            (also OSError) a run folder cannot be read or written
    │   └── CorruptRunError        a run's file is missing, damaged or fails its digest
    ├── UntrustedRunError          a run from a shared store is unsigned or forged
    ├── SigningKeyError            no team signing key where one is needed, or a bad one
    ├── SystemUnavailableError     a system cannot be reached or started
    │   ├── AgentError             the agent broke the protocol or died
    │   └── HostKeyError           an SSH host's key is unknown or has changed
    ├── MissingExtraError          (also ImportError) an optional extra is not installed
    └── RunFailedError             a run did not complete
        ├── RemoteError            the function (or command) raised on its system
        │   └── WorkerLostError    the worker died without recording an outcome
        └── RunCancelledError      the run was cancelled
"""

from __future__ import annotations


class RemoterunError(Exception):
    """Base class of every error remoterun raises on purpose."""

    #: The code this error crosses the wire with, from an agent to its client (the
    #: ``kind`` of a failure record; ``remoterun.agent.protocol.Failure`` names them).
    #: "" for errors that do not cross it as themselves.
    code = ""

    @classmethod
    def from_record(cls, record: dict, host: str) -> RemoterunError:
        """The error a failure record of this code stands for."""
        return cls(record.get("message") or "the remote side failed")


class InvalidRunNameError(RemoterunError, ValueError):
    """A run name or run path that is not allowed (slashes, ``..``, empty, too long)."""

    code = "name"


class RunNotFoundError(RemoterunError, LookupError):
    """No run of that name exists at that place."""


class RunNotFinishedError(RemoterunError):
    """An operation needs a terminal run and the run is still going."""


class RunExistsError(RemoterunError):
    """A copy's destination holds another run of the same name (pass overwrite=True)."""


class CacheMismatchError(RemoterunError):
    """A recorded run of that name was made from other arguments.

    Attributes:
        run_name: the run's name.
        differences: the parameters whose fingerprints differ.
    """

    def __init__(self, message: str, *, run_name: str = "", differences: tuple[str, ...] = ()):
        super().__init__(message)
        self.run_name = run_name
        self.differences = differences


class SerializationError(RemoterunError, TypeError):
    """An argument, function or return value cannot be pickled."""

    code = "serialization"


class RunStorageError(RemoterunError, OSError):
    """A run folder cannot be read or written (permissions, full disk, missing root)."""

    code = "storage"


class CorruptRunError(RunStorageError):
    """A run's record cannot be read, or one of its files is missing or does not match
    the SHA-256 digest its record holds. Nothing of it was unpickled.

    Attributes:
        url: the run folder's URL.
        filename: the file at fault (``config.json``, ``result.pkl``, ...).
    """

    code = "corrupt"

    def __init__(self, message: str, *, url: str = "", filename: str = ""):
        super().__init__(message)
        self.url = url
        self.filename = filename

    @classmethod
    def from_record(cls, record: dict, host: str) -> CorruptRunError:
        return cls(
            record.get("message") or "a damaged run",
            url=record.get("url") or "",
            filename=record.get("filename") or "",
        )

    def __str__(self) -> str:  # OSError would print "[Errno None] ..." once filename is set
        return str(self.args[0]) if self.args else ""


class UntrustedRunError(RemoterunError):
    """A run taken from a shared store carries no valid signature under the team key
    (unsigned, signed with another key, or changed since): nothing of it was unpickled.

    Attributes:
        url: the run folder's URL.
    """

    def __init__(self, message: str, *, url: str = ""):
        super().__init__(message)
        self.url = url


class SigningKeyError(RemoterunError):
    """A team signing key is needed and there is none, or the one given is malformed."""

    code = "key"

    @classmethod
    def from_record(cls, record: dict, host: str) -> SigningKeyError:
        return cls(f"{record.get('message')} (on {host or 'the host'})")


class SystemUnavailableError(RemoterunError):
    """A system cannot be reached or its agent cannot be started."""


class AgentError(SystemUnavailableError):
    """The agent broke the protocol, refused the handshake or died mid-request."""

    code = "agent"

    @classmethod
    def from_record(cls, record: dict, host: str) -> AgentError:
        return cls(f"the agent on {host or 'the host'} failed: {record.get('message')}")


class HostKeyError(SystemUnavailableError):
    """An SSH host's key is not in known_hosts, or differs from the one recorded there."""


class MissingExtraError(RemoterunError, ImportError):
    """An optional part of remoterun needs an extra that is not installed."""


class RunFailedError(RemoterunError):
    """A run did not complete.

    Attributes:
        run_name: the run's name ("" for an unrecorded call).
        host: the host that ran it.
        log_paths: where its stdout and stderr are, when it was recorded.
    """

    def __init__(
        self,
        message: str,
        *,
        run_name: str = "",
        host: str = "",
        log_paths: tuple[str, ...] = (),
    ):
        super().__init__(message)
        self.run_name = run_name
        self.host = host
        self.log_paths = log_paths


class RemoteError(RunFailedError):
    """The function or command raised on its system.

    The function's own exception, when it can be unpickled, is raised chained from this
    one (``raise exc from remote_error``), so ``except ValueError`` still works.

    Attributes:
        remote_traceback: the traceback text as the remote side printed it.
        exc_type: the qualified name of the remote exception's type.
    """

    def __init__(
        self,
        message: str,
        *,
        remote_traceback: str = "",
        exc_type: str = "",
        run_name: str = "",
        host: str = "",
        log_paths: tuple[str, ...] = (),
    ):
        super().__init__(message, run_name=run_name, host=host, log_paths=log_paths)
        self.remote_traceback = remote_traceback
        self.exc_type = exc_type

    def __str__(self) -> str:
        where = []
        if self.run_name:
            where.append(f"run {self.run_name!r}")
        if self.host:
            where.append(f"on {self.host}")
        head = super().__str__()
        if where:
            head = f"{head} ({' '.join(where)})"
        if self.log_paths:
            head += "\nlogs: " + ", ".join(self.log_paths)
        if self.remote_traceback:
            head += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return head


class WorkerLostError(RemoteError):
    """The worker process died (killed, ``os._exit``, out of memory) without an outcome."""


class RunCancelledError(RunFailedError):
    """The run was cancelled."""


def exception_from_record(
    record: dict,
    *,
    run_name: str = "",
    host: str = "",
    log_paths: tuple[str, ...] = (),
    trust_pickle: bool = True,
) -> BaseException:
    """The exception to raise for a failure record of the agent or a run's config.

    ``record`` holds ``message``, ``traceback``, ``type`` and optionally ``exc`` (the
    pickled exception) and ``kind``. For a remote exception whose pickle loads, the
    function's own exception is returned with a RemoteError as its ``__cause__``.
    """
    message = record.get("message") or "the remote side failed"
    by_code = _BY_CODE.get(record.get("kind") or "")
    if by_code is not None:
        return by_code.from_record(record, host)
    # A failed run's record (a "remote" failure): mapped by the type it names.
    exc_type = record.get("type") or ""
    if exc_type == _qualified(SerializationError):
        return SerializationError(message)
    if exc_type == _qualified(RunStorageError):
        where = f"run {run_name!r}" if run_name else "the run"
        return RunStorageError(f"{where} failed: {message}")
    common = dict(run_name=run_name, host=host, log_paths=log_paths)
    if exc_type == _qualified(RunCancelledError):
        return RunCancelledError(f"run {run_name!r} was cancelled", **common)
    if exc_type == _qualified(WorkerLostError):
        return WorkerLostError(message, exc_type=exc_type, **common)
    remote = RemoteError(
        message,
        remote_traceback=record.get("traceback") or "",
        exc_type=exc_type,
        **common,
    )
    data = record.get("exc")
    if data and trust_pickle:
        import cloudpickle

        try:
            original = cloudpickle.loads(data)
        except Exception:
            return remote
        if isinstance(original, BaseException):
            original.__cause__ = remote
            original.__suppress_context__ = True
            return original
    return remote


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# code -> the error a failure record of that code is raised as (see RemoterunError.code).
_BY_CODE: dict[str, type[RemoterunError]] = {
    cls.code: cls
    for cls in (
        InvalidRunNameError,
        SerializationError,
        RunStorageError,
        CorruptRunError,
        SigningKeyError,
        AgentError,
    )
}
