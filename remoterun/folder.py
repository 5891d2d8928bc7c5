"""RunFolder: one run's folder on any fsspec filesystem.

The file names themselves are spelled once, in ``remoterun.agent.layout``, which the agent
shares on hosts where fsspec is not installed.
"""

from __future__ import annotations

import os
import posixpath
import sys
from typing import TYPE_CHECKING, Any

from .agent import integrity, layout
from .agent.record import CorruptRecord, RunRecord
from .errors import (
    CorruptRunError,
    InvalidRunNameError,
    RunExistsError,
    RunNotFoundError,
    RunStorageError,
    UntrustedRunError,
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
        except storage_errors() as exc:
            where = self.fs.unstrip_protocol(self.file(filename))
            raise RunStorageError(f"cannot read {where}: {storage_reason(exc)}") from exc

    def read_config(self) -> dict | None:
        """The run's record, None when there is none; CorruptRunError when config.json
        is not a record (not JSON, not an object, an unknown status)."""
        return self.decode_config(self.read_bytes(layout.CONFIG))

    def decode_config(self, data: bytes | None) -> dict | None:
        if data is None:
            return None
        try:
            return RunRecord.decode(data)
        except CorruptRecord as exc:
            raise self.corrupt(layout.CONFIG, f"{layout.CONFIG}: {exc}") from None

    def corrupt(self, filename: str, problem: str) -> CorruptRunError:
        """The error for a damaged file of this run, saying what to do."""
        return CorruptRunError(
            layout.corrupt_message(self.name, self.url, problem), url=self.url, filename=filename
        )

    def read_record(self, want_outcome: bool = False) -> dict:
        """``{"config": ...}``, plus for a terminal run ``result`` or ``error_pickle``
        bytes when ``want_outcome``: on object stores, the files are fetched at once
        (one round trip instead of two)."""
        if not want_outcome:
            return {"config": self.read_config()}
        paths = [self.file(f) for f in (layout.CONFIG, layout.RESULT, layout.ERROR)]
        try:
            got = self.fs.cat(paths, on_error="return")
        except FileNotFoundError:
            got = {}
        except storage_errors() as exc:
            raise RunStorageError(f"cannot read {self.url}: {storage_reason(exc)}") from exc
        found = {}
        for key, value in got.items():
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):  # credentials, permissions, network
                raise RunStorageError(f"cannot read {self.url}: {storage_reason(value)}") from value
            found[posixpath.basename(key)] = value
        config = self.decode_config(found.get(layout.CONFIG))
        reply: dict = {"config": config}
        if config and config.get("status") in layout.TERMINAL:
            if config["status"] == layout.COMPLETED:
                reply["result"] = found.get(layout.RESULT)
            else:
                reply["error_pickle"] = found.get(layout.ERROR)
        return reply

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
        """Create the folder on filesystems that have folders (on this machine: private
        to its owner). Object stores have none, and s3fs would create a missing *bucket*
        here: a typo must fail, not do that."""
        if not set(protocols(self.fs)) & (_RENAMING_PROTOCOLS | {"memory"}):
            return
        try:
            if self.local:
                layout.makedirs_private(self.path)
            else:
                self.fs.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise RunStorageError(f"cannot create run folder {self.url}: {exc}") from exc

    @property
    def local(self) -> bool:
        return bool(set(protocols(self.fs)) & {"file", "local"})

    def write_bytes(self, filename: str, data: bytes) -> None:
        """Write a whole file so that no reader ever sees a part of it."""
        path = self.file(filename)
        try:
            if self.local:  # private to the owner, like the files hosts write
                layout.write_atomic(path, data)
            elif set(protocols(self.fs)) & _RENAMING_PROTOCOLS:
                folder, base = posixpath.split(filename)
                tmp = self.file(posixpath.join(folder, f".{base}.{os.urandom(4).hex()}.tmp"))
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
        """Write the record, signed when this machine has the team key."""
        self.write_bytes(layout.CONFIG, RunRecord(config).encode())

    def write_pickle(self, filename: str, data: bytes, config: dict) -> None:
        """Write one of the run's pickles and note its digest in ``config``, which the
        caller writes after it."""
        self.write_bytes(filename, data)
        config.setdefault(integrity.DIGESTS, {})[filename] = integrity.digest(data)

    # ------------------------------------------------------------------ checking

    def check_trusted(self, config: dict, *, required: bool) -> None:
        """Raise UntrustedRunError unless ``config`` is signed under the team key, when
        ``required`` and there is a key (without one, digests are all that is checked)."""
        if not required:
            return
        key = integrity.signing_key()
        if key is None:
            return
        problem = integrity.signature_problem(config, key)
        if problem is None and config.get("name") != self.name:
            problem = f"it is the signed record of the run {config.get('name')!r}, not this one"
        if problem:
            raise UntrustedRunError(
                f"run {self.name!r} at {self.url} cannot be trusted: {problem}. Nothing of "
                "it was unpickled. Whoever can write to that store could have put it there; "
                "ask whoever made it to publish it again with the team key "
                f"(${integrity.KEY_ENV} or `remoterun keygen`)",
                url=self.url,
            )

    def check_digest(
        self, config: dict, filename: str, data: bytes | None, *, legacy_ok: bool = False
    ) -> bytes:
        """``data`` if it is the file the record's digest names; else CorruptRunError.
        ``legacy_ok``: a record from before digests is taken as it is (own stores only)."""
        problem = integrity.digest_problem(config, filename, data, legacy_ok=legacy_ok)
        if problem is None and legacy_ok and integrity.DIGESTS not in config:
            _warn_legacy(self.url)
        if problem:
            raise self.corrupt(filename, problem)
        assert data is not None
        return data


_legacy_warned: set[str] = set()


def _warn_legacy(url: str) -> None:
    if url not in _legacy_warned:
        _legacy_warned.add(url)
        import logging

        logging.getLogger(__name__).warning(
            "run %s was recorded before digests: read unchecked (run it again to record digests)",
            url,
        )


class FsspecFiles:
    """``layout.Files`` on an fsspec filesystem (this machine's: private folders)."""

    def __init__(self, fs: Any):
        self.fs = fs

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e.rstrip("/")) for e in entries]

    def mkdir(self, path: str) -> None:
        if set(protocols(self.fs)) & {"file", "local"}:
            layout.makedirs_private(path)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def move(self, src: str, dst: str) -> None:
        self.fs.mv(src, dst)


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

    config_bytes = src.read_bytes(layout.CONFIG)
    config = src.decode_config(config_bytes)
    if config is None:
        raise RunNotFoundError(f"no run at {src.url}")
    key = integrity.signing_key()
    # Records are signed here only once checked, or when they come from a store of
    # this user's own (``trusted``): a copy never launders a planted run.
    must_be_signed = not src.local if trusted is None else not trusted
    src.check_trusted(config, required=must_be_signed)
    try:
        existing = dst.read_config()
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
            dst.fs.rm(dst.path, recursive=True)
        except FileNotFoundError:
            pass
    elif existing is not None:
        # The same run, copied before: its files are about to be rewritten in place, so
        # its record goes first; it comes back last, as on a first copy.
        try:
            dst.fs.rm_file(dst.file(layout.CONFIG))
        except FileNotFoundError:
            pass
    try:
        found = src.fs.find(src.path, detail=True)
    except OSError as exc:
        raise RunStorageError(f"cannot list {src.url}: {exc}") from exc
    files = {
        posixpath.relpath(path, src.path): int(info.get("size") or 0)
        for path, info in found.items()
        if info.get("type", "file") != "directory"
        and not posixpath.basename(path).startswith(".")  # temporary files being written
    }
    # The records (the run's and its earlier attempts'), read first: they name the
    # digests the pickles must match, and are written last, archived attempts' before
    # the run's own.
    records: dict[str, tuple[bytes, dict]] = {layout.CONFIG: (config_bytes, config)}
    for rel in sorted(files):
        if posixpath.basename(rel) == layout.CONFIG and rel != layout.CONFIG:
            data = src.read_bytes(rel)
            folder = src.attempt(int(posixpath.basename(posixpath.dirname(rel))))
            records[rel] = (data, folder.decode_config(data) or {})
    for _, record in records.values():
        src.check_trusted(record, required=must_be_signed)
    order = sorted(rel for rel in files if posixpath.basename(rel) != layout.CONFIG)
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
        dst.makedirs()
        for rel in order:
            folder, filename = posixpath.split(rel)
            pickled = filename in layout.PICKLES
            got = _copy_file(
                src.fs, f"{src.path}/{rel}", dst.fs, f"{dst.path}/{rel}", digest=pickled
            )
            if pickled:
                record = records.get(posixpath.join(folder, layout.CONFIG), (b"", {}))[1]
                wanted = (record.get(integrity.DIGESTS) or {}).get(filename)
                legacy = integrity.DIGESTS not in record and not must_be_signed
                if got is not None and got != wanted and not legacy:
                    raise src.corrupt(
                        rel, f"{rel} does not match its digest; nothing was copied as a run"
                    )
            if bar is not None:
                bar.update(files[rel])
        for rel in order:
            size = dst.fs.size(f"{dst.path}/{rel}")
            if size != files[rel]:
                raise RunStorageError(
                    f"copy of {src.url}/{rel} is {size} bytes at {dst.url}, not {files[rel]}; "
                    "the run's config was not written there: copy again"
                )
        if write_records:
            _write_records(dst, records, key)
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
        import fsspec  # here: the host's Python may not have it

        fs, path = fsspec.core.url_to_fs(dst_url, **storage_options)
    except Exception as exc:  # ImportError, an unknown protocol: the client copies
        return f"{type(exc).__name__}: {exc}"
    src = RunFolder(fsspec.filesystem("file"), os.path.join(root, check_run_name(name)))
    try:
        copy_folder(
            src,
            RunFolder(fs, path),
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
    config_bytes = src.read_bytes(layout.CONFIG)
    config = src.decode_config(config_bytes)
    if config is None:
        raise RunNotFoundError(f"no run at {src.url}")
    records = {layout.CONFIG: (config_bytes, config)}
    for number in src.attempts():
        folder = src.attempt(number)
        data = folder.read_bytes(layout.CONFIG)
        if data is not None:
            records[f"{layout.ATTEMPTS}/{number}/{layout.CONFIG}"] = (
                data,
                folder.decode_config(data) or {},
            )
    for _, record in records.values():
        src.check_trusted(record, required=not trusted)
    _write_records(dst, records, integrity.signing_key())


def _write_records(dst: RunFolder, records: dict[str, tuple[bytes, dict]], key: Any) -> None:
    """Archived attempts' records first, the run's own last; signed when there is a key
    (the caller has checked them), else as they were."""
    for rel in sorted(records, key=lambda r: r == layout.CONFIG):
        data, record = records[rel]
        if key is not None:
            data = RunRecord(record).encode()
        dst.write_bytes(rel, data)


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
    src_local = bool(set(protocols(src_fs)) & {"file", "local"})
    dst_local = bool(set(protocols(dst_fs)) & {"file", "local"})
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
