"""Systems: where runs execute and where their folders live.

``resolve`` turns what users write into a System: ``"here"``/``"local"``, a System
object, or a folder path / fsspec URL (storage only). Cluster names arrive with the
``ssh`` extra.
"""

from __future__ import annotations

from typing import Any

from .. import registry
from ..errors import MissingExtraError
from .base import System
from .local import LocalSystem, local
from .saved import clusters_dir, save_cluster, saved_cluster, saved_clusters


def resolve(spec: Any) -> System:
    """The System that ``spec`` names (see ``remoterun.registry.resolve``); raises
    RemoterunError for something unknown."""
    return registry.resolve(spec)


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
        from .ssh import SSHCluster  # here: paramiko is an optional extra
    except ImportError as exc:
        raise MissingExtraError(
            f"SSH clusters need paramiko: pip install 'remoterun[ssh]' ({exc})"
        ) from exc
    return SSHCluster(name, **options)


__all__ = [
    "LocalSystem",
    "System",
    "cluster",
    "clusters_dir",
    "local",
    "resolve",
    "save_cluster",
    "saved_cluster",
    "saved_clusters",
]
