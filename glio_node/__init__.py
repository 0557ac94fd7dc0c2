"""glio-node: an AI worker beside the PACS for glioblastoma whole-slide images (research use only)."""

__version__ = "0.1.0"
