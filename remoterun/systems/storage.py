"""Storage-only systems: any fsspec URL (file, memory, s3, gs, ...) that holds run
folders but runs nothing."""

from __future__ import annotations

from typing import Any

import fsspec

from ..errors import MissingExtraError
from .base import System

# protocol -> (extra that provides it, package to name in the hint)
_EXTRAS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "sftp": ("ssh", "paramiko"),
    "ssh": ("ssh", "paramiko"),
}


class StorageSystem(System):
    """Run folders under ``url`` on an fsspec filesystem.

    Args:
        url: the folder holding the run folders, e.g. ``"s3://bucket/runs"``.
        storage_options: passed to the fsspec filesystem (credentials, endpoint_url, ...).
    """

    executes = False

    def __init__(self, url: str, **storage_options: Any):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        try:
            if protocol in ("ssh", "sftp"):  # host keys checked, as for a cluster
                from .ssh import url_filesystem  # here: paramiko is an optional extra

                self._fs, self._root = url_filesystem(self.url, **storage_options)
            else:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **storage_options)
        except ImportError as exc:
            extra, package = _EXTRAS.get(protocol, (None, None))
            if extra:
                hint = f"need the {package} package: pip install 'remoterun[{extra}]'"
            else:  # fsspec's own message names the package: "Please install gcsfs ..."
                hint = f"need fsspec's backend for {protocol!r}: {exc}"
            raise MissingExtraError(f"run folders at {self.url} {hint}") from exc
        except ValueError as exc:
            raise MissingExtraError(
                f"{protocol!r} is not a protocol fsspec knows ({self.url}): {exc}"
            ) from exc
        self.name = self.url

    def __reduce__(self) -> tuple:
        return (_rebuild, (self.url, self.storage_options))

    @property
    def root(self) -> str:
        return self._root.rstrip("/") or "/"

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self._fs


def _rebuild(url: str, storage_options: dict) -> StorageSystem:
    return StorageSystem(url, **storage_options)
