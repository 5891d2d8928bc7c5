"""SSH clusters: hosts reached with paramiko (the only package that imports it), each
running remoterun's agent from a package the client installs there, its run folders read
over SFTP; ssh:// URLs opened over the same connections, host keys checked."""

from ...registry import open_host
from .cluster import SSHCluster, url_filesystem
from .cluster import _rebuild_cluster as _rebuild_cluster  # pickles of SSHCluster name it here
from .endpoint import parse_destination
from .host import SSHHost
from .package import package_archive

__all__ = [
    "SSHCluster",
    "SSHHost",
    "open_host",
    "package_archive",
    "parse_destination",
    "url_filesystem",
]
