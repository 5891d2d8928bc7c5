"""SSH clusters (interim: the module moved whole into the package, split next)."""

from .host import (
    SSHCluster,
    SSHHost,
    open_host,
    package_archive,
    parse_destination,
    url_filesystem,
)
from .host import (
    _rebuild_cluster as _rebuild_cluster,  # pickles of SSHCluster name it here
)

__all__ = [
    "SSHCluster",
    "SSHHost",
    "open_host",
    "package_archive",
    "parse_destination",
    "url_filesystem",
]
