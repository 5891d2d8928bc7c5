"""The tour notebook (examples/tour.ipynb), executed by a real Jupyter kernel: awaited
calls on the kernel's event loop, runs shown as cards, map's progress widget, and
functions defined in cells running on an SSH host by value."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TOUR = Path(__file__).resolve().parent.parent / "examples" / "tour.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


def _outputs(notebook) -> dict[str, list[dict]]:
    return {cell.id: cell.get("outputs", []) for cell in notebook.cells}


def _text(outputs: list[dict]) -> str:
    """Everything a cell printed or returned, as text (HTML included)."""
    parts = []
    for output in outputs:
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        data = output.get("data") or {}
        parts.extend(data.get(kind, "") for kind in ("text/plain", "text/html"))
    return "\n".join(parts)


def _html(outputs: list[dict]) -> str:
    return "\n".join((o.get("data") or {}).get("text/html", "") for o in outputs)


def test_the_tour_notebook_runs_locally_and_on_an_ssh_host(ssh_server, tmp_path, monkeypatch):
    root = f"~/.remoterun/test-runs/tour-{tmp_path.name}"
    for key, value in {
        "TOUR_SSH_HOST": ssh_server.host,
        "TOUR_SSH_PORT": str(ssh_server.port),
        "TOUR_SSH_USER": ssh_server.user,
        "TOUR_SSH_KEY": str(ssh_server.client_key_path),
        "TOUR_SSH_KNOWN_HOSTS": str(ssh_server.known_hosts_path),
        "TOUR_SSH_PYTHON": ssh_server.remote_python(),
        "TOUR_SSH_ROOT": root,
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
    }.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(TOUR, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
    out = _outputs(notebook)

    # A RemoteFunction shows its name and system; a call, its value.
    assert "remote function" in _html(out["square-def"])
    assert "<b>square</b>" in _html(out["square-def"]) and "<b>here</b>" in _html(out["square-def"])
    assert _text(out["square-call"]).strip() == "49"
    assert "20 calls of 0.2 s each, awaited together" in _text(out["gather"])

    # A run awaited, then shown as a card with its params and last metrics.
    assert "'score': 0.9" in _text(out["train"])
    card = _html(out["train-card"])
    assert "Run tour-train" in card and "COMPLETED" in card
    assert "lr=0.1" in card and "loss=0.0333" in card and "folder" in card
    logs = _text(out["logs"])
    assert "log: epoch 0: trained with lr=0.1" in logs and "log: epoch 2" in logs
    broken = _html(out["broken"])
    assert "FAILED" in broken and "ValueError: cannot use &#x27;this&#x27;" in broken

    # map's progress bar is a notebook widget; the sum is right.
    assert any(WIDGET in (o.get("data") or {}) for o in out["map"])
    assert _text(out["map"]).strip().endswith(str(sum(x * x for x in range(500))))

    # Functions defined in cells ran on the SSH host, as its user.
    assert "<b>describe</b>" in _html(out["ssh-call"]) and "<b>tour</b>" in _html(out["ssh-call"])
    user = ssh_server.user
    assert f"12 squared is 144, by {user}" in _text(out["ssh-sync"])
    assert f"3 squared is 9, by {user}" in _text(out["ssh-await"])
    assert f"5 squared is 25, by {user}" in _text(out["ssh-run"])
    host_card = _html(out["ssh-card"])
    assert "Run tour-on-host" in host_card and "COMPLETED" in host_card
    assert "test-runs/tour-" in host_card  # its folder, on the host
    amap = _text(out["ssh-amap"])
    assert all(f"{i} squared is {i * i}, by {user}" in amap for i in range(4))
