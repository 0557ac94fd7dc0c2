"""Walk an SR document's content tree: every content item, depth first, for the tests that look
for a code or a measurement anywhere in it (the SR's nesting is highdicom's TID 1500 layout)."""

from __future__ import annotations


def content_items(ds) -> list:
    """Every item of ``ds``'s ContentSequence and of theirs, depth first, parents before children."""
    found = []
    for item in getattr(ds, "ContentSequence", []):
        found.append(item)
        found.extend(content_items(item))
    return found
