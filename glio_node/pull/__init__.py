"""The DICOMweb pull mode: poll a server by QIDO-RS, retrieve new series by WADO-RS into the spool.

- :mod:`.multipart` splits a ``multipart/related`` response into files, part by part;
- :mod:`.dicomweb` speaks HTTP to the source (QIDO-RS search, WADO-RS retrieve, auth, errors);
- :mod:`.poller` decides what to take and hands each instance to the same spool and instance
  rows as a C-STORE, so completeness, one job per series and the audit trail are shared.
"""
