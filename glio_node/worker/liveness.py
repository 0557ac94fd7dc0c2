"""This node says it is alive; the work of nodes that are not is taken back.

Every ``HEARTBEAT_SECONDS`` the node writes its heartbeat (:func:`heartbeat`) and asks the store
which owners are gone (:func:`glio_node.store.nodes.gone_owners`: a process on this host that
has exited, or a node whose heartbeat is ``node_silent_seconds`` old); their jobs wait again
(audit ``node_gone``) and their claimed deliveries are due again at once.  A job whose lease
passed (a hung node) is taken back too (:func:`take_back`).
"""

from __future__ import annotations

from glio_node.redact import redacted_logger, series_tag
from glio_node.store import deliveries, nodes, queue
from glio_node.worker.context import WorkContext

log = redacted_logger(__name__)


def heartbeat(work: WorkContext) -> None:
    """Tell the store this node is alive (the status page lists every node's heartbeat)."""
    with work.sessions.begin() as session:
        nodes.heartbeat(session, work.owner, work.now())


def take_back(work: WorkContext) -> None:
    """Requeue the jobs and release the claimed deliveries of gone nodes; requeue expired leases."""
    now = work.now()
    silent = work.settings.worker.node_silent_seconds
    with work.sessions.begin() as session:
        gone = nodes.gone_owners(session, now, silent_after_seconds=silent, exclude=[work.owner])
        records = queue.requeue_expired(session, now, gone)
        deliveries.release_claims_of(session, gone, now)
    for owner, why in gone.items():
        log.warning("node %s is gone (%s): its work is taken back", owner, why)
    for job in records:
        log.warning(
            "job %d series %s: its node is gone or its lease expired, %s",
            job.id, series_tag(job.series_instance_uid),
            "queued again" if job.state.value == "waiting" else "failed (attempts used up)",
        )
