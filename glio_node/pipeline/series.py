"""Is a received series whole?  Judged from its own instance headers only (pure, no I/O).

The scheduler asks this of a quiet series before queueing it; the slide reader asks it before
opening a slide (:func:`glio_node.runtime.slide_reader.inspect_files`), so both apply one rule:

- every concatenation has all its parts (``InConcatenationTotalNumber``);
- every TILED_FULL pyramid level (a concatenation or a single instance) holds
  ``ceil(cols / tile cols) * ceil(rows / tile rows) * focal planes * optical paths`` frames;
- TILED_SPARSE levels are trusted: absent frames are legitimately empty (PS3.3 C.8.12.4.1.6),
  so only their concatenation totals are checked.

LABEL, OVERVIEW and THUMBNAIL images are not pyramid levels and are not checked.  Nothing tells
how many levels a pyramid should have, so a level that never arrived at all cannot be noticed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

CONTEXT_IMAGE_TYPES = frozenset({"LABEL", "OVERVIEW", "THUMBNAIL"})


@dataclass(frozen=True)
class Gap:
    """One reason a series is not whole."""

    index: int  # position in the headers handed in of the first instance of the level
    message: str  # one line, no patient data, e.g. "level 1024x768 px is TILED_FULL with 9 of 12 frames"


def image_flavor(header: pydicom.Dataset) -> str:
    """Third value of ImageType: VOLUME, LABEL, OVERVIEW or THUMBNAIL (VOLUME when absent)."""
    image_type = list(header.get("ImageType", []))
    return str(image_type[2]).upper() if len(image_type) > 2 else "VOLUME"


def expected_frames(header: pydicom.Dataset) -> int:
    """Frames a TILED_FULL level holds in all: tiles per plane × focal planes × optical paths."""
    return (
        math.ceil(int(header.TotalPixelMatrixColumns) / int(header.Columns))
        * math.ceil(int(header.TotalPixelMatrixRows) / int(header.Rows))
        * int(header.get("TotalPixelMatrixFocalPlanes", 1) or 1)
        * int(header.get("NumberOfOpticalPaths", 1) or 1)
    )


def series_gaps(headers: Sequence[pydicom.Dataset]) -> list[Gap]:
    """What is missing from the series whose instance headers are ``headers`` (empty: whole).

    ``headers`` may include context images (ignored).  A header lacking the attributes a check
    needs is reported as a gap rather than raising.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(headers):
        if image_flavor(h) in CONTEXT_IMAGE_TYPES:
            continue
        key = str(h.get("SOPInstanceUIDOfConcatenationSource", "") or h.get("SOPInstanceUID", i))
        groups[key].append(i)
    gaps: list[Gap] = []
    for members in groups.values():
        first = members[0]
        h = headers[first]
        total_parts = int(h.get("InConcatenationTotalNumber", 0) or 0)
        if total_parts and len(members) < total_parts:
            gaps.append(
                Gap(
                    first,
                    f"a concatenation of {total_parts} instances arrived with only "
                    f"{len(members)}; the level is incomplete, re-send the whole series",
                )
            )
            continue
        if str(h.get("DimensionOrganizationType", "")).upper() != "TILED_FULL":
            continue
        try:
            tiles = expected_frames(h)
            frames = sum(int(headers[i].get("NumberOfFrames", 1)) for i in members)
        except (AttributeError, TypeError, ValueError, ZeroDivisionError):
            gaps.append(
                Gap(first, "a TILED_FULL level lacks TotalPixelMatrix or tile size attributes")
            )
            continue
        if frames < tiles:
            gaps.append(
                Gap(
                    first,
                    f"level {h.TotalPixelMatrixColumns}x{h.TotalPixelMatrixRows} px is "
                    f"TILED_FULL with {frames} of its {tiles} frames; the level is incomplete, "
                    "re-send the series",
                )
            )
    return gaps


def is_complete(headers: Sequence[pydicom.Dataset]) -> bool:
    """Whether :func:`series_gaps` finds nothing missing (and there is at least one level)."""
    has_level = any(image_flavor(h) not in CONTEXT_IMAGE_TYPES for h in headers)
    return has_level and not series_gaps(headers)
