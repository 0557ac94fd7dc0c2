"""Text for people who must not see identifiers: log lines and the status page.

Error messages name spool paths, and spool paths are made of study, series and SOP Instance
UIDs.  The job row and the audit trail keep the full text (they are protected like patient
data); what is logged or shown on the page goes through :func:`without_uids`.
"""

from __future__ import annotations

import re

_UID_IN_TEXT = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?!\w|\.\d)")


def without_uids(text: str) -> str:
    """``text`` with DICOM UIDs (also inside paths) replaced by ``<uid>``; short dotted numbers
    such as versions ("3.0.2") are kept."""
    return _UID_IN_TEXT.sub(lambda m: "<uid>" if len(m.group()) >= 10 else m.group(), text)
