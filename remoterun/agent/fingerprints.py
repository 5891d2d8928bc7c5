"""The host's comparison of fingerprints: whether a recorded run was made from the
arguments a cached call asks for. Pure stdlib, as all of the agent; its client-side
twins (the fingerprints themselves, ``explain``'s comparison) are in
``remoterun/fingerprint.py``, which re-exports this.
"""

from __future__ import annotations


def fingerprint_differences(config: dict, request: dict) -> list[str]:
    """Names of the parameters whose fingerprints differ from the recorded run's."""
    wanted = (request.get("record") or {}).get("fingerprint") or {}
    if request.get("lookup") or not wanted:
        return []
    recorded = config.get("fingerprint") or {}
    old, new = recorded.get("params"), wanted.get("params")
    if isinstance(old, dict) and isinstance(new, dict):
        return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if recorded.get("args") != wanted.get("args"):
        return ["arguments"]
    return []
