"""remoterun: run Python functions on remote machines and cache what they produce.

The public API is what ``__all__`` lists. What needs fsspec or more is imported on first
use: ``python -m remoterun.agent`` imports this package on hosts that have only the
stdlib and cloudpickle, and ``import remoterun`` stays fast. ``run`` is bound here
eagerly because the submodule of the same name would otherwise shadow the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AgentError,
    CacheMismatchError,
    CorruptRunError,
    HostKeyError,
    InvalidRunNameError,
    MissingExtraError,
    RemoteError,
    RemoterunError,
    RunCancelledError,
    RunExistsError,
    RunFailedError,
    RunNotFinishedError,
    RunNotFoundError,
    RunStorageError,
    SerializationError,
    SigningKeyError,
    SystemUnavailableError,
    UntrustedRunError,
    WorkerLostError,
)
from .run import Run, RunStatus, current_run, run
from .version import __version__

# public name -> module that defines it
_LAZY = {
    "Explanation": ".fingerprint",
    "LocalSystem": ".systems.local",
    "RaySystem": ".systems.ray",
    "RemoteFunction": ".function",
    "RunGraph": ".lineage",
    "SSHCluster": ".systems.ssh",
    "StorageSystem": ".systems.storage",
    "System": ".systems.base",
    "cluster": ".systems",
    "function": ".function",
    "local": ".systems.local",
    "ray": ".systems.ray",
}

if TYPE_CHECKING:
    from .fingerprint import Explanation
    from .function import RemoteFunction, function
    from .lineage import RunGraph
    from .systems import cluster
    from .systems.base import System
    from .systems.local import LocalSystem, local
    from .systems.ray import RaySystem, ray
    from .systems.ssh import SSHCluster
    from .systems.storage import StorageSystem


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'remoterun' has no attribute {name!r}")
    loaded = importlib.import_module(module, __name__)
    # Bind every name of that module at once: importing remoterun.function has just set
    # the attribute "function" to the module, which must not shadow the function.
    for public, where in _LAZY.items():
        if where == module:
            globals()[public] = getattr(loaded, public)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AgentError",
    "CacheMismatchError",
    "CorruptRunError",
    "Explanation",
    "HostKeyError",
    "InvalidRunNameError",
    "LocalSystem",
    "MissingExtraError",
    "RaySystem",
    "RemoteError",
    "RemoteFunction",
    "RemoterunError",
    "Run",
    "RunCancelledError",
    "RunExistsError",
    "RunFailedError",
    "RunGraph",
    "RunNotFinishedError",
    "RunNotFoundError",
    "RunStatus",
    "RunStorageError",
    "SSHCluster",
    "SerializationError",
    "SigningKeyError",
    "StorageSystem",
    "System",
    "SystemUnavailableError",
    "UntrustedRunError",
    "WorkerLostError",
    "__version__",
    "cluster",
    "current_run",
    "function",
    "local",
    "ray",
    "run",
]
