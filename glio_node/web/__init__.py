"""The status page, JSON API and /metrics (FastAPI); built by the entry point, never at import."""
