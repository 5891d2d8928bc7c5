"""remoterun's version: one place, read by the package, its records and the build."""

__version__ = "0.1.0"
