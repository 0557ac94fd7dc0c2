"""The throughput chart: an inline SVG drawn on the server (no script, no external file)."""

from __future__ import annotations

from datetime import datetime
from html import escape

WIDTH, HEIGHT, PAD = 480, 120, 18


def throughput_svg(hours: list[tuple[datetime, int, int]]) -> str:
    """Stacked bars per hour (done below, failed above) with the hour under every sixth bar.

    ``hours``: (hour start, done, failed), oldest first, as ``snapshot.throughput`` returns.
    """
    peak = max((d + f for _, d, f in hours), default=0) or 1
    bar = (WIDTH - 2 * PAD) / max(len(hours), 1)
    scale = (HEIGHT - 2 * PAD) / peak
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="jobs finished per hour, last 24 hours (peak {peak})">'
    )
    parts = [
        svg,
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
        f'<text x="{PAD}" y="{PAD - 6}" class="label">{peak} / h</text>',
    ]
    for i, (hour, done, failed) in enumerate(hours):
        x = PAD + i * bar
        y = HEIGHT - PAD
        title = escape(f"{hour:%H:00} UTC: {done} done, {failed} failed")
        if done:
            h = done * scale
            parts.append(f'<rect x="{x + 1:.1f}" y="{y - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" class="done"><title>{title}</title></rect>')
            y -= h
        if failed:
            h = failed * scale
            parts.append(f'<rect x="{x + 1:.1f}" y="{y - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" class="failed"><title>{title}</title></rect>')
        if i % 6 == 0:
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 4}" class="label">{hour:%H:00}</text>')
    parts.append("</svg>")
    return "".join(parts)
