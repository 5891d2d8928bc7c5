"""The pipeline example behaves as its docstring says, on this machine and on an SSH
cluster: a second run executes nothing, editing a helper re-executes exactly the steps
that depend on it (and explain names it), a comment edit executes nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SSH_PARAMS, make_cluster, transport_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pipeline.py"


def _run(script: Path, *args: str) -> tuple[list[str], list[str], str]:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout

    def listed(label: str) -> list[str]:
        line = re.search(rf"^{label}: (.*)$", out, re.M).group(1)
        return [] if line == "nothing" else line.split(", ")

    return listed("executed"), listed("cached"), out


@pytest.mark.parametrize("where", ["local", *SSH_PARAMS])
def test_pipeline_example(where, tmp_path, request):
    script = tmp_path / "pipeline.py"
    shutil.copy(EXAMPLE, script)
    args: list[str] = []
    if where != "local":
        cluster = make_cluster(
            request.getfixturevalue("ssh_server"),
            name="pipeline-test",
            transport=transport_of(where),
        )
        cluster.save()  # the script loads it by name, in its own process
        request.addfinalizer(lambda root=cluster.root: shutil.rmtree(root, ignore_errors=True))
        cluster.close()
        args = ["--system", "pipeline-test"]

    executed, cached, out = _run(script, *args)
    assert executed == ["prepare", "train", "evaluate"] and cached == []

    executed, cached, out = _run(script, *args)
    assert executed == [] and cached == ["prepare", "train", "evaluate"]
    assert "miss" not in out

    source = script.read_text()
    script.write_text(source.replace("    slope = sxy / sxx", "    slope = round(sxy / sxx, 9)"))
    executed, cached, out = _run(script, *args)
    assert executed == ["train", "evaluate"] and cached == ["prepare"]
    assert "code: __main__.fit_line changed" in out
    assert "argument 'model' differs" in out
    assert "train-" in out and "--used by--> pipeline" in out
    assert (tmp_path / "pipeline.dot").read_text().startswith("digraph runs {")

    edited = script.read_text()
    script.write_text(edited.replace('"""Least squares', '"""Fits a line. Least squares'))
    executed, cached, _ = _run(script, *args)
    assert executed == [] and cached == ["prepare", "train", "evaluate"]
