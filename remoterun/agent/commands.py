"""Shell commands and Python source lines run on this host (``system.run`` and
``system.run_python``): output streamed as it comes, and returned."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any


def run_commands(cmds: list[str], python_lines: bool = False) -> list[tuple[int, str, str]]:
    """Run shell commands one after the other (or one Python program made of lines).

    Each command's output is streamed to this process's stdout and stderr as it comes and
    also returned: ``[(returncode, stdout, stderr), ...]``.
    """
    if python_lines:
        cmds_to_run: list[list[str] | str] = [[sys.executable, "-c", "\n".join(cmds)]]
    else:
        cmds_to_run = list(cmds)
    return [_run_command(cmd) for cmd in cmds_to_run]


def _run_command(cmd: list[str] | str) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        cmd,
        shell=isinstance(cmd, str),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    captured: dict[int, bytes] = {}
    threads = [
        threading.Thread(target=_tee_pipe, args=(proc.stdout, sys.stdout.buffer, captured, 1)),
        threading.Thread(target=_tee_pipe, args=(proc.stderr, sys.stderr.buffer, captured, 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    returncode = proc.wait()
    return (
        returncode,
        captured[1].decode(errors="replace"),
        captured[2].decode(errors="replace"),
    )


def _tee_pipe(pipe: Any, sink: Any, captured: dict[int, bytes], key: int) -> None:
    """Copy a child's output to ``sink`` as it comes, and keep it in ``captured[key]``."""
    parts = []
    for chunk in iter(lambda: pipe.read1(65536), b""):
        parts.append(chunk)
        sink.write(chunk)
        sink.flush()
    captured[key] = b"".join(parts)
