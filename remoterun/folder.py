"""Run folders on any fsspec filesystem, and copies of whole run folders between them.

``agent.runfolder.RunFolder`` owns a folder's files over a minimal ``Files`` interface;
this module gives clients ``LocalFiles`` (this machine's disk) and ``FsspecFiles`` (SFTP,
S3, memory: any other fsspec filesystem), opens folders by URL,
and copies runs from one filesystem to another, checking digests and signatures.
"""

from __future__ import annotations

import os
import posixpath
import sys
from typing import TYPE_CHECKING, Any

from .agent import integrity, layout
from .agent.runfolder import POSIX, Files, PosixFiles, RunFolder
from .errors import (
    CorruptRunError,
    InvalidRunNameError,
    RunExistsError,
    RunNotFoundError,
    RunStorageError,
)

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


def open_folder(url: str, **storage_options: Any) -> RunFolder:
    """The run folder at ``url`` (any fsspec URL or a local path)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return RunFolder(files_of(fs), path)


class LocalFiles(PosixFiles):
    """``Files`` on this machine's disk for the client: as hosts write (atomic, private),
    with failures raised as RunStorageError naming the path. Needs no fsspec (runs
    recorded inside functions on hosts without it)."""

    def read(self, path: str, offset: int = 0) -> bytes | None:
        try:
            return super().read(path, offset)
        except OSError as exc:
            raise RunStorageError(f"cannot read {self.url(path)}: {storage_reason(exc)}") from exc

    def write(self, path: str, data: bytes) -> None:
        try:
            super().write(path, data)
        except OSError as exc:
            raise RunStorageError(f"cannot write {self.url(path)}: {exc}") from exc

    def mkdir(self, path: str) -> None:
        try:
            super().mkdir(path)
        except OSError as exc:
            raise RunStorageError(f"cannot create run folder {self.url(path)}: {exc}") from exc


LOCAL = LocalFiles()


def files_of(fs: Any) -> Files:
    """``Files`` over the fsspec filesystem ``fs``: this machine's disk directly."""
    if is_local(fs):
        return LOCAL
    return FsspecFiles(fs)


def fs_of(files: Files) -> Any:
    """The fsspec filesystem behind ``files`` (for copying whole folders)."""
    if isinstance(files, FsspecFiles):
        return files.fs
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def is_local(fs: Any) -> bool:
    return bool(set(protocols(fs)) & {"file", "local"})


class FsspecFiles:
    """``Files`` on any fsspec filesystem (SFTP, S3, memory): writes whole (a temporary
    name renamed where the filesystem can rename, a single PUT on object stores); read,
    write and folder failures raised as RunStorageError naming the URL."""

    local = False

    def __init__(self, fs: Any):
        self.fs = fs
        self.renames = bool(set(protocols(fs)) & _RENAMING_PROTOCOLS)
        self.folders = self.renames or "memory" in protocols(fs)

    def __repr__(self) -> str:
        return f"FsspecFiles({self.fs!r})"

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def read(self, path: str, offset: int = 0) -> bytes | None:
        try:
            if offset == 0:
                return self.fs.cat_file(path)
            size = self.fs.size(path)
            if size is None or size <= offset:
                return b""
            return self.fs.cat_file(path, start=offset, end=size)
        except FileNotFoundError:
            return None
        except storage_errors() as exc:
            raise RunStorageError(f"cannot read {self.url(path)}: {storage_reason(exc)}") from exc

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        try:
            got = self.fs.cat(paths, on_error="return")
        except FileNotFoundError:
            return {}
        except storage_errors() as exc:
            where = self.url(posixpath.dirname(paths[0]))
            raise RunStorageError(f"cannot read {where}: {storage_reason(exc)}") from exc
        found = {}
        for path, value in got.items():
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):  # credentials, permissions, network
                where = self.url(posixpath.dirname(path))
                raise RunStorageError(f"cannot read {where}: {storage_reason(value)}") from value
            found[path] = value
        return found

    def write(self, path: str, data: bytes) -> None:
        try:
            if self.renames:
                folder, base = posixpath.split(path)
                tmp = f"{folder}/.{base}.{os.urandom(4).hex()}.tmp"
                self.fs.pipe_file(tmp, data)
                try:
                    self.fs.mv(tmp, path)
                except BaseException:
                    self.fs.rm_file(tmp)
                    raise
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            if isinstance(exc, RunStorageError):
                raise
            raise RunStorageError(f"cannot write {self.url(path)}: {exc}") from exc

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e.rstrip("/")) for e in entries]

    def mkdir(self, path: str) -> None:
        """Folders where the filesystem has them. Object stores have none, and s3fs
        would create a missing *bucket* here: a typo must fail, not do that."""
        if not self.folders:
            return
        try:
            self.fs.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise RunStorageError(f"cannot create run folder {self.url(path)}: {exc}") from exc

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def move(self, src: str, dst: str) -> None:
        self.fs.mv(src, dst)

    def remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        self.fs.rm(path, recursive=True)


# --------------------------------------------------------------------------- copying

# Copies larger than this show a progress bar (on a terminal).
_PROGRESS_FROM = 32 << 20


def same_run(a: dict, b: dict) -> bool:
    """Whether two records are of the same execution (a copy of it, maybe older)."""
    keys = ("name", "start_time", "host", "pid", "attempt")
    return all(a.get(k) == b.get(k) for k in keys)


def copy_folder(
    src: RunFolder,
    dst: RunFolder,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    trusted: bool | None = None,
    write_records: bool = True,
) -> dict:
    """Copy a terminal run's whole folder (``attempts/`` included) to ``dst``; return its
    config. Files first, each checked for size and every pickle for its digest (hashed
    where the copy is on this machine), the records last: a copy cut short never looks
    like a run. With the team key the records written are signed, after checking the
    source's signatures unless it is ``trusted`` (a store of the user's own; by default,
    a folder on this machine): a copy never signs what it did not check. A destination
    holding another run of the name is refused unless ``overwrite``; one holding this
    same run is brought up to date. ``write_records=False`` copies all but the records,
    which ``copy_records`` then writes (a host copies, the client with the key signs).
    """
    import logging

    config_bytes = src.read_record_bytes()
    config = src.decode_record(config_bytes)
    if config is None:
        raise RunNotFoundError(f"no run at {src.url}")
    # Records are signed here only once checked, or when they come from a store of
    # this user's own (``trusted``): a copy never launders a planted run.
    must_be_signed = not src.local if trusted is None else not trusted
    src.check_trusted(config, required=must_be_signed)
    src_fs, dst_fs = fs_of(src.files), fs_of(dst.files)
    try:
        existing = dst.read_record()
    except CorruptRunError:
        existing = {}  # not a record: only overwrite=True replaces it
    if existing is not None and not same_run(existing, config):
        if not overwrite:
            raise RunExistsError(
                f"{dst.url} holds another run named {dst.name!r} (started "
                f"{existing.get('start_time')} on {existing.get('host')}); pass "
                "overwrite=True to replace it, or copy to another path"
            )
        try:
            dst.remove()
        except FileNotFoundError:
            pass
    elif existing is not None:
        # The same run, copied before: its files are about to be rewritten in place, so
        # its record goes first; it comes back last, as on a first copy.
        dst.remove_record()
    try:
        found = src_fs.find(src.path, detail=True)
    except OSError as exc:
        raise RunStorageError(f"cannot list {src.url}: {exc}") from exc
    files = {
        posixpath.relpath(path, src.path): int(info.get("size") or 0)
        for path, info in found.items()
        if info.get("type", "file") != "directory"
        and not posixpath.basename(path).startswith(".")  # temporary files being written
    }
    # The records (the run's and its earlier attempts'), read first: they name the
    # digests the pickles must match, and are written last.
    # The run's own record is the one read first, listed or not (a re-execution may
    # have archived it since).
    records: dict[str, tuple[bytes, dict]] = {RunFolder.RECORD_FILE: (config_bytes, config)}
    for rel in RunFolder.record_paths(files):
        if not RunFolder.own_record(rel):
            folder = src.folder_of(rel)
            data = folder.read_record_bytes() or b""
            records[rel] = (data, folder.decode_record(data) or {})
    for _, record in records.values():
        src.check_trusted(record, required=must_be_signed)
    order = sorted(rel for rel in files if not RunFolder.is_record(rel))
    total = sum(files.values())
    logging.getLogger(__name__).debug(
        "copying %s (%d files, %d bytes) to %s through this process",
        src.url,
        len(files),
        total,
        dst.url,
    )
    bar = _progress(total, f"copy {src.name}", progress)
    try:
        dst.create()
        for rel in order:
            pickle = RunFolder.pickle_of(rel)  # (its record's path, its digest's key)
            got = _copy_file(
                src_fs, f"{src.path}/{rel}", dst_fs, f"{dst.path}/{rel}", digest=bool(pickle)
            )
            if pickle:
                record = records.get(pickle[0], (b"", {}))[1]
                wanted = (record.get(integrity.DIGESTS) or {}).get(pickle[1])
                legacy = integrity.DIGESTS not in record and not must_be_signed
                if got is not None and got != wanted and not legacy:
                    raise src.corrupt(
                        rel, f"{rel} does not match its digest; nothing was copied as a run"
                    )
            if bar is not None:
                bar.update(files[rel])
        for rel in order:
            size = dst_fs.size(f"{dst.path}/{rel}")
            if size != files[rel]:
                raise RunStorageError(
                    f"copy of {src.url}/{rel} is {size} bytes at {dst.url}, not {files[rel]}; "
                    "the run's config was not written there: copy again"
                )
        if write_records:
            _write_records(dst, records)
    except storage_errors() as exc:
        if isinstance(exc, RunStorageError):
            raise
        raise RunStorageError(f"cannot copy {src.url} to {dst.url}: {storage_reason(exc)}") from exc
    finally:
        if bar is not None:
            bar.close()
    return config


def copy_out(
    root: str, name: str, dst_url: str, storage_options: dict, overwrite: bool, records: bool
) -> str | None:
    """Copy the run ``name`` of this host's ``root`` to ``dst_url`` (an object store) from
    here, so that its bytes do not travel through the client: a cluster sends this
    function to its host as a call. None once copied; else why it could not be (no
    fsspec or no backend for the store in the host's Python, the store out of reach),
    and the client copies instead. RunExistsError and RunNotFoundError are raised, as the
    client's own copy would raise them. ``records=False`` leaves the records to the
    client, which signs them."""
    try:
        dst = open_folder(dst_url, **storage_options)  # the host's Python may lack fsspec
    except Exception as exc:  # ImportError, an unknown protocol: the client copies
        return f"{type(exc).__name__}: {exc}"
    src = RunFolder(POSIX, os.path.join(root, check_run_name(name)))
    try:
        copy_folder(
            src,
            dst,
            overwrite=overwrite,
            progress=False,
            trusted=True,  # this host's own runs
            write_records=records,
        )
    except (RunExistsError, RunNotFoundError):
        raise
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def copy_records(src: RunFolder, dst: RunFolder, *, trusted: bool) -> None:
    """Write the records of ``src`` (its own and its earlier attempts') to ``dst``, where
    the rest of the folder was copied already: signed with the team key, after checking
    them unless ``trusted``; the run's own record last."""
    config_bytes = src.read_record_bytes()
    config = src.decode_record(config_bytes)
    if config is None:
        raise RunNotFoundError(f"no run at {src.url}")
    records = {src.path: (config_bytes, config)}
    for number in src.attempts():
        folder = src.attempt(number)
        data = folder.read_record_bytes()
        if data is not None:
            records[folder.path] = (data, folder.decode_record(data) or {})
    for _, record in records.values():
        src.check_trusted(record, required=not trusted)
    _write_records(dst, {src.relative(path): value for path, value in records.items()})


def _write_records(dst: RunFolder, records: dict[str, tuple[bytes, dict]]) -> None:
    """Write ``records`` (path relative to the run folder → its bytes and record) to the
    folders they belong to, archived attempts' first, the run's own last; signed when
    there is a key (the caller has checked them), else as they were."""
    key = integrity.signing_key()
    for rel in RunFolder.record_paths(records):
        data, record = records[rel]
        folder = dst.folder_of(rel)
        if key is not None:
            folder.write_record(record)
        else:
            folder.write_record_bytes(data)


def _progress(total: int, label: str, progress: bool | None) -> Any:
    if progress is False or (progress is None and total < _PROGRESS_FROM):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None)


def _copy_file(src_fs: Any, src: str, dst_fs: Any, dst: str, digest: bool = False) -> str | None:
    """One file between any two filesystems with the backends' own transfers (multipart
    on S3, pipelined on SFTP), never whole in memory: through a local temporary file
    when neither side is local. With ``digest``, returns the SHA-256 digest of the bytes
    as they are on this machine (the source, the copy, or the staged file)."""
    src_local, dst_local = is_local(src_fs), is_local(dst_fs)
    if dst_local:
        layout.makedirs_private(posixpath.dirname(dst))
    if src_local and dst_local:
        import shutil

        shutil.copyfile(src, dst)
    elif src_local:
        dst_fs.put_file(src, dst)
    elif dst_local:
        src_fs.get_file(src, dst)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="remoterun-copy-") as tmp:
            staged = os.path.join(tmp, "file")
            src_fs.get_file(src, staged)
            dst_fs.put_file(staged, dst)
            return integrity.file_digest(staged) if digest else None
    if dst_local:
        os.chmod(dst, layout.FILE_MODE)
    if not digest:
        return None
    return integrity.file_digest(src if src_local else dst)


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a filesystem backend raises for a storage failure: OSError, and botocore's
    own errors, which s3fs lets through for missing credentials or a bad endpoint. (An
    ``except`` evaluates this only once an exception is being matched.)"""
    errors: list[type[BaseException]] = [OSError]
    if "botocore" in sys.modules:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    return tuple(errors)


def storage_reason(exc: BaseException) -> str:
    """What a storage error says, with what to do about missing credentials."""
    text = f"{exc}" or type(exc).__name__
    if "credentials" in text.lower():
        profile = os.environ.get("AWS_PROFILE") or "default"
        text += (
            f" (profile {profile!r}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or pass storage_options={'key': ..., 'secret': ...}"
        )
    return text


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def folder_protocols(folder: RunFolder) -> tuple[str, ...]:
    """The fsspec protocols of the filesystem holding ``folder``."""
    return ("file", "local") if folder.local else protocols(fs_of(folder.files))


def storage_options_of(folder: RunFolder) -> dict:
    """The storage options the folder's filesystem was opened with."""
    return getattr(getattr(folder.files, "fs", None), "storage_options", None) or {}
