"""A function's ``resources=`` as Ray's task options, checked once for both the calls
and the recorded runs."""

from __future__ import annotations

from typing import Any

_NAMED = ("num_cpus", "num_gpus", "memory")


def ray_options(resources: dict | None) -> dict[str, Any]:
    """``{"num_cpus": 1, "num_gpus": 1, "memory": bytes, "custom": {"name": amount}}`` as
    Ray's ``.options(...)``; ValueError naming a key Ray would take for a resource no
    node has (a typo would leave the task pending for ever)."""
    resources = dict(resources or {})
    unknown = sorted(set(resources) - {*_NAMED, "custom"})
    if unknown:
        raise ValueError(
            f"unknown resources {unknown}: use num_cpus, num_gpus, memory, and custom "
            "for the resources of your cluster, e.g. {'custom': {'big_mem': 1}}"
        )
    options: dict[str, Any] = {k: resources[k] for k in _NAMED if k in resources}
    custom = resources.get("custom") or {}
    if not isinstance(custom, dict):
        raise ValueError(f"resources['custom'] must be a dict of amounts, not {custom!r}")
    if custom:
        options["resources"] = dict(custom)
    return options
