"""How runs and functions show in Jupyter: small HTML cards (``_repr_html_``).

Plain HTML with inline styles and no script, so a notebook shows it the same when it is
opened again, on GitHub, or exported; every value from a record is escaped.
"""

from __future__ import annotations

import datetime
import html
from typing import Any, Mapping

_STATUS_COLOURS = {
    "COMPLETED": "#2e7d32",
    "FAILED": "#c62828",
    "CANCELLED": "#6d4c41",
    "RUNNING": "#1565c0",
    "NOT_STARTED": "#757575",
}
_CARD = (
    "border:1px solid #d0d7de;border-radius:6px;padding:6px 10px;margin:2px 0;"
    "max-width:720px;font-family:system-ui,sans-serif;font-size:13px;line-height:1.4"
)
_KEY = "color:#57606a;padding:1px 12px 1px 0;vertical-align:top;text-align:left;white-space:nowrap"
_VALUE = "padding:1px 0;text-align:left;font-family:ui-monospace,monospace;word-break:break-all"
# Items shown of a params or metrics mapping, and characters of one value.
_MAX_ITEMS = 12
_MAX_TEXT = 160


def run_card(name: str, url: str, record: Mapping[str, Any] | None, problem: str = "") -> str:
    """A run as a card: status, function, host, times, params, the last value of each
    metric, tags, the error's first line, and where its folder is. ``record`` is its
    ``config.json`` as last read (None: not found); ``problem``: why it could not be read."""
    record = record or {}
    status = str(record.get("status") or ("?" if problem else "NOT FOUND"))
    colour = _STATUS_COLOURS.get(status, "#757575")
    badge = (
        f'<span style="background:{colour};color:#fff;border-radius:10px;padding:0 8px;'
        f'font-size:11px;margin-left:6px">{_text(status)}</span>'
    )
    rows: list[tuple[str, str]] = []
    what = record.get("fn_qualname") or record.get("fn_name")
    if record.get("run_type") == "command":
        what = "; ".join(str(c) for c in record.get("cmds") or ())
    if what:
        rows.append(("runs", _text(what)))
    if record.get("host"):
        pid = f" (pid {record['pid']})" if record.get("pid") else ""
        rows.append(("host", _text(f"{record['host']}{pid}")))
    times = _times(record.get("start_time"), record.get("end_time"))
    if times:
        rows.append(("time", _text(times)))
    for key in ("params", "tags"):
        if record.get(key):
            rows.append((key, _items(record[key])))
    metrics = {
        k: v[-1] if isinstance(v, list) and v else v
        for k, v in (record.get("metrics") or {}).items()
    }
    if metrics:
        rows.append(("metrics", _items(metrics)))
    if record.get("error"):
        error = str(record["error"]).strip().splitlines() or [""]
        rows.append(("error", f'<span style="color:#c62828">{_text(error[0])}</span>'))
    if problem:
        rows.append(("note", _text(problem)))
    attempt = record.get("attempt")
    if attempt and attempt > 1:
        rows.append(("attempt", _text(attempt)))
    rows.append(("folder", _text(url)))
    body = "".join(
        f'<tr><th style="{_KEY}">{key}</th><td style="{_VALUE}">{value}</td></tr>'
        for key, value in rows
    )
    return (
        f'<div class="remoterun-run" style="{_CARD}">'
        f"<div><b>Run {_text(name)}</b>{badge}</div>"
        f'<table style="border-collapse:collapse;margin-top:4px">{body}</table></div>'
    )


def function_line(name: str, qualname: str, system: str, is_async: bool) -> str:
    """A remote function in one line: its name, what it calls, and its system."""
    kind = "async remote function" if is_async else "remote function"
    return (
        f'<div class="remoterun-function" style="{_CARD}">'
        f'<b>{_text(name)}</b> <span style="color:#57606a">{kind}</span> '
        f"<code>{_text(qualname)}</code> on <b>{_text(system)}</b></div>"
    )


def _text(value: Any) -> str:
    text = str(value)
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 1] + "…"
    return html.escape(text)


def _items(values: Mapping[str, Any]) -> str:
    shown = [f"{_text(k)}={_text(_short(v))}" for k, v in list(values.items())[:_MAX_ITEMS]]
    if len(values) > _MAX_ITEMS:
        shown.append(f"… {len(values) - _MAX_ITEMS} more")
    return ", ".join(shown)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _times(start: str | None, end: str | None) -> str:
    """``2026-01-02 10:00:00 UTC → 10:00:04 (4.1 s)``, from ISO 8601 times."""
    if not start:
        return ""
    began = _parse(start)
    text = began.strftime("%Y-%m-%d %H:%M:%S UTC") if began else start
    if end:
        ended = _parse(end)
        if began and ended:
            text += (
                f" → {ended.strftime('%H:%M:%S')} ({_duration((ended - began).total_seconds())})"
            )
        else:
            text += f" → {end}"
    return text


def _parse(value: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"
