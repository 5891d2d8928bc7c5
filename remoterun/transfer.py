"""``run.to()``: a finished run's whole folder copied to another system or store.

The copy goes through this machine (``folder.copy_folder``: digests checked, records
last), except from a cluster host to an object store it can reach, which copies the folder
itself: the bytes then do not travel through the client. With the team key, the records
are written by this machine, which signs them; the key never goes to a host.
"""

from __future__ import annotations

import os
from typing import Any

from . import registry
from .agent import integrity
from .agent.runfolder import RunFolder
from .errors import RemoterunError
from .folder import copy_folder, copy_records, folder_protocols, split_run_url

# Runs and Systems (the layers above, which call this module).
Run = Any
System = Any

# Destinations a cluster host may write to itself. Never another SSH host: the host's own
# fsspec would connect there without this client's host-key checks or ProxyJump.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def copy_run(
    run: Run,
    system: Any,
    path: str | None,
    *,
    overwrite: bool,
    options: dict | None,
    progress: bool | None,
) -> tuple[System, RunFolder]:
    """Copy the terminal ``run`` to ``system`` / ``path`` (see ``Run.to``); return the
    system and folder it is in there. A copy onto itself copies nothing."""
    target, folder = destination(system, path, run.name, options or {})
    if folder.url == run.url:
        return target, folder
    options = options or getattr(target, "storage_options", None) or {}
    trusted = not run.needs_signature
    signing = integrity.signing_key() is not None
    if _copy_from_host(run, folder, options, overwrite, records=not signing):
        if signing:
            copy_records(run.folder, folder, trusted=trusted)
    else:
        copy_folder(run.folder, folder, overwrite=overwrite, progress=progress, trusted=trusted)
    return target, folder


def _copy_from_host(
    run: Run, folder: RunFolder, storage_options: dict, overwrite: bool, records: bool
) -> bool:
    """Copy from the run's own host straight to an object store, when the run is on a
    cluster and the host can reach the store; whether that was done. Without
    ``records`` the host leaves the run's records for this machine to write."""
    copy_direct = getattr(run.system, "copy_direct", None)
    if (
        copy_direct is None
        or not set(folder_protocols(folder)) & _OBJECT_STORES
        or run.folder.archived
    ):
        return False
    why = copy_direct(run.name, run.root, folder.url, storage_options, overwrite, records)
    import logging  # here, not at import: `import remoterun` stays light

    logger = logging.getLogger("remoterun.run")
    if why is None:
        logger.debug("%s copied %s to %s itself", run.system, run.name, folder.url)
        return True
    logger.debug(
        "%s cannot copy to %s itself (%s): streaming through this client",
        run.system,
        folder.url,
        why,
    )
    return False


def destination(
    system: Any, path: str | None, name: str, storage_options: dict
) -> tuple[System, RunFolder]:
    """Where ``run.to(system, path)`` puts the run named ``name``."""
    if system == "s3":
        if not path:
            raise RemoterunError(
                f"run.to('s3') needs path='bucket/prefix/{name}', the run's folder in S3"
            )
        system, path = "s3://" + path.split("://", 1)[-1].lstrip("/"), None
    is_url = isinstance(system, str) and ("://" in system or system.startswith(("/", ".", "~")))
    if is_url and path is None:
        url = os.path.expanduser(system).rstrip("/")
        root = url.rpartition("/")[0] if url.rpartition("/")[2] == name else url
        target = registry.load("storage")(root, **storage_options)
        return target, target.folder(name)
    target = registry.resolve(system).placement(name)
    if path is None:
        return target, target.folder(name)
    root, base = split_run_url(path)
    if base != name:
        raise RemoterunError(
            f"path {path!r} is the run's own folder, so its last part must be the run's "
            f"name: {root}/{base}/{name}, or {root}/{name}"
        )
    return target, target.folder(name, root)
