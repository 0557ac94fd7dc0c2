"""Jinja filters of the page: durations, byte counts, short UIDs, times (pure)."""

from __future__ import annotations

from datetime import datetime


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def byte_count(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def short_uid(uid: str | None) -> str:
    """The tail of a UID: enough to tell series apart on one page, short enough to read."""
    if not uid:
        return ""
    return uid if len(uid) <= 16 else "…" + uid[-12:]


def when(t: datetime | None) -> str:
    return "" if t is None else f"{t:%Y-%m-%d %H:%M:%S}"


FILTERS = {"duration": duration, "bytes": byte_count, "short": short_uid, "when": when}
