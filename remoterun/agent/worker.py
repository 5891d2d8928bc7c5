"""A recorded run's worker: a process forked by the fork server (see ``forkserver.py``)
into a session and process group of its own (``setsid``), so that it outlives the agent,
the SSH connection and the client. It executes the run and writes its outcome into the
folder itself, ``config.json`` last."""

from __future__ import annotations

import os
import signal
import sys

from . import layout, pickling, protocol

# Runs recorded before commands.py was split out of this module pickled run_commands as
# remoterun.agent.worker.run_commands: it is still found here.
from .commands import run_commands as run_commands
from .coroutines import run_to_end
from .failures import SERIALIZATION_ERROR, STORAGE_ERROR, error_record
from .procs import open_fds
from .record import RUNNING, RunRecord
from .runfolder import RunFolder, resolve_run_arguments
from .store import HostRuns


def spare_main(req_r: int, done_w: int) -> int:
    """Body of a spare worker: wait for a run, then run it. Returns the exit code."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    # Keep nothing of the agent's: its protocol pipes or SSH channel must see EOF when
    # the agent exits, whatever this worker does.
    keep = {0, 1, 2, req_r, done_w}
    for fd in open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    try:
        _, _, payload = protocol.read_frame(protocol.exact_reader(lambda n: os.read(req_r, n)))
    except EOFError:
        return 0  # no run came: the agent exited or let this spare go
    os.close(req_r)
    request = protocol.loads(payload)
    code = _run(HostRuns(request["root"]), request)
    try:
        os.write(done_w, b"1")  # the outcome is on disk
    except OSError:
        pass  # nobody waits for it
    return code


def _run(runs: HostRuns, request: dict) -> int:
    """Execute a recorded run in this (worker) process and write its outcome."""
    name = request["name"]
    folder = runs.folder(name)
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        log = folder.open_log(stream, truncate=False)
        os.dup2(log, fd)
        os.close(log)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ["REMOTERUN_RUN_DIR"] = folder.path
    os.environ["REMOTERUN_RUN_NAME"] = name

    pid = os.getpid()
    fn_name = (request.get("record") or {}).get("fn_name") or "the function"

    result_bytes: bytes | None = None
    error: dict | None = None
    try:
        fn = pickling.loads(request["fn"])
        inputs = pickling.loads(request["inputs"]) if request.get("inputs") else {}
        if request.get("run_args"):
            inputs = resolve_run_arguments(inputs)
        value = run_to_end(fn(*inputs.get("args", ()), **inputs.get("kwargs", {})))
        try:
            result_bytes = pickling.dumps(value)
        except Exception as exc:
            error = {
                "type": SERIALIZATION_ERROR,
                "message": f"the return value of {fn_name} "
                f"cannot be pickled ({type(value).__name__}): {exc}",
                "traceback": "",
                "exc": None,
            }
    except BaseException as exc:  # SystemExit and KeyboardInterrupt fail the run too
        error = error_record(exc, skip_frames=1)
        sys.stderr.write(error["traceback"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

    with runs.lock(name):
        config = folder.read_record() or RunRecord()
        if config.status != RUNNING or config.pid != pid:
            return 0  # cancelled meanwhile: its outcome is already written
        try:
            if error is None:
                folder.write_result(result_bytes or b"", config)
                config.completed()
            else:
                if error["exc"] is not None:
                    folder.write_error(error["exc"], config)
                config.failed(error["message"], error["type"], error["traceback"])
            folder.write_record(config)
        except OSError as exc:
            # The outcome or the record did not fit (a full disk): free what this attempt
            # wrote and record why it failed, which a small record can still say.
            error = _storage_failure(folder, config, exc)
    return 0 if error is None else 1


def _storage_failure(folder: RunFolder, config: RunRecord, exc: OSError) -> dict:
    """Record a run whose outcome could not be written as FAILED, saying why and where."""
    try:
        folder.remove_outcome(config)
    except OSError:
        pass
    message = f"the outcome could not be written: {layout.storage_message(exc)}"
    sys.stderr.write(f"remoterun: {message}\n")
    config.failed(message, STORAGE_ERROR)
    folder.write_record(config)  # if even this fails, the reaper marks the run lost
    return {"message": message}
