"""Which System a name or URL stands for, found through a registry of import strings.

As fsspec finds a filesystem by protocol, remoterun finds a system by what users write:
``"here"``, a folder path or URL (runs stored, not executed), the name of a saved cluster.
Each kind is named by an import string and loaded on first use, with the extra that
provides it named when it is missing ("SSH clusters need pip install 'remoterun[ssh]'"):
paramiko and s3fs load only when a cluster or a bucket is used. The modules that hold
runs (``run``, ``lineage``) find systems here, below the systems themselves, which build
Run handles: the layers stay one-way.

It also keeps the SSH hosts this process has open, by label, so that a lineage link to an
``ssh://`` URL is read through the connection (and host-key checks) already made.
"""

from __future__ import annotations

import importlib
import weakref
from typing import Any

from .errors import MissingExtraError, RemoterunError

#: kind -> ("module:attribute", the extra that provides it or None)
SYSTEMS: dict[str, tuple[str, str | None]] = {
    "here": ("remoterun.systems.local:local", None),
    "storage": ("remoterun.systems.storage:StorageSystem", None),
    "cluster": ("remoterun.systems:cluster", "ssh"),
    "saved": ("remoterun.systems.saved:saved_cluster", None),
}


def load(kind: str) -> Any:
    """The object registered for ``kind``, imported now."""
    target, extra = SYSTEMS[kind]
    module, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        if extra is None:
            raise
        raise MissingExtraError(f"{target} needs pip install 'remoterun[{extra}]' ({exc})") from exc


def is_system(spec: Any) -> bool:
    """Whether ``spec`` is a System already (anything with a root of run folders)."""
    return hasattr(spec, "folder") and hasattr(spec, "executes")


def is_url(spec: Any) -> bool:
    return isinstance(spec, str) and ("://" in spec or spec.startswith(("/", ".", "~")))


def resolve(spec: Any) -> Any:
    """The System that ``spec`` names: a System itself, ``None``/``"here"``/``"local"``,
    a folder path or fsspec URL (a storage system), or a cluster saved with
    ``cluster.save()``. Raises RemoterunError for anything else."""
    if is_system(spec):
        return spec
    if spec is None or spec in ("here", "local"):
        return load("here")()
    if is_url(spec):
        return load("storage")(spec)
    if isinstance(spec, str) and load("saved")(spec) is not None:
        return load("cluster")(spec)
    raise RemoterunError(
        f"cannot tell which system {spec!r} is: use 'here', a System object, a cluster "
        "saved with cluster.save(), a folder path or an fsspec URL"
    )


# --------------------------------------------------------------------------- open hosts

_open_hosts: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def add_open_host(host: Any) -> None:
    """Note an SSH host of a cluster of this process (its ``host_label()`` names it)."""
    _open_hosts[id(host)] = host


def open_host(label: str) -> Any:
    """A host of a live cluster of this process whose label is ``user@host:port``."""
    for host in list(_open_hosts.values()):
        if host.host_label() == label:
            return host
    return None


# --------------------------------------------------------------------------- shares


def share_list(share: Any) -> tuple[tuple[str, dict], ...]:
    """``share=`` as ``((url, storage_options), ...)``: it takes a folder URL, a storage
    system (``rr.systems.storage.StorageSystem(url, endpoint_url=...)``, whose options are
    kept), a ``(url, options)`` pair, or a list of these."""
    if share is None:
        return ()
    single = isinstance(share, str) or not hasattr(share, "__iter__") or _is_pair(share)
    found: dict[str, dict] = {}
    for item in [share] if single else share:
        if isinstance(item, str):
            url, options = item, {}
        elif _is_pair(item):
            url, options = item[0], dict(item[1])
        elif isinstance(getattr(item, "url", None), str):
            url, options = item.url, dict(getattr(item, "storage_options", {}) or {})
        else:
            raise TypeError(f"share= takes folder URLs or storage systems, not {item!r}")
        found.setdefault(url.rstrip("/"), options)
    return tuple(found.items())


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (list, tuple))
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], dict)
    )
