"""Peers installed from PyPI, each into its own virtual environment under bench/.venvs/.

A peer is measured inside its own environment by a small script of this folder
(``peer_*.py``) that prints its samples as JSON; the parent only turns them into Stats.
Nothing of a peer is imported into the process that measures remoterun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"

PEERS = {
    "joblib": ["joblib", "cloudpickle"],
    "execnet": ["execnet", "cloudpickle"],
}


class PeerUnavailable(RuntimeError):
    """A peer could not be installed or run here (its rows say why)."""


def ensure_venv(name: str) -> str:
    """The Python of ``bench/.venvs/NAME``, made and filled from PyPI on first use."""
    packages = PEERS[name]
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".bench-installed"
    if python.exists() and marker.exists() and marker.read_text().split() == packages:
        return str(python)
    print(f"[bench] installing {' '.join(packages)} into {venv} (first use)", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise PeerUnavailable(f"{' '.join(step[:4])} failed: {' / '.join(tail)}")
    marker.write_text(" ".join(packages) + "\n")
    return str(python)


def run_peer(name: str, script: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``bench/SCRIPT`` with peer NAME's Python and return the JSON it prints."""
    python = ensure_venv(name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [python, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"{script} exited {done.returncode}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
