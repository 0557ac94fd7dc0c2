"""Offline training pipeline for glio-node model bundles, run from a checkout (``python -m training.demo``).

Imports ``glio_node`` (bundle format, coding, synthetic textures); ``glio_node`` never imports this.
"""
