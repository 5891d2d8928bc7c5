"""Digests and signatures of run records: standard library only.

Every pickle a run folder holds has its SHA-256 digest in the record (``digests``), written
with it; a reader checks the digest before it unpickles anything. With a team key, a
record also carries ``signature``: HMAC-SHA256 over the canonical record (every field but
the signature itself, digests included), so that a run taken from a shared store can be
told apart from one planted there by whoever else can write to it.

The key is ``$REMOTERUN_SIGNING_KEY`` (any text of 16 characters or more), else the key
file ``remoterun keygen`` writes, ``$REMOTERUN_HOME/signing.key`` (mode 0600).
"""

from __future__ import annotations

import json
import os

from ..errors import SigningKeyError

DIGESTS = "digests"
SIGNATURE = "signature"
KEY_ENV = "REMOTERUN_SIGNING_KEY"
KEY_FILE = "signing.key"
_ALGORITHM = "hmac-sha256"
_MIN_KEY = 16


def digest(data: bytes | bytearray | memoryview) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    import hashlib  # here and below: not at import, `import remoterun` stays light

    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str:
    """``digest`` of a file's bytes, read a slice at a time (a 1 GB result is not read
    into memory whole)."""
    import hashlib

    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return "sha256:" + hasher.hexdigest()


def digest_problem(
    record: dict, filename: str, data: bytes | None, *, legacy_ok: bool = False
) -> str | None:
    """Why ``data``, read as the run's ``filename``, must not be unpickled; None if its
    digest is the one the record holds. With ``legacy_ok``, a record from before digests
    (no ``digests`` field at all) is taken as it is: it was read from a store of the
    owner's own, where nobody else writes."""
    if data is None:
        return f"{filename} is missing"
    if legacy_ok and DIGESTS not in record:
        return None
    wanted = (record.get(DIGESTS) or {}).get(filename)
    if not wanted:
        return f"the record holds no digest for {filename}"
    import hmac

    if not hmac.compare_digest(digest(data), str(wanted)):
        return f"{filename} does not match its digest (changed or damaged since it was written)"
    return None


def home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("REMOTERUN_HOME") or "~/.remoterun"))


def key_file() -> str:
    return os.path.join(home(), KEY_FILE)


# The key file's (path, mtime, size) and its key: a record write costs a stat, not a read.
_key_file_cache: tuple[tuple, bytes] | None = None


def signing_key() -> bytes | None:
    """The team key: ``$REMOTERUN_SIGNING_KEY``, else the key file; None when neither is
    there. Raises ``SigningKeyError`` for a key that is too short or a key file that cannot
    be read."""
    global _key_file_cache
    text = os.environ.get(KEY_ENV)
    if text:
        return _checked(text, f"${KEY_ENV}")
    path = key_file()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key file {path}: {exc}") from exc
    stamp = (path, info.st_mtime_ns, info.st_size)
    if _key_file_cache is not None and _key_file_cache[0] == stamp:
        return _key_file_cache[1]
    try:
        with open(path, encoding="utf-8") as f:
            key = _checked(f.read().strip(), path)
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key file {path}: {exc}") from exc
    _key_file_cache = (stamp, key)
    return key


def _checked(text: str, where: str) -> bytes:
    if len(text) < _MIN_KEY:
        raise SigningKeyError(
            f"the signing key in {where} is {len(text)} characters; a key has at least "
            f"{_MIN_KEY} (make one with `remoterun keygen`)"
        )
    return text.encode("utf-8")


def key_id(key: bytes) -> str:
    """A short public name of a key (so an error can say "signed with another key")."""
    import hashlib

    return hashlib.sha256(b"remoterun key id\0" + key).hexdigest()[:16]


def new_key_text() -> str:
    return os.urandom(32).hex()


def canonical(record: dict) -> bytes:
    """The bytes a signature covers: the record but its signature, as sorted compact JSON.
    Sign only a record as JSON gives it back (``as_json``): ``{1: ...}`` sorts otherwise
    than the ``{"1": ...}`` a reader holds."""
    body = {k: v for k, v in record.items() if k != SIGNATURE}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    ).encode()


def _mac(record: dict, key: bytes) -> str:
    import hashlib
    import hmac

    return hmac.new(key, canonical(record), hashlib.sha256).hexdigest()


def sign(record: dict, key: bytes | None) -> dict:
    """Set ``record``'s signature under ``key`` (drop a stale one when key is None);
    returns the record."""
    if key is None:
        record.pop(SIGNATURE, None)
        return record
    record.pop(SIGNATURE, None)
    record[SIGNATURE] = {"alg": _ALGORITHM, "key_id": key_id(key), "mac": _mac(record, key)}
    return record


def as_json(record: dict) -> dict:
    """The record as a reader of its JSON will hold it."""
    return json.loads(json.dumps(record, default=str))


def signature_problem(record: dict, key: bytes) -> str | None:
    """Why ``record`` is not signed under ``key``; None if it is."""
    signature = record.get(SIGNATURE)
    if not isinstance(signature, dict) or not signature.get("mac"):
        return "it is not signed"
    if signature.get("alg") != _ALGORITHM:
        return f"it is signed with an unknown algorithm {signature.get('alg')!r}"
    if signature.get("key_id") != key_id(key):
        return "it is signed with another key than yours"
    import hmac

    if not hmac.compare_digest(str(signature["mac"]), _mac(record, key)):
        return "its signature does not match its contents (changed since it was signed)"
    return None


def write_key_file(path: str | None = None, *, force: bool = False) -> str:
    """Write a new random key to ``path`` (default: the key file), readable by its owner
    only; return the path. An existing file is kept unless ``force``."""
    path = os.path.abspath(os.path.expanduser(path or key_file()))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (new_key_text() + "\n").encode())
    finally:
        os.close(fd)
    return path
