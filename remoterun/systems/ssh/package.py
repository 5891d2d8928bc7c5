"""The host package: remoterun's and cloudpickle's sources with a manifest of their
SHA-256 digests, the host-side programs that check, install and boot it, and the upload.

The package is installed in ``~/.remoterun/pkg/<version>/`` on each host (once per
version, private to the host's user); the host checks the folder against the manifest
each time an agent starts from it (else the client installs it again). The first agent
of a host boots able to take the package in its own session (``boot_install``); later
ones, and a retry after that fails, have it installed in a session of its own
(``upload_package``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shlex
import tarfile
from typing import Callable, NamedTuple

import cloudpickle

PKG_DIR = ".remoterun/pkg"
# remoterun's own folder: this file is remoterun/systems/ssh/package.py.
_REMOTERUN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIN_PYTHON = (3, 9)


class HostPackage(NamedTuple):
    """What the client installs on hosts: remoterun's and cloudpickle's Python sources."""

    version: str  # names the host's folder, ~/.remoterun/pkg/<version>
    archive: bytes  # tar.gz of the sources and their manifest
    manifest_digest: str  # SHA-256 of the manifest, which holds each file's SHA-256


@functools.lru_cache(maxsize=1)
def package_archive() -> HostPackage:
    """The package to install on hosts, built once per process.

    The version covers every file's path and content, so any change installs anew. The
    archive holds a manifest (``.manifest``, ``sha256sum`` format: ``<digest>  <path>``),
    which the host checks the folder against each time an agent starts.
    """
    sources = []
    for top in (_REMOTERUN, os.path.dirname(os.path.abspath(cloudpickle.__file__))):
        base = os.path.dirname(top)
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for filename in sorted(files):
                if filename.endswith(".py"):
                    path = os.path.join(folder, filename)
                    with open(path, "rb") as f:
                        sources.append((os.path.relpath(path, base).replace(os.sep, "/"), f.read()))
    version = hashlib.blake2b(digest_size=10)
    manifest = []
    for name, data in sources:
        version.update(name.encode() + b"\0" + data + b"\0")
        manifest.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    manifest_bytes = "".join(manifest).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name, data in [*sources, (".manifest", manifest_bytes)]:  # read by _HOST_PRELUDE
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600  # the host's folders are private to their owner
            tar.addfile(info, io.BytesIO(data))
    return HostPackage(
        version.hexdigest(), buffer.getvalue(), hashlib.sha256(manifest_bytes).hexdigest()
    )


# The start of every Python program the client runs on a host, before it imports anything
# but os and sys (loaded before any path is searched). The host user's home (the working
# directory, put first on sys.path as '') and PYTHONPATH must not shadow remoterun,
# cloudpickle or the standard library: so the standard library comes first, then the
# rest (PYTHONPATH, site-packages) for the user's functions, and the working directory
# not at all; the package is put before them all once it checks out (_BOOT). ``python
# -I`` would also drop the user's site-packages.
# argv[1] is the package folder (relative to the home folder), argv[2] the manifest's digest.
_HOST_PRELUDE = r"""
import os, sys
pkg, expected = os.path.abspath(sys.argv[1]), sys.argv[2]
stdlib = os.path.dirname(os.__file__)
zipped = os.path.join(os.path.dirname(stdlib), "python%d%d.zip" % sys.version_info[:2])
lib = [p for p in sys.path if p in (stdlib, zipped) or (p.startswith(stdlib + os.sep)
       and os.path.basename(p) not in ("site-packages", "dist-packages"))]
sys.path[:] = lib + [p for p in sys.path if p not in lib and p not in ("", ".", os.getcwd(),
                    pkg)]
import hashlib


def damage(folder):
    # Why the folder is not the package the client sent, or "" when it is.
    try:
        with open(os.path.join(folder, ".manifest"), "rb") as f:
            manifest = f.read()
    except OSError:
        return "it is missing" if not os.path.isdir(folder) else "its manifest is missing"
    if hashlib.sha256(manifest).hexdigest() != expected:
        return "its manifest was changed"
    listed = {".manifest", ".complete"}
    for line in manifest.decode().splitlines():
        digest, name = line.split("  ", 1)
        listed.add(name)
        try:
            with open(os.path.join(folder, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return name + " was changed"
        except OSError:
            return name + " is missing"
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            name = os.path.relpath(os.path.join(top, name), folder)
            if name not in listed:
                return name + " was added"
    return ""


def private(path):
    # Owner only: what runs here (and a run's secrets) is nobody else's to read or change.
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
"""

# Installs ``archive`` (the tar.gz): extracted next to its final place, checked, then
# renamed there, so that a folder under pkg/<version> is complete. A folder that is
# there but damaged is replaced; one that checks out (another client was first) is kept.
# Returns why the extracted archive does not check out, or "".
_INSTALL = r"""
def install(archive):
    mask = os.umask(0o077)
    try:
        return install_private(archive)
    finally:
        os.umask(mask)  # the agent that may run next keeps the session's own

def install_private(archive):
    import io, shutil, tarfile
    for path in (os.path.dirname(os.path.dirname(pkg)), os.path.dirname(pkg)):
        os.makedirs(path, mode=0o700, exist_ok=True)
        private(path)
    if not damage(pkg):
        return ""
    tmp = "%s.tmp-%d" % (pkg, os.getpid())
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
    why = damage(tmp)
    if why:
        shutil.rmtree(tmp, ignore_errors=True)
        return why
    open(os.path.join(tmp, ".complete"), "w").close()
    old = "%s.old-%d" % (pkg, os.getpid())
    try:
        if os.path.isdir(pkg) and damage(pkg):
            os.rename(pkg, old)
        os.rename(tmp, pkg)
    except OSError:
        pass  # another client was first
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return ""
"""

# Starts the agent once the package checks out; else says _DAMAGED_MESSAGE and exits, and
# the client installs the package again. No request reaches an agent from a damaged folder.
# With argv[3] "install" (the client's first agent on the host), it first says on stdout
# whether the package checks out, before the client sends anything: b"K", or b"P" with
# the reason (2-byte length, UTF-8), after which the client sends the archive (8-byte
# length, then the bytes) and the boot installs and checks it, in the same session, and
# says b"K". On a new host that saves a session and a Python start.
_BOOT = (
    _HOST_PRELUDE
    + _INSTALL
    + r"""
def read_exact(n):
    parts = []
    while n:
        part = os.read(0, min(n, 1 << 20))  # never past what was asked: the rest is the agent's
        if not part:
            sys.exit(3)
        parts.append(part)
        n -= len(part)
    return b"".join(parts)

def write_all(data):
    while data:
        data = data[os.write(1, data):]

why = damage(pkg)
if sys.argv[3:4] == ["install"]:
    if why:
        reason = why.encode("utf-8", "replace")[:65535]
        write_all(b"P" + len(reason).to_bytes(2, "big") + reason)
        size = int.from_bytes(read_exact(8), "big")
        why = install(read_exact(size)) or damage(pkg)
    if not why:
        write_all(b"K")
if why:
    sys.stderr.write("remoterun: the package is not as installed: %s\n" % why)
    sys.exit(3)
for path in (os.path.dirname(os.path.dirname(pkg)), os.path.dirname(pkg)):
    private(path)
sys.path_importer_cache.pop(pkg, None)  # looked up at start-up, before it was installed
sys.path.insert(0, pkg)
del sys.argv[1:]
import runpy
runpy.run_module("remoterun.agent", run_name="__main__", alter_sys=True)
"""
)
_DAMAGED_MESSAGE = "remoterun: the package is not as installed: "


# Installs the archive read from stdin (the upload's own session).
_EXTRACT = (
    _HOST_PRELUDE
    + _INSTALL
    + r"""
why = install(sys.stdin.buffer.read())
if why:
    sys.exit("the uploaded package does not check out: " + why)
"""
)


def package_dir() -> str:
    """Where the package lives on a host, relative to the home folder."""
    return f"{PKG_DIR}/{package_archive().version}"


def boot_command(python: str, env: dict[str, str], install: bool = False) -> str:
    """The shell command that starts an agent with ``python`` (a shell word), ``env``
    exported. The host checks the package against its manifest in this same exec, and the
    agent's modules come from the package, never from the home folder or PYTHONPATH
    (_BOOT); PYTHONPATH still names the package for the processes functions start. When
    the package is not as installed it says why (``package_damage``) and exits; with
    ``install``, it first asks for the archive instead (``boot_install``)."""
    pkg_dir = package_dir()
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
    return (
        f'cd && {exports}PYTHONPATH="$HOME/{pkg_dir}${{PYTHONPATH:+:$PYTHONPATH}}" '
        f"exec {python} -u -c {shlex.quote(_BOOT)} {shlex.quote(pkg_dir)} "
        f"{package_archive().manifest_digest}" + (" install" if install else "")
    )


def boot_install(read_exact: Callable[[int], bytes], write: Callable[[bytes], object]) -> str:
    """The client's side of a boot started with ``install``: send the archive when the
    host asks for it. Returns why the host's package needed installing ("" when it checked
    out); raises EOFError when the boot ended without saying "K" (its error output says
    why)."""
    reason = ""
    answer = read_exact(1)
    if answer == b"P":
        reason = read_exact(int.from_bytes(read_exact(2), "big")).decode("utf-8", "replace")
        archive = package_archive().archive
        write(len(archive).to_bytes(8, "big") + archive)
        answer = read_exact(1)
    if answer != b"K":
        raise EOFError(f"the host's boot said {answer!r}, not K")
    return reason


def package_damage(err: str) -> str | None:
    """Why the host found its package damaged, read from a boot's error output; None
    when it did not say so."""
    if _DAMAGED_MESSAGE not in err:
        return None
    return err.split(_DAMAGED_MESSAGE, 1)[1].strip()


def upload_package(
    exec_: Callable[..., tuple[int, str, str]], python: str, timeout: float | None
) -> tuple[int, str]:
    """Install the package on the host with ``python``; ``(exit status, error output)``.
    The archive goes in on the extraction's stdin, so it never lies on the host's disk.
    ``exec_`` runs a command on the host (``Link.exec``)."""
    package = package_archive()
    command = (
        f"cd && {python} -c {shlex.quote(_EXTRACT)} "
        f"{shlex.quote(package_dir())} {package.manifest_digest}"
    )
    status, _, err = exec_(command, timeout, stdin=package.archive)
    return status, err
