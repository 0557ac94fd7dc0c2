"""Errors ``python -m training`` reports as a message, not a traceback (it imports this module
without TensorFlow, so ``validate`` and ``split`` start fast)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run config is wrong; the message names the file or key and what to write instead."""
