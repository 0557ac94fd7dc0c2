"""The DICOM receiver: C-ECHO and C-STORE SCP writing durably into the spool."""

from glio_node.receive.scp import build_ae, event_handlers, start_receiver
from glio_node.receive.spool import Spool

__all__ = ["Spool", "build_ae", "event_handlers", "start_receiver"]
