"""Clusters saved with ``cluster.save()``: their options in
``$REMOTERUN_HOME/clusters/<name>.json`` (key paths, never keys or secrets)."""

from __future__ import annotations

import json
import logging
import os

from ..agent import layout
from ..errors import InvalidRunNameError
from .local import default_home

# Option names whose values are not written by cluster.save(): a saved cluster names key
# files, it never holds secrets.
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def clusters_dir() -> str:
    return os.path.join(default_home(), "clusters")


def saved_cluster(name: str) -> dict | None:
    """The options of the cluster saved as ``name`` with ``cluster.save()``, or None."""
    try:
        layout.check_run_name(name)
    except ValueError:
        return None
    try:
        with open(os.path.join(clusters_dir(), name + ".json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def saved_clusters() -> list[str]:
    try:
        names = os.listdir(clusters_dir())
    except FileNotFoundError:
        return []
    return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))


def save_cluster(name: str, options: dict) -> str:
    """Write a cluster's options to ``$REMOTERUN_HOME/clusters/<name>.json``; return the
    path. Environment variables that look like secrets are left out, with a warning."""
    try:
        layout.check_run_name(name)
    except ValueError:
        raise InvalidRunNameError(
            f"cannot save cluster {name!r}: its name must be usable as a file name "
            "(letters, digits, '.', '_', '-')"
        ) from None
    options = dict(options)
    env = dict(options.get("env") or {})
    dropped = sorted(k for k in env if any(w in k.upper() for w in _SECRET_WORDS))
    for key in dropped:
        del env[key]
    if dropped:
        logging.getLogger(__name__).warning(
            "cluster %r saved without the environment variables %s (they may be secrets): "
            "pass them with env= when you load it",
            name,
            ", ".join(dropped),
        )
    options["env"] = env
    os.makedirs(clusters_dir(), exist_ok=True)
    path = os.path.join(clusters_dir(), name + ".json")
    layout.write_atomic(path, json.dumps(options, indent=1, sort_keys=True).encode())
    return path
