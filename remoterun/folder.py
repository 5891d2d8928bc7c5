"""RunFolder: one run's folder on any fsspec filesystem.

The file names themselves are spelled once, in ``remoterun.agent.layout``, which the agent
shares on hosts where fsspec is not installed.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
from typing import TYPE_CHECKING, Any

from .agent import layout
from .errors import InvalidRunNameError, RunStorageError

# Filesystems on which "write a temporary name, then rename" is atomic. Elsewhere (object
# stores) a single PUT of the whole object already is.
_RENAMING_PROTOCOLS = {"file", "local", "sftp", "ssh"}

if TYPE_CHECKING:
    import fsspec


def check_run_name(name: object) -> str:
    """Return ``name`` if it is a valid run name, else raise InvalidRunNameError."""
    try:
        return layout.check_run_name(name)
    except ValueError as exc:
        raise InvalidRunNameError(str(exc)) from None


def split_run_url(url: str) -> tuple[str, str]:
    """``"s3://b/runs/exp1"`` → ``("s3://b/runs", "exp1")``, with the name validated."""
    stripped = url.rstrip("/")
    if not stripped:
        raise InvalidRunNameError(f"invalid run path {url!r}: it names no folder")
    root, _, name = stripped.rpartition("/")
    check_run_name(name)
    return root or ".", name


class RunFolder:
    """The files of one run at ``path`` on ``fs``.

    Reads return None for a file that does not exist; writes are atomic. OSErrors are
    raised as RunStorageError naming the path.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, name: str | None = None):
        self.fs = fs
        self.path = path.rstrip("/")
        self.name = check_run_name(name or posixpath.basename(self.path))

    @classmethod
    def from_url(cls, url: str, **storage_options: Any) -> RunFolder:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        return cls(fs, path)

    def __repr__(self) -> str:
        return f"RunFolder({self.url!r})"

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def file(self, filename: str) -> str:
        return f"{self.path}/{filename}"

    def attempt(self, number: int) -> RunFolder:
        """The folder of an earlier attempt, ``attempts/<number>/``."""
        return RunFolder(self.fs, f"{self.path}/{layout.ATTEMPTS}/{int(number)}", self.name)

    # ------------------------------------------------------------------ reading

    def exists(self) -> bool:
        return self.read_config() is not None

    def read_bytes(self, filename: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.file(filename))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunStorageError(
                f"cannot read {self.fs.unstrip_protocol(self.file(filename))}: {exc}"
            ) from exc

    def read_config(self) -> dict | None:
        data = self.read_bytes(layout.CONFIG)
        return None if data is None else json.loads(data)

    def read_log(self, filename: str, offset: int = 0) -> bytes:
        """The bytes of a log file from ``offset`` on (empty if it does not exist yet)."""
        path = self.file(filename)
        try:
            if offset == 0:
                return self.fs.cat_file(path)
            size = self.fs.size(path)
            if size is None or size <= offset:
                return b""
            return self.fs.cat_file(path, start=offset, end=size)
        except FileNotFoundError:
            return b""

    def attempts(self) -> list[int]:
        """Numbers of the earlier attempts kept under ``attempts/``, ascending."""
        try:
            entries = self.fs.ls(self.file(layout.ATTEMPTS), detail=False)
        except FileNotFoundError:
            return []
        numbers = (posixpath.basename(e.rstrip("/")) for e in entries)
        return sorted(int(n) for n in numbers if n.isdigit())

    # ------------------------------------------------------------------ writing

    def makedirs(self) -> None:
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise RunStorageError(f"cannot create run folder {self.url}: {exc}") from exc

    def write_bytes(self, filename: str, data: bytes) -> None:
        """Write a whole file so that no reader ever sees a part of it."""
        path = self.file(filename)
        try:
            if set(_protocols(self.fs)) & _RENAMING_PROTOCOLS:
                tmp = self.file(f".{filename}.{secrets.token_hex(4)}.tmp")
                self.fs.pipe_file(tmp, data)
                try:
                    self.fs.mv(tmp, path)
                except BaseException:
                    self.fs.rm_file(tmp)
                    raise
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise RunStorageError(f"cannot write {self.fs.unstrip_protocol(path)}: {exc}") from exc

    def write_config(self, config: dict) -> None:
        self.write_bytes(
            layout.CONFIG, json.dumps(config, indent=1, sort_keys=True, default=str).encode()
        )


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class PosixFileSystem:
    """The few filesystem calls RunFolder makes, on the local disk, for code running on a
    host that has no fsspec (``rr.current_run()`` inside a function on a cluster)."""

    protocol = ("file", "local")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(path, "rb") as f:
            f.seek(start or 0)
            return f.read() if end is None else f.read(end - (start or 0))

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def ls(self, path: str, detail: bool = False) -> list[str]:
        return [posixpath.join(path, name) for name in sorted(os.listdir(path))]

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def pipe_file(self, path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    def mv(self, old: str, new: str) -> None:
        os.replace(old, new)

    def rm_file(self, path: str) -> None:
        os.unlink(path)

    def open(self, path: str, mode: str = "rb") -> Any:
        return open(path, mode)  # noqa: SIM115 - the caller closes it

    def unstrip_protocol(self, path: str) -> str:
        return "file://" + path


def local_filesystem() -> Any:
    """fsspec's local filesystem, or PosixFileSystem where fsspec is not installed."""
    try:
        from fsspec.implementations.local import LocalFileSystem
    except ImportError:
        return PosixFileSystem()
    return LocalFileSystem()
