"""Systems: where runs execute and where their folders live.

``resolve`` turns what users write into a System: ``"here"``/``"local"``, a System
object, or a folder path / fsspec URL (storage only). Cluster names arrive with the
``ssh`` extra.
"""

from __future__ import annotations

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
    raise unknown_system(spec)


def cluster(name: str, **options: Any) -> System:
    """An SSH cluster (see ``remoterun.systems.ssh.SSHCluster`` for the options)."""
    try:
        from .ssh import SSHCluster
    except ImportError as exc:
        from ..errors import MissingExtraError

        raise MissingExtraError(
            f"SSH clusters need paramiko: pip install 'remoterun[ssh]' ({exc})"
        ) from exc
    return SSHCluster(name, **options)


__all__ = ["LocalSystem", "System", "cluster", "local", "resolve"]
