"""Text for people who must not see identifiers: log lines and the status page.

Error messages name spool paths, and spool paths are made of study, series and SOP Instance
UIDs; the receiver's and the senders' messages name SOP Instance and Transaction UIDs.  The job
row and the audit trail keep the full text (they are protected like patient data); what is
logged or shown on the page goes through :func:`without_uids`.  Loggers get there by
:func:`redacted_logger` (every module that may log a UID) and ``serve`` puts
:class:`UidRedactor` on its log handler too, for the libraries' own lines.
"""

from __future__ import annotations

import hashlib
import logging
import re

_UID_IN_TEXT = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?!\w|\.\d)")
# A peer's IPv4 address ("192.168.100.120", also before ":port") is what an operator needs in
# the log; a dotted quad of numbers up to 255 is kept, however long.
_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)")


def without_uids(text: str) -> str:
    """``text`` with DICOM UIDs (also inside paths) replaced by ``<uid>``; short dotted numbers
    such as versions ("3.0.2") and IPv4 addresses are kept."""
    return _UID_IN_TEXT.sub(_redact, text)


def series_tag(series_instance_uid: str) -> str:
    """A short, stable, non-identifying name for a series in log lines (the same series gets
    the same tag in the receiver's, the poller's and the worker's lines)."""
    return "s-" + hashlib.sha256(series_instance_uid.encode()).hexdigest()[:10]


def _redact(match: re.Match[str]) -> str:
    found = match.group()
    return found if len(found) < 10 or _IPV4.fullmatch(found) else "<uid>"


class UidRedactor(logging.Filter):
    """A logging filter that rewrites each record without UIDs: the message with its arguments
    merged in, the traceback and the stack (which carry exception messages, spool paths)."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = without_uids(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = without_uids(record.exc_text)
        if record.stack_info:
            record.stack_info = without_uids(record.stack_info)
        return True


def redacted_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` whose records are redacted (:class:`UidRedactor`) before any
    handler sees them, whatever logging configuration the process has."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, UidRedactor) for f in logger.filters):
        logger.addFilter(UidRedactor())
    return logger
