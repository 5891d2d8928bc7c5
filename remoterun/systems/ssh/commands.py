"""Shell commands on a connected host, each over an exec channel of its own: the exit
status, output and error output they leave."""

from __future__ import annotations

import time

import paramiko


def _exec(
    client: paramiko.SSHClient, command: str, timeout: float | None, stdin: bytes = b""
) -> tuple[int, str, str]:
    """Run ``command`` on the host, ``stdin`` as its input; ``(exit status, out, err)``."""
    writer, stdout, stderr = client.exec_command(command, timeout=timeout)
    if stdin:
        writer.write(stdin)
    writer.channel.shutdown_write()
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def _drain_stderr(channel: paramiko.Channel) -> str:
    """The error output of a channel whose program is ending, read for at most 2 s."""
    deadline = time.monotonic() + 2
    parts = []
    while time.monotonic() < deadline:
        if channel.recv_stderr_ready():
            parts.append(channel.recv_stderr(65536))
        elif channel.exit_status_ready():
            while channel.recv_stderr_ready():
                parts.append(channel.recv_stderr(65536))
            break
        else:
            time.sleep(0.01)
    return b"".join(parts).decode(errors="replace")
