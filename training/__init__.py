"""Offline training pipeline for glio-node model bundles, run from a checkout (``python -m training``).

Imports ``glio_node`` (bundle format, coding, tiling, synthetic slides); ``glio_node`` never imports this.
"""
