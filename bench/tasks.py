"""The functions every benchmark calls: trivial on purpose, so that what is measured is the
framework around them. remoterun pickles them by value (a module of the user's own), and
the floors register this module for pickling by value too, so no host needs it installed.
"""

from __future__ import annotations


def inc(x: int) -> int:
    """The trivial call."""
    return x + 1


def zeros(size: int) -> bytes:
    """A result of ``size`` bytes (the "10 MB array")."""
    return bytes(size)


def echo(data: bytes) -> bytes:
    """The argument back: the 100 MB argument-and-result round trip."""
    return data


def sleep_for(seconds: float) -> float:
    """A call that waits: what overlapping awaited calls gain on."""
    import time

    time.sleep(seconds)
    return seconds
