"""One root error for glio-node, split by what the caller should do about it.

- ``BadInput``: the data handed to us is wrong (not a WSI, missing spacing, truncated file).
  The CLI exits with code 2 and prints the message; the worker fails the job permanently.
- ``BundleError``: a model bundle is missing, malformed or does not verify.  Permanent.
- ``ConfigError``: the configuration file or an environment override is wrong.  Fatal at start.
- ``TransientError``: worth retrying with backoff (a peer down, disk briefly full).
- ``PermanentError``: a job that will fail again however often it is retried.

Messages say what is wrong and what the operator can do, in one line.
"""


class GlioError(Exception):
    """Root of every error glio-node raises on purpose."""


class BadInput(GlioError):
    """The input data cannot be analysed; the message names the file or attribute and the fix."""


class BundleError(GlioError):
    """A model bundle is missing, malformed or fails its SHA-256 check."""


class ConfigError(GlioError):
    """The configuration cannot be used; the message names the key, the value and the fix."""


class TransientError(GlioError):
    """A failure that may go away: retry with capped backoff."""


class PermanentError(GlioError):
    """A failure that retrying will not fix: fail the job with this reason."""
