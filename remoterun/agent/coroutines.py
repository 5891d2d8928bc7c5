"""``async def`` functions on a host: the coroutine a call returns, run to its end."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any


def run_to_end(value: Any) -> Any:
    """The value of a call: a coroutine (what calling an ``async def`` function gives) run
    in an event loop of its own until it returns; anything else as it is."""
    if not isinstance(value, Coroutine):
        return value
    import asyncio  # only once an async def function is called: the agent starts without it

    return asyncio.run(value)
