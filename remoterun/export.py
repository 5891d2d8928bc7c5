"""``run.export(path)``: a run's record written out as YAML or JSON, anywhere fsspec
writes."""

from __future__ import annotations

import json
import posixpath

from .errors import RunStorageError


def write_record(url: str, config: dict, path: str, format: str | None = None) -> str:
    """Write ``config`` plus the run's ``url`` to ``path`` (a file path or fsspec URL) as
    YAML or JSON, by ``format`` or the path's extension; return ``path``. YAML needs
    PyYAML; without it the file is written as JSON, which YAML readers read too."""
    kind = (format or posixpath.splitext(path)[1].lstrip(".") or "json").lower()
    if kind not in ("json", "yaml", "yml"):
        raise ValueError(f"export writes json or yaml, not {kind!r}")
    record = {"url": url, **config}
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    if kind != "json":
        try:
            import yaml  # an optional dependency
        except ImportError:
            pass
        else:
            text = yaml.safe_dump(record, sort_keys=True, default_flow_style=False)
    import fsspec  # here, not at import: `import remoterun` stays light

    try:
        with fsspec.open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except (OSError, ValueError) as exc:
        raise RunStorageError(f"cannot write {path}: {exc}") from exc
    return path
