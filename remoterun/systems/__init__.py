"""Systems: where runs execute and where their folders live.

``resolve`` turns what users write into a System: ``"here"``/``"local"``, a System
object, or a folder path / fsspec URL (storage only). Cluster names arrive with the
``ssh`` extra.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .base import System
from .local import LocalSystem, local


def resolve(spec: Any) -> System:
    """The System that ``spec`` names; raises RemoterunError for something unknown."""
    from .base import unknown_system

    if isinstance(spec, System):
        return spec
    if spec is None or spec in ("here", "local"):
        return local()
    if isinstance(spec, str) and ("://" in spec or spec.startswith(("/", ".", "~"))):
        from .storage import StorageSystem

        return StorageSystem(spec)
    if isinstance(spec, str) and saved_cluster(spec) is not None:
        return cluster(spec)
    raise unknown_system(spec)


# Option names whose values are not written by cluster.save(): a saved cluster names key
# files, it never holds secrets.
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def clusters_dir() -> str:
    from .local import default_home

    return os.path.join(default_home(), "clusters")


def saved_cluster(name: str) -> dict | None:
    """The options of the cluster saved as ``name`` with ``cluster.save()``, or None."""
    from ..agent import layout

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
    from ..agent import layout
    from ..errors import InvalidRunNameError

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


def cluster(name: str, **options: Any) -> System:
    """An SSH cluster (see ``remoterun.systems.ssh.SSHCluster`` for the options).

    With no options, a cluster saved as ``name`` with ``cluster.save()`` is loaded; else
    ``name`` is the host's alias in ~/.ssh/config.
    """
    if not options or set(options) <= {"env"}:
        saved = saved_cluster(name)
        if saved is not None:
            saved["env"] = {**(saved.get("env") or {}), **(options.get("env") or {})}
            options = saved
    try:
        from .ssh import SSHCluster
    except ImportError as exc:
        from ..errors import MissingExtraError

        raise MissingExtraError(
            f"SSH clusters need paramiko: pip install 'remoterun[ssh]' ({exc})"
        ) from exc
    return SSHCluster(name, **options)


__all__ = ["LocalSystem", "System", "cluster", "local", "resolve", "saved_clusters"]
